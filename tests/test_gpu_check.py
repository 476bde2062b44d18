"""bench/gpu_check.py: its CPU dry run end to end, and the isolation of its checks (a failing,
crashing or hanging check is reported and the next one still runs)."""
import json
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bench.gpu_check import (
    CHECK_NAMES, Check, CheckFailed, compile_vs_eager, markdown, run_checks, run_logged, target_lines,
)
from tests.helpers import assert_user_error, run_cli

# stage1 / stage2 run the same code as their torchrun variants with plain python; left out for time.
RUN_HERE = ["bench", "stage2_resume", "torchrun_stage2", "torchrun_stage1"]
SKIPPED_ON_CPU = ["stage1_compile", "jpeg_cuda"]


@pytest.mark.slow
def test_cpu_quick_dry_run_passes_every_check_it_can_run(tmp_path):
    out = tmp_path / "cpu.json"
    result = run_cli("bench/gpu_check.py", "--device", "cpu", "--quick", "--out", out, "--workdir", tmp_path / "work",
                     "--checks", *RUN_HERE, *SKIPPED_ON_CPU, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == [name for name in CHECK_NAMES if name in RUN_HERE + SKIPPED_ON_CPU]
    for name in RUN_HERE:
        assert checks[name]["status"] == "PASS", (name, checks[name]["reason"])
        log = tmp_path / "work" / "logs" / f"{name}.log"
        assert checks[name]["log"] == str(log) and log.stat().st_size > 0
    for name in SKIPPED_ON_CPU:
        assert checks[name]["status"] == "SKIP" and checks[name]["reason"]
    # the kill landed between the first and the last of the 2 epochs, and the resumed log has each once
    assert checks["stage2_resume"]["details"] == {"killed_after_epoch": 1, "epochs": 2}
    assert "backend gloo" in (tmp_path / "work" / "logs" / "torchrun_stage1.log").read_text()
    assert len(checks["torchrun_stage2"]["details"]["scores"]) == 2  # best.pt scored two images
    assert [row["name"] for row in report["bench"]] == ["stage2_sampling"]
    assert report["device"].startswith("cpu") and report["quick"] is True
    assert "| stage2_resume | PASS |" in result.stdout and "| jpeg_cuda | SKIP |" in result.stdout


def test_a_failing_check_does_not_stop_the_others(tmp_path):
    def fails(context, log_path, timeout_s, name):
        raise CheckFailed("loss is nan")

    def crashes(context, log_path, timeout_s, name):
        return {}["missing"]

    def passes(context, log_path, timeout_s, name):
        return {"ran": True}

    checks = [Check("a", fails, 10), Check("b", crashes, 10), Check("c", passes, 10), Check("d", passes, 10, "not here")]
    results = run_checks(checks, None, str(tmp_path), budget_s=60)
    assert [(r["name"], r["status"]) for r in results] == [("a", "FAIL"), ("b", "FAIL"), ("c", "PASS"), ("d", "SKIP")]
    assert results[0]["reason"] == "loss is nan" and results[1]["reason"] == "KeyError: 'missing'"
    assert results[2]["details"] == {"ran": True} and results[3]["reason"] == "not here"
    assert results[0]["log"] == str(tmp_path / "a.log")


def test_spent_budget_skips_the_remaining_checks(tmp_path):
    checks = [Check("late", lambda *a: {}, 10)]
    assert run_checks(checks, None, str(tmp_path), budget_s=5)[0]["status"] == "SKIP"


def running(pid):
    """Whether process ``pid`` runs (a zombie that nobody reaped does not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.slow  # waits for a 10 s timeout
def test_run_logged_reports_the_error_line_and_kills_at_the_timeout(tmp_path):
    log = tmp_path / "x.log"
    assert "hello" in run_logged([sys.executable, "-c", "print('hello')"], log, 60)
    with pytest.raises(CheckFailed, match=r"^exit status 1: ValueError: boom$"):
        run_logged([sys.executable, "-c", "print('working'); raise ValueError('boom')"], log, 60)
    with pytest.raises(CheckFailed, match=r"^exit status 2: error: --x is wrong$"):
        run_logged([sys.executable, "-c", "import sys; print('error: --x is wrong', file=sys.stderr); sys.exit(2)"],
                   log, 60)
    # The whole process group goes: the child's own child (the sleep) must not outlive the timeout.
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    with pytest.raises(CheckFailed, match=r"^timed out after 10 s$"):
        run_logged([sys.executable, "-c", script], log, 10)
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not running(child)
    assert log.read_text().count("$ ") == 4  # every command is written to the log before its output


def test_jpeg_agreement_reference_is_the_worker_path():
    """The PIL side of bench/jpeg_agreement.py is exactly what the data workers produce at each level."""
    from bench.jpeg_agreement import photo_crops, pil_jpeg, psnr
    from qualiclip_pretrain.degradation_generator import LEVEL_PARAMS, SyntheticDegradation

    crops = photo_crops(5)
    assert crops.shape == (5, 3, 224, 224) and crops.dtype == torch.uint8
    assert len({bytes(c.numpy()) for c in crops}) == 5  # five different crops
    worker = SyntheticDegradation("jpeg", 5)
    for level, quality in enumerate(LEVEL_PARAMS["jpeg"]):
        expected = torch.stack([torch.from_numpy(np.array(images[level])).permute(2, 0, 1)
                                for images in (worker(Image.fromarray(c.permute(1, 2, 0).numpy())) for c in crops)])
        assert torch.equal(pil_jpeg(crops, quality), expected)
    # PSNR = 10 log10(255^2 / MSE): one value off by 16 in 4 gives MSE 64
    a = torch.zeros(1, 2, 2, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0] = 16
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 64))
    assert psnr(a, a) == float("inf")


@pytest.mark.slow
def test_jpeg_agreement_needs_cuda():
    result = run_cli("bench/jpeg_agreement.py", "--out", "unused.json", timeout=300)
    assert_user_error(result, "needs a CUDA GPU")


def test_target_lines_judge_the_bench_rows_against_the_targets():
    rows = [{"name": "stage1_degradation", "ours_per_s": 5200.0}, {"name": "stage1_train", "ours_per_s": 3400.0},
            {"name": "stage1_end_to_end", "ours_per_s": 3100.0, "ours_peak_gib": 30.0},
            {"name": "stage2_train", "ours_per_s": 2999.0}]
    lines = target_lines(rows)
    assert lines[0] == "- stage1_end_to_end: 3100 trained crops/s (target >= 3000: met)"
    assert lines[1] == "- stage2_train: 2999 patches/s (target >= 3000: missed)"
    # 24 GB = 22.35 GiB
    assert lines[2].startswith("- Stage-1 peak memory") and "22.35 GiB: missed" in lines[2]
    assert lines[3].endswith("end to end 3100: bound by the training step")
    assert target_lines([{"name": "stage2_sampling", "ours_per_s": 1.0}]) == []


def test_markdown_of_a_cuda_report_lists_checks_rows_compile_and_targets():
    report = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-27", "torch": "2.11.0", "cuda": "13.0",
              "checks": [{"name": "stage1", "status": "PASS", "seconds": 41.0, "reason": "", "log": "/w/logs/stage1.log"},
                         {"name": "stage2", "status": "FAIL", "seconds": 3.5, "reason": "exit status 1: boom",
                          "log": "/w/logs/stage2.log"}],
              "bench": [{"name": "stage2_train", "unit": "patches/s", "baseline_per_s": 900.0, "ours_per_s": 3100.0,
                         "ratio": 3.44, "ours_peak_gib": 12.5}],
              "compile_vs_eager": compile_vs_eager([
                  {"name": "stage1", "status": "PASS", "details": {"epoch_time_s": [9.0, 4.0]}},
                  {"name": "stage1_compile", "status": "PASS", "details": {"epoch_time_s": [60.0, 3.2]}}]),
              "jpeg_cuda": {}}
    assert report["compile_vs_eager"] == {"stage1": {"eager_epoch2_s": 4.0, "compile_epoch2_s": 3.2, "speedup": 1.25}}
    text = markdown(report).splitlines()
    assert text[0] == "### NVIDIA H100 80GB HBM3 (2026-11-27, torch 2.11.0, CUDA 13.0)"
    assert "| stage2 | FAIL | 3.5 | exit status 1: boom | stage2.log |" in text
    assert "| stage2_train (patches/s) | 900.0 | 3100.0 | 3.44x | 12.5 |" in text
    assert "- stage1 --compile: epoch 2 in 3.2 s against 4.0 s eager (1.25x)" in text
    assert text[-1] == "- stage2_train: 3100 patches/s (target >= 3000: met)"
