"""run_qualiclip_experiments.sh end to end on tiny settings (own data and --demo), its failure
behaviour, and tools/summarize_experiment.py on a hand-made results directory."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, assert_user_error, run_cli

SCRIPT = os.path.join(ROOT, "run_qualiclip_experiments.sh")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RANDOM_ANCHORS_NOTE = "Stage 1 trained against fixed random text anchors"


def run_pipeline(*args, timeout=900, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", SCRIPT, "--python", sys.executable, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(srcc, plcc, n=4):
    return {"srcc": srcc, "plcc": plcc, "plcc_logistic": plcc, "krcc": srcc, "rmse": 0.5, "n": n}


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


def test_demo_pipeline_builds_its_data_where_asked_and_flags_the_summary(tmp_path):
    demo, out = tmp_path / "demo", tmp_path / "results"
    result = run_pipeline("--demo", "--demo_dir", demo, "--demo_size", "20", "--epochs_pretrain", "1", "--epochs", "1",
                          "--output", out, "--pretrain_args", "--crop_size 64 --num_levels 2 --eval_patch_num 1",
                          "--", "--train_patch_num", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # --demo_size 20: 20 KonIQ-10k images, max(3, 20 / 5) = 4 per other dataset
    assert json.loads((demo / "demo.json").read_text())["n_koniq"] == 20
    assert len(os.listdir(demo / "koniq-10k" / "512x384")) == 20
    assert len(os.listdir(demo / "spaq" / "TestImage")) == 4
    summary = (out / "summary.md").read_text()
    assert "**Demo data.**" in summary
    number = r"(-?\d\.\d{4})"
    for label in ("Baseline (No Pretrain)", "QualiCLIP Pretrain"):
        performance, cross = table_rows(summary, label)
        srcc, plcc = map(float, re.fullmatch(f"{number} / {number}", performance[1]).groups())
        assert -1 <= srcc <= 1 and -1 <= plcc <= 1
        assert len(cross) == 5  # all four demo cross-dataset sets
    data = json.loads((out / "summary.json").read_text())
    assert data["demo_data"] is True
    assert data["pretrain"]["random_anchors"] == torch.load(demo / "text_features.pt", weights_only=True)["random"]
    assert (RANDOM_ANCHORS_NOTE in summary) == data["pretrain"]["random_anchors"]
    timings = dict(line.split("\t") for line in (out / "timings.tsv").read_text().splitlines())
    assert set(timings) >= {"make_demo", "text_anchors", "pretrain", "baseline", "pretrained", "cross_dataset"}
    cross_command = next(line for line in result.stdout.splitlines() if line.startswith("==> [cross_dataset]"))
    assert "--num_workers 0" in cross_command  # no DataLoader worker processes on a small CPU
    for png in ("curves.png", "scatter_koniq_test.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_failing_step_stops_the_pipeline_and_names_its_log(tmp_path):
    out = tmp_path / "results"
    result = run_pipeline("--data_root", tmp_path / "missing", "--model_size", "nano", "--output", out,
                          "--pretrain_args", "--num_workers 0", timeout=300)
    assert result.returncode != 0
    assert f"step 'pretrain' failed; see {out}/logs/pretrain.log" in result.stderr
    assert "--data_root" in (out / "logs" / "pretrain.log").read_text()
    assert not (out / "baseline").exists() and not (out / "summary.md").exists()


def test_a_late_failure_leaves_no_summary(tmp_path):
    """A bad extra fine-tune flag: Stage 1 finishes, the baseline step fails, nothing after it runs.

    Run from another folder: relative paths are the caller's, not the repository's.
    """
    out = tmp_path / "results"
    result = run_pipeline("--demo", "--demo_dir", "demo", "--demo_size", "10", "--epochs_pretrain", "1",
                          "--output", "results", "--pretrain_args", "--crop_size 64 --num_levels 2 --eval_patch_num 1",
                          "--", "--no_such_flag", timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert "step 'baseline' failed; see results/logs/baseline.log" in result.stderr
    assert (tmp_path / "demo" / "demo.json").is_file()
    assert "unrecognized arguments: --no_such_flag" in (out / "logs" / "baseline.log").read_text()
    assert (out / "pretrain" / "swin_nano_qualiclip_pretrained.pkl").is_file()
    assert [line.split("\t")[0] for line in (out / "timings.tsv").read_text().splitlines()] == \
        ["make_demo", "text_anchors", "pretrain"]
    assert not (out / "pretrained").exists() and not (out / "summary.md").exists()
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--epochs"], "--epochs needs a value"),
    (["--demo_size", "12"], "--demo_dir and --demo_size only apply with --demo"),
    (["--demo", "--demo_size", "ten"], "--demo_size must be a whole number"),
])
def test_usage_errors_stop_before_anything_runs(tmp_path, args, message):
    result = run_pipeline("--output", tmp_path / "results", *args, timeout=60)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "results").exists()


def test_refuses_to_overwrite_a_finished_experiment(tmp_path):
    (tmp_path / "summary.md").write_text("done")
    result = run_pipeline("--output", tmp_path, timeout=60)
    assert result.returncode == 2 and "already holds a finished experiment" in result.stderr
    assert (tmp_path / "summary.md").read_text() == "done"


# ----------------------------------------------------------------------------- summary tool

@pytest.fixture
def results_dir(tmp_path):
    """A results directory as the pipeline leaves it, written by hand with known numbers."""
    root = tmp_path / "results"
    for key, test, best_epoch in (("baseline", metrics(0.81234, 0.84567, 20), 3),
                                  ("pretrained", metrics(0.79, 0.8, 20), 2)):
        (root / key).mkdir(parents=True)
        (root / key / "results.json").write_text(json.dumps(
            {"best_epoch": best_epoch, "val": metrics(0.9, 0.91), "test": test, "test_last": metrics(0.7, 0.72, 20)}))
        records = [{"epoch": e, "train_loss": 0.3 / e, "val": metrics(0.2 * e, 0.2 * e)} for e in (1, 2, 3)]
        (root / key / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        with open(root / key / "predictions_test.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "mos", "pred"), *((f"{i}.jpg", i / 5, i / 6) for i in range(20))])
    (root / "pretrain").mkdir()
    (root / "pretrain" / "results.json").write_text(json.dumps({"zero_shot_val": metrics(0.35, 0.5)}))
    anchors = tmp_path / "anchors.pt"
    torch.save({"text_features": torch.eye(2, 8), "random": True}, anchors)
    (root / "pretrain" / "args.json").write_text(json.dumps({"text_features": str(anchors)}))
    (root / "cross_dataset.json").write_text(json.dumps({
        str(root / "baseline" / "best.pt"): {"spaq": metrics(0.61, 0.62)},
        str(root / "pretrained" / "best.pt"): {"spaq": metrics(0.655555, 0.6), "kadid-10k": metrics(-0.1, 0.05)},
    }))
    (root / "timings.tsv").write_text("make_demo\t3\npretrain\t22\nbaseline\t95\npretrained\t18\ncross_dataset\t9\n")
    return root


def test_summary_tables_from_a_hand_made_results_directory(results_dir):
    result = run_cli("tools/summarize_experiment.py", results_dir)
    assert result.returncode == 0, result.stderr
    summary = (results_dir / "summary.md").read_text()
    assert "Demo data" not in summary
    assert RANDOM_ANCHORS_NOTE in summary
    assert "Stage 1 (22s): zero-shot SRCC/PLCC of the encoder on the KonIQ-10k validation split: 0.3500 / 0.5000" \
        in summary
    (baseline, baseline_cross), (pretrained, pretrained_cross) = (
        table_rows(summary, label) for label in ("Baseline (No Pretrain)", "QualiCLIP Pretrain"))
    assert baseline == ["Baseline (No Pretrain)", "0.8123 / 0.8457", "3", "1.6min"]
    # the pretrained model's time includes Stage 1
    assert pretrained == ["QualiCLIP Pretrain", "0.7900 / 0.8000", "2", "22s + 18s = 40s"]
    # only the datasets some model was evaluated on, in the guide's order; a gap is n/a
    assert "| Model | SPAQ | KADID-10K |" in summary
    assert baseline_cross == ["Baseline (No Pretrain)", "0.6100 / 0.6200", "n/a"]
    assert pretrained_cross == ["QualiCLIP Pretrain", "0.6556 / 0.6000", "-0.1000 / 0.0500"]

    data = json.loads((results_dir / "summary.json").read_text())
    assert data["demo_data"] is False and data["pretrain"]["random_anchors"] is True
    assert data["models"]["baseline"]["koniq_test"] == metrics(0.81234, 0.84567, 20)
    assert data["models"]["baseline"]["koniq_test_last"]["srcc"] == 0.7
    assert (data["models"]["pretrained"]["time_s"], data["models"]["pretrained"]["finetune_time_s"]) == (40, 18)
    assert data["models"]["pretrained"]["cross_dataset"]["kadid-10k"]["srcc"] == -0.1
    for png in ("curves.png", "scatter_koniq_test.png"):
        assert (results_dir / png).read_bytes()[:8] == PNG_MAGIC


def test_summary_demo_note_only_with_demo_and_anchor_note_only_for_random_anchors(results_dir, tmp_path):
    torch.save({"text_features": torch.eye(2, 8), "random": False}, tmp_path / "anchors.pt")
    result = run_cli("tools/summarize_experiment.py", results_dir, "--demo")
    assert result.returncode == 0, result.stderr
    summary = (results_dir / "summary.md").read_text()
    assert summary.count("**Demo data.**") == 1 and RANDOM_ANCHORS_NOTE not in summary
    assert json.loads((results_dir / "summary.json").read_text())["demo_data"] is True

    (results_dir / "pretrained" / "results.json").unlink()
    assert_user_error(run_cli("tools/summarize_experiment.py", results_dir), "pretrained", "results.json", "missing")
