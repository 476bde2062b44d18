"""The benchmark runs (quick mode) and writes the documented JSON rows; no timing is asserted."""
import json

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # every test here runs a CLI as a subprocess

NAMES = ["stage1_degradation", "stage2_sampling", "stage1_train", "stage2_train"]


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
