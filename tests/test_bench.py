"""The benchmark runs (quick mode) and writes the documented JSON rows; no speed is asserted, only how
the rows are made (totals, units, n/a memory on CPU)."""
import json

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # every test here runs a CLI as a subprocess

NAMES = ["stage1_degradation", "stage2_sampling", "stage1_end_to_end", "stage1_train", "stage2_train",
         "arniqa_distort"]
TRAINING = ("stage1_end_to_end", "stage1_train", "stage2_train")


def test_bench_quick_writes_rows(tmp_path):
    out = tmp_path / "latest.json"
    result = run_cli("bench/bench.py", "--device", "cpu", "--quick", "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == NAMES
    for r in rows:
        assert r["device"].startswith("cpu")
        assert r["baseline_per_s"] > 0 and r["ours_per_s"] > 0
        assert abs(r["ratio"] - r["ours_per_s"] / r["baseline_per_s"]) < 0.01 * r["ratio"] + 0.01
        assert r["name"] in result.stdout
    by_name = {r["name"]: r for r in rows}
    # peak memory is a CUDA figure: None in the JSON and n/a in the table on CPU
    for name in TRAINING:
        assert by_name[name]["ours_peak_gib"] is None and by_name[name]["baseline_peak_gib"] is None
        assert next(line for line in result.stdout.splitlines() if line.startswith(name)).endswith("n/a")
    arniqa = by_name["arniqa_distort"]
    from qualiclip_pretrain.arniqa import DISTORTIONS

    assert list(arniqa["per_distortion"]) == list(DISTORTIONS)
    # the row's rates are the totals over the distortions: crops / summed time
    seconds = sum(arniqa["crops"] / d["ours_per_s"] for d in arniqa["per_distortion"].values())
    assert arniqa["ours_per_s"] == pytest.approx(arniqa["crops"] * len(DISTORTIONS) / seconds, rel=0.05)
    assert by_name["stage1_end_to_end"]["batch"] == "2 images x 2 crops x 5 levels"


def test_bench_rows_flag_measures_only_the_rows_named(tmp_path):
    out = tmp_path / "rows.json"
    result = run_cli("bench/bench.py", "--device", "cpu", "--quick", "--rows", "stage2_sampling", "--out", out,
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["name"] for r in json.loads(out.read_text())] == ["stage2_sampling"]
    assert "stage1_train" not in result.stdout
