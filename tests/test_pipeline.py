"""run_qualiclip_experiments.sh end to end on tiny settings (own data and --demo), its failure
behaviour, and tools/summarize_experiment.py on a hand-made results directory."""
import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from tests.helpers import assert_user_error, run_cli, run_pipeline, write_small_train_split
from tools.make_demo_data import build_demo

pytestmark = pytest.mark.slow  # every test here runs a CLI as a subprocess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RANDOM_ANCHORS_NOTE = "Stage 1 trained against fixed random text anchors"


def metrics(srcc, plcc, n=4):
    return {"srcc": srcc, "plcc": plcc, "plcc_logistic": plcc, "krcc": srcc, "rmse": 0.5, "n": n}


def table_rows(markdown, label):
    """Cells of every table row labelled ``label`` (performance table first, cross-dataset second)."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith(f"| {label} |")]


LABELS = ("Baseline (No Pretrain)", "Baseline at the pretrained encoder LR", "QualiCLIP Pretrain")
MODELS = ("baseline", "baseline_matched_lr", "pretrained")


def test_pipeline_runs_three_fine_tunes_per_seed_on_one_split_and_summarises_them(tmp_path, demo_root,
                                                                                   text_features_file):
    out = tmp_path / "results"
    result = run_pipeline(
        "--data_root", demo_root / "koniq-10k", "--spaq_root", demo_root / "spaq",
        "--kadid_root", demo_root / "kadid-10k", "--agiqa_root", demo_root / "agiqa-3k",
        "--livec_root", tmp_path / "no_livec", "--model_size", "nano", "--epochs_pretrain", "1", "--epochs", "1",
        "--seeds", "2", "--split_seed", "3", "--output", out,
        "--pretrain_args", f"--text_features {text_features_file} --crop_size 64 --num_levels 2 --num_workers 0 "
                           "--eval_patch_num 1 --resize 96 --batch_size 16",
        # batches that hold the whole training split: one step per run
        "--", "--num_workers", "0", "--train_patch_num", "1", "--test_patch_num", "1", "--batch_size", "32",
        "--lr", "2e-5", "--lr_ratio", "5", "--lr_encoder_pretrained", "4e-6",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    number = r"(-?\d\.\d{4}) ± (\d\.\d{4})"
    for label in LABELS:
        performance, cross = table_rows(summary, label)
        srcc, _, plcc, _ = map(float, re.fullmatch(f"{number} / {number}", performance[3]).groups())
        assert -1 <= srcc <= 1 and -1 <= plcc <= 1
        assert len(cross) == 4 and all(re.fullmatch(f"{number} / {number}", c) for c in cross[1:])
    # the cross-dataset table has exactly the datasets that exist (no LIVE-C root was given)
    header = next(line for line in summary.splitlines() if line.startswith("| Model | SPAQ"))
    assert "KADID-10K" in header and "AGIQA-3K" in header and "LIVE-C" not in header
    assert "Demo data" not in summary and "split seed 3" in summary and "Fine-tune seeds: 0, 1 (2)" in summary
    data = json.loads((out / "summary.json").read_text())
    # every step used split seed 3; the three fine-tunes of a seed differ in one thing each
    pretrain_args = json.loads((out / "pretrain" / "args.json").read_text())
    assert pretrain_args["split_seed"] == 3
    for seed in (0, 1):
        args = {m: json.loads((out / m / f"seed_{seed}" / "args.json").read_text()) for m in MODELS}
        assert all(a["split_seed"] == 3 and a["seed"] == seed for a in args.values())
        assert "swin_nano_qualiclip_pretrained.pkl" in args["pretrained"]["pretrained_encoder"]
        assert args["baseline"]["pretrained_encoder"] is None and args["baseline_matched_lr"]["match_pretrained_lr"]
        splits = {m: json.loads((out / m / f"seed_{seed}" / "split.json").read_text()) for m in MODELS}
        assert splits["baseline"] == splits["baseline_matched_lr"] == splits["pretrained"]
        logs = {m: json.loads((out / m / f"seed_{seed}" / "log.jsonl").read_text().splitlines()[0]) for m in MODELS}
        assert logs["baseline"]["lr"]["head"] == logs["baseline_matched_lr"]["lr"]["head"] == \
            logs["pretrained"]["lr"]["head"]
        assert logs["baseline_matched_lr"]["lr"]["encoder"] == logs["pretrained"]["lr"]["encoder"] < \
            logs["baseline"]["lr"]["encoder"]
    for key in MODELS:
        model = data["models"][key]
        per_seed = [json.loads((out / key / f"seed_{s}" / "results.json").read_text())["test"]["srcc"] for s in (0, 1)]
        assert model["koniq_test"]["srcc"]["values"] == per_seed
        assert model["koniq_test"]["srcc"]["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
        assert set(model["cross_dataset"]) == {"spaq", "kadid-10k", "agiqa-3k"}
    assert (data["models"]["baseline"]["encoder_lr"], data["models"]["baseline"]["head_lr"]) == (2e-5, 1e-4)
    assert data["models"]["baseline_matched_lr"]["encoder_lr"] == data["models"]["pretrained"]["encoder_lr"] == 4e-6
    for png in ("curves.png", "scatter_koniq_test.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    timings = dict(line.split("\t") for line in (out / "timings.tsv").read_text().splitlines())
    assert set(timings) >= {"pretrain", "cross_dataset", "summary",
                            *(f"{m}_seed{s}" for m in MODELS for s in (0, 1))}
    assert result.stdout.rstrip().endswith(f"results directory: {out}")


def test_demo_pipeline_builds_its_data_where_asked_and_flags_the_summary(tmp_path):
    demo, out = tmp_path / "demo", tmp_path / "results"
    result = run_pipeline("--demo", "--demo_dir", demo, "--demo_size", "20", "--epochs_pretrain", "1", "--epochs", "1",
                          "--output", out, "--pretrain_args", "--crop_size 64 --num_levels 2 --eval_patch_num 1 "
                          "--batch_size 16", "--", "--train_patch_num", "1", "--test_patch_num", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # --demo_size 20: 20 KonIQ-10k images, max(3, 20 / 5) = 4 per other dataset
    assert json.loads((demo / "demo.json").read_text())["n_koniq"] == 20
    assert len(os.listdir(demo / "koniq-10k" / "512x384")) == 20
    assert len(os.listdir(demo / "spaq" / "TestImage")) == 4
    summary = (out / "summary.md").read_text()
    assert "**Demo data.**" in summary
    number = r"(-?\d\.\d{4})"
    for label in LABELS:
        performance, cross = table_rows(summary, label)
        srcc, plcc = map(float, re.fullmatch(f"{number} / {number}", performance[3]).groups())
        assert -1 <= srcc <= 1 and -1 <= plcc <= 1
        assert len(cross) == 5  # all four demo cross-dataset sets
    assert "one seed, so no spread is available" in summary
    data = json.loads((out / "summary.json").read_text())
    assert data["demo_data"] is True
    assert data["pretrain"]["random_anchors"] == torch.load(demo / "text_features.pt", weights_only=True)["random"]
    assert (RANDOM_ANCHORS_NOTE in summary) == data["pretrain"]["random_anchors"]
    timings = dict(line.split("\t") for line in (out / "timings.tsv").read_text().splitlines())
    assert set(timings) >= {"make_demo", "text_anchors", "pretrain", "baseline_seed0", "baseline_matched_lr_seed0",
                            "pretrained_seed0", "cross_dataset"}
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
                          "--output", "results", "--pretrain_args", "--crop_size 64 --num_levels 2 --eval_patch_num 1 "
                          "--batch_size 8", "--", "--no_such_flag", timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert "step 'baseline_seed0' failed; see results/logs/baseline_seed0.log" in result.stderr
    assert (tmp_path / "demo" / "demo.json").is_file()
    assert "unrecognized arguments: --no_such_flag" in (out / "logs" / "baseline_seed0.log").read_text()
    assert (out / "pretrain" / "swin_nano_qualiclip_pretrained.pkl").is_file()
    assert [line.split("\t")[0] for line in (out / "timings.tsv").read_text().splitlines()] == \
        ["make_demo", "text_anchors", "pretrain"]
    assert not (out / "baseline_matched_lr").exists() and not (out / "pretrained").exists()
    assert not (out / "summary.md").exists()
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--epochs"], "--epochs needs a value"),
    (["--demo_size", "12"], "--demo_dir and --demo_size only apply with --demo"),
    (["--demo", "--demo_size", "ten"], "--demo_size must be a whole number"),
    (["--seeds", "0"], "--seeds must be a whole number >= 1"),
    (["--split_seed", "x"], "--split_seed must be a whole number"),
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

# Per model and seed: KonIQ-10k test (SRCC, PLCC) and SPAQ (SRCC, PLCC), chosen so that every
# statistic below can be worked out by hand.
HAND_MADE = {
    "baseline": [((0.80, 0.84), (0.61, 0.62)), ((0.82, 0.86), (0.63, 0.60))],
    "baseline_matched_lr": [((0.78, 0.80), (0.60, 0.60)), ((0.79, 0.83), (0.64, 0.66))],
    "pretrained": [((0.83, 0.85), (0.70, 0.61)), ((0.86, 0.86), (0.66, 0.65))],
}


@pytest.fixture
def results_dir(tmp_path):
    """A results directory as the pipeline leaves it (two seeds), written by hand with known numbers."""
    root = tmp_path / "results"
    cross = {}
    for key, seeds in HAND_MADE.items():
        for seed, ((srcc, plcc), spaq) in enumerate(seeds):
            run_dir = root / key / f"seed_{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "results.json").write_text(json.dumps(
                {"best_epoch": 3 - seed, "val": metrics(0.9, 0.91), "test": metrics(srcc, plcc, 20),
                 "test_last": metrics(0.7, 0.72, 20)}))
            (run_dir / "args.json").write_text(json.dumps(
                {"lr": 5e-6, "lr_ratio": 10, "lr_encoder_pretrained": 1e-6, "imagenet_pretrained": True,
                 "pretrained_encoder": "stage1.pkl" if key == "pretrained" else None,
                 "match_pretrained_lr": key == "baseline_matched_lr", "seed": seed, "split_seed": 0}))
            records = [{"epoch": e, "train_loss": 0.3 / e, "val": metrics(0.2 * e, 0.2 * e)} for e in (1, 2, 3)]
            (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            with open(run_dir / "predictions_test.csv", "w", newline="") as f:
                csv.writer(f).writerows([("image", "mos", "pred"), *((f"{i}.jpg", i / 5, i / 6) for i in range(20))])
            cross[str(run_dir / "best.pt")] = {"spaq": metrics(*spaq)}
    (root / "pretrain").mkdir()
    (root / "pretrain" / "results.json").write_text(json.dumps(
        {"zero_shot_val": metrics(0.35, 0.5), "level_ranking_accuracy": {"blur": 0.95, "noise": 0.9, "overall": 0.925}}))
    anchors = tmp_path / "anchors.pt"
    torch.save({"text_features": torch.eye(2, 8), "random": True}, anchors)
    (root / "pretrain" / "args.json").write_text(json.dumps({"text_features": str(anchors), "split_seed": 0}))
    (root / "cross_dataset.json").write_text(json.dumps(cross))
    (root / "timings.tsv").write_text("make_demo\t3\npretrain\t22\nbaseline_seed0\t95\nbaseline_seed1\t105\n"
                                      "baseline_matched_lr_seed0\t20\nbaseline_matched_lr_seed1\t20\n"
                                      "pretrained_seed0\t18\npretrained_seed1\t20\ncross_dataset\t9\n")
    return root


def test_summary_reports_mean_and_sample_std_over_seeds_and_paired_differences(results_dir):
    result = run_cli("tools/summarize_experiment.py", results_dir)
    assert result.returncode == 0, result.stderr
    summary = (results_dir / "summary.md").read_text()
    assert "Demo data" not in summary
    assert RANDOM_ANCHORS_NOTE in summary
    assert "Stage 1 (22s): zero-shot SRCC/PLCC of the encoder on the KonIQ-10k validation split: 0.3500 / 0.5000" \
        in summary
    assert "overall 0.925 (blur 0.950, noise 0.900)" in summary
    assert "sample standard deviation (ddof 1)" in summary and "Fine-tune seeds: 0, 1 (2)" in summary
    baseline, matched, pretrained = (table_rows(summary, label)[0] for label in LABELS)
    # mean ± sample std of (0.80, 0.82) and (0.84, 0.86): 0.81 ± 0.0141, 0.85 ± 0.0141
    assert baseline == [LABELS[0], "ImageNet", "5e-06 / 5e-05", "0.8100 ± 0.0141 / 0.8500 ± 0.0141", "3, 2", "1.7min"]
    assert matched[1:3] == ["ImageNet", "1e-06 / 5e-05"]
    # the pretrained model's time includes Stage 1
    assert pretrained[1:3] == ["Stage-1 encoder", "1e-06 / 5e-05"] and pretrained[5] == "22s + 19s = 41s"
    # pretraining effect, paired by seed: SRCC 0.83-0.78 = 0.05 and 0.86-0.79 = 0.07 -> +0.06 ± 0.0141;
    # PLCC 0.05 and 0.03 -> +0.04 ± 0.0141; SPAQ SRCC 0.10 and 0.02 -> +0.06 ± 0.0566
    effect = table_rows(summary, f"{LABELS[2]} − {LABELS[1]}")[0]
    assert effect[1] == "initialisation only: **the pretraining effect**"
    assert effect[2] == "+0.0600 ± 0.0141 / +0.0400 ± 0.0141"
    assert effect[3].startswith("+0.0600 ± 0.0566 / ")
    lr_effect = table_rows(summary, f"{LABELS[1]} − {LABELS[0]}")[0]
    assert lr_effect[2] == "-0.0250 ± 0.0071 / -0.0350 ± 0.0071"
    assert "| Model | SPAQ |" in summary
    assert table_rows(summary, LABELS[0])[1] == [LABELS[0], "0.6200 ± 0.0141 / 0.6100 ± 0.0141"]

    data = json.loads((results_dir / "summary.json").read_text())
    assert data["demo_data"] is False and data["pretrain"]["random_anchors"] is True
    srcc = data["models"]["pretrained"]["koniq_test"]["srcc"]
    assert srcc["values"] == [0.83, 0.86] and srcc["n"] == 2
    assert srcc["mean"] == pytest.approx(np.mean([0.83, 0.86])) and srcc["std"] == pytest.approx(np.std([0.83, 0.86], ddof=1))
    spaq = data["differences"]["pretrained-baseline_matched_lr"]["spaq"]["srcc"]
    assert spaq["values"] == pytest.approx([0.10, 0.02])
    for png in ("curves.png", "scatter_koniq_test.png"):
        assert (results_dir / png).read_bytes()[:8] == PNG_MAGIC


def test_summary_demo_note_only_with_demo_and_anchor_note_only_for_random_anchors(results_dir, tmp_path):
    torch.save({"text_features": torch.eye(2, 8), "random": False}, tmp_path / "anchors.pt")
    result = run_cli("tools/summarize_experiment.py", results_dir, "--demo")
    assert result.returncode == 0, result.stderr
    summary = (results_dir / "summary.md").read_text()
    assert summary.count("**Demo data.**") == 1 and RANDOM_ANCHORS_NOTE not in summary
    assert json.loads((results_dir / "summary.json").read_text())["demo_data"] is True

    (results_dir / "pretrained" / "seed_1" / "results.json").unlink()
    assert_user_error(run_cli("tools/summarize_experiment.py", results_dir), "pretrained", "results.json", "missing")
    shutil.rmtree(results_dir / "pretrained" / "seed_1")
    assert_user_error(run_cli("tools/summarize_experiment.py", results_dir), "different seeds")


def test_qualiclip_recipe_trains_the_clip_encoder_and_writes_the_opinion_unaware_table(tmp_path):
    demo, out = tmp_path / "demo", tmp_path / "results"
    # The demo of --demo_size 10 built beforehand (the pipeline keeps it), so that Stage 1 can train on two of
    # its images: one step of the random RN50 (seconds each on 2 CPU cores) instead of three.
    build_demo(demo, n_koniq=10, n_others=3)
    split = write_small_train_split(demo / "koniq-10k", tmp_path / "split.json")
    result = run_pipeline("--demo", "--qualiclip", "--demo_dir", demo, "--demo_size", "10", "--epochs_pretrain", "1",
                          "--output", out, "--pretrain_args", "--crop_size 64 --resize 64 --num_levels 2 --batch_size 2 "
                          "--level_eval_images 2 --max_distortions 2 --eval_patch_num 1 "
                          f"--split_file {tmp_path / 'split.json'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    args = json.loads((out / "pretrain" / "args.json").read_text())
    assert (args["encoder"], args["degradations"], args["imagenet_pretrained"]) == ("clip", "arniqa", False)
    encoder = out / "pretrain" / "clip_RN50_qualiclip_pretrained.pkl"
    ckpt = torch.load(encoder, weights_only=True)
    assert ckpt["format"] == "qualiclip-clip-encoder/1" and len(ckpt["train_images"]) == len(split["train"]) == 2
    table = json.loads((out / "opinion_unaware.json").read_text())
    assert list(table) == [str(encoder)]
    # every image of every demo dataset: KonIQ-10k's 10 (all splits), 3 of each other one
    assert {name: m["n"] for name, m in table[str(encoder)].items()} == \
        {"koniq-10k": 10, "spaq": 3, "kadid-10k": 3, "agiqa-3k": 3, "livec": 3}
    assert all(-1 <= m["srcc"] <= 1 for m in table[str(encoder)].values())
    markdown = (out / "opinion_unaware.md").read_text()
    assert "none (opinion-unaware)" in markdown and "| koniq-10k SRCC/PLCC |" in markdown
    # only Step 1 and its evaluation: no fine-tune, no summary
    timings = dict(line.split("\t") for line in (out / "timings.tsv").read_text().splitlines())
    assert set(timings) == {"make_demo", "text_anchors", "pretrain", "opinion_unaware"}
    assert not (out / "baseline").exists() and not (out / "summary.md").exists()
