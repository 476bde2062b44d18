"""run_qualiclip_experiments.sh end to end on tiny settings, and its failure behaviour."""
import json
import os
import re
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "run_qualiclip_experiments.sh")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_pipeline(*args, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", SCRIPT, "--python", sys.executable, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def table_rows(markdown, label):
    """Cells of every table row labelled ``label`` (performance table first, cross-dataset second)."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith(f"| {label} |")]


def test_pipeline_runs_end_to_end_and_summarises_both_models(tmp_path, demo_root, text_features_file):
    out = tmp_path / "results"
    result = run_pipeline(
        "--data_root", demo_root / "koniq-10k", "--spaq_root", demo_root / "spaq",
        "--kadid_root", demo_root / "kadid-10k", "--agiqa_root", demo_root / "agiqa-3k",
        "--livec_root", tmp_path / "no_livec", "--model_size", "nano", "--epochs_pretrain", "1", "--epochs", "1",
        "--output", out,
        "--pretrain_args", f"--text_features {text_features_file} --crop_size 64 --num_levels 2 --num_workers 0 "
                           f"--eval_patch_num 1",
        "--", "--num_workers", "0", "--train_patch_num", "1", "--test_patch_num", "1", "--batch_size", "8",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    number = r"(-?\d\.\d{4})"
    for label in ("Baseline (No Pretrain)", "QualiCLIP Pretrain"):
        performance, cross = table_rows(summary, label)
        srcc, plcc = map(float, re.fullmatch(f"{number} / {number}", performance[1]).groups())
        assert -1 <= srcc <= 1 and -1 <= plcc <= 1
        assert len(cross) == 4 and all(re.fullmatch(f"{number} / {number}", c) for c in cross[1:])
    # the cross-dataset table has exactly the datasets that exist (no LIVE-C root was given)
    header = next(line for line in summary.splitlines() if line.startswith("| Model | SPAQ"))
    assert "KADID-10K" in header and "AGIQA-3K" in header and "LIVE-C" not in header
    assert "Demo data" not in summary
    data = json.loads((out / "summary.json").read_text())
    for key in ("baseline", "pretrained"):
        test = data["models"][key]["koniq_test"]
        assert set(test) >= {"srcc", "plcc", "plcc_logistic", "krcc", "rmse", "n"} and test["n"] > 0
        assert set(data["models"][key]["cross_dataset"]) == {"spaq", "kadid-10k", "agiqa-3k"}
    # the pretrained fine-tune really started from the Stage-1 encoder
    args = json.loads((out / "pretrained" / "args.json").read_text())
    assert args["pretrained_encoder"] and "swin_nano_qualiclip_pretrained.pkl" in str(args["pretrained_encoder"])
    for png in ("curves.png", "scatter_koniq_test.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    timings = dict(line.split("\t") for line in (out / "timings.tsv").read_text().splitlines())
    assert set(timings) >= {"pretrain", "baseline", "pretrained", "cross_dataset", "summary"}
    assert result.stdout.rstrip().endswith(f"results directory: {out}")


def test_failing_step_stops_the_pipeline_and_names_its_log(tmp_path):
    out = tmp_path / "results"
    result = run_pipeline("--data_root", tmp_path / "missing", "--model_size", "nano", "--output", out,
                          "--pretrain_args", "--num_workers 0", timeout=300)
    assert result.returncode != 0
    assert f"step 'pretrain' failed; see {out}/logs/pretrain.log" in result.stderr
    assert "--data_root" in (out / "logs" / "pretrain.log").read_text()
    assert not (out / "baseline").exists() and not (out / "summary.md").exists()


def test_unknown_option_value_is_an_error(tmp_path):
    result = run_pipeline("--epochs", timeout=60)
    assert result.returncode == 2 and "--epochs needs a value" in result.stderr
