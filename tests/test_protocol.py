"""--protocol hyperiqa: HyperIQA's splits, crops, resize and label, shared by both stages, the
protocol stated in results.json and the summary, and the pipeline's one-round-per-seed layout."""
import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train_swin
from iqa.datasets import read_index
from iqa.patches import EvalPatchDataset, grid_offsets, load_resized
from iqa.runtime import UserError
from tests.helpers import ROOT, assert_user_error, run_cli, run_pipeline

NANO = ("--model_size", "nano", "--no_imagenet_pretrained", "--device", "cpu", "--num_workers", "0")
STAGE1 = ("--batch_size", "2", "--crop_size", "64", "--num_levels", "2", "--resize", "96", "--epochs", "1",
          "--eval_patch_num", "1")
# a batch holds a round's training patches (about 17 images x 2): one step per round
FAST_STAGE2 = ("--train_patch_num", "2", "--test_patch_num", "3", "--batch_size", "40", "--epochs", "1")


def by_split(samples):
    return {split: {os.path.basename(s.path) for s in samples if s.split == split} for split in ("train", "val", "test")}


def parse(*flags):
    args = train_swin.get_args_parser().parse_args(list(map(str, flags)))
    train_swin.check_args(args)
    return args


# ----------------------------------------------------------------------------- splits

def test_hyperiqa_split_is_80_20_with_validation_carved_from_the_80(demo_root, tmp_path):
    root = demo_root / "koniq-10k"
    n = len(read_index("koniq-10k", root))
    rounds = [by_split(read_index("koniq-10k", root, seed=seed, protocol="hyperiqa")) for seed in (0, 1, 2)]
    for parts in rounds:
        train, val, test = parts["train"], parts["val"], parts["test"]
        assert not (train & val or train & test or val & test)
        assert len(train | val | test) == n == 24
        # HyperIQA: round(0.8 * 24) = 19 training images, 5 test; validation = round(19 / 8) = 2 of the 19
        assert (len(train | val), len(test), len(val)) == (19, 5, 2)
    assert rounds[0]["test"] != rounds[1]["test"] != rounds[2]["test"]
    # HyperIQA ignores KonIQ's official koniq10k_distributions_sets.csv: the rounds are the same without it
    bare = tmp_path / "koniq-10k"
    shutil.copytree(root, bare)
    (bare / "koniq10k_distributions_sets.csv").unlink()
    assert by_split(read_index("koniq-10k", bare, seed=1, protocol="hyperiqa")) == rounds[1]
    assert by_split(read_index("koniq-10k", root)) != by_split(read_index("koniq-10k", bare))


def test_kadid_rounds_split_whole_reference_images(demo_root):
    samples = read_index("kadid-10k", demo_root / "kadid-10k", seed=4, protocol="hyperiqa")
    split_of_ref = {}
    for s in samples:
        assert split_of_ref.setdefault(s.ref, s.split) == s.split
    refs = sorted(split_of_ref)
    n_train = round(0.8 * len(refs))
    assert sum(split_of_ref[r] in ("train", "val") for r in refs) == n_train
    assert sum(split_of_ref[r] == "val" for r in refs) == max(1, round(n_train / 8))


def test_split_file_is_refused_under_hyperiqa(demo_root, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(UserError, match="--split_file .* cannot be used with --protocol hyperiqa"):
        read_index("koniq-10k", demo_root / "koniq-10k", split_file=split, protocol="hyperiqa")


def test_both_stages_draw_the_same_round_split_whatever_the_run_seed(demo_root):
    from pretrain_qualiclip import check_args, get_args_parser
    from qualiclip_pretrain.engine import load_images

    root = demo_root / "koniq-10k"
    for split_seed in (5, 6):
        stage1 = []
        for seed in ("1", "99"):
            args = get_args_parser().parse_args(["--data_root", str(root), "--protocol", "hyperiqa",
                                                 "--split_seed", str(split_seed), "--seed", seed])
            check_args(args)
            train, heldout, val = load_images(args)
            stage1.append(({os.path.basename(p) for p, _ in train}, {os.path.basename(p) for p in heldout}))
        assert stage1[0] == stage1[1]
        for seed in (0, 7):
            stage2 = by_split(train_swin.read_dataset(parse("--protocol", "hyperiqa", "--data_root", root,
                                                            "--seed", seed), split_seed))
            assert stage1[0] == (stage2["train"], stage2["val"])  # Stage 1 never sees a Stage-2 test image


# ----------------------------------------------------------------------------- label, resize, crops

def test_koniq_label_is_mos_zscore_as_in_hyperiqa(demo_root):
    root = demo_root / "koniq-10k"
    with open(root / "koniq10k_scores_and_distributions.csv", newline="") as f:
        rows = {row["image_name"]: row for row in csv.DictReader(f)}
    hyperiqa = read_index("koniq-10k", root, protocol="hyperiqa")
    ours = read_index("koniq-10k", root)
    for a, b in zip(hyperiqa, ours):
        row = rows[os.path.basename(a.path)]
        assert a.mos == float(row["MOS_zscore"]) and b.mos == float(row["MOS"])
    assert any(float(r["MOS_zscore"]) != float(r["MOS"]) for r in rows.values())


def test_koniq_sets_file_without_zscore_is_a_clear_error(tmp_path):
    (tmp_path / "512x384").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "512x384" / "1.jpg")
    (tmp_path / "koniq10k_distributions_sets.csv").write_text('"image_name","MOS","set"\n"1.jpg",3.0,"training"\n')
    with pytest.raises(UserError, match="has no MOS_zscore column, the label HyperIQA trains on"):
        read_index("koniq-10k", tmp_path, protocol="hyperiqa")


def test_fixed_resize_equals_hyperiqas_torchvision_resize(tmp_path):
    from torchvision import transforms

    from iqa.datasets import Sample

    rng = np.random.default_rng(0)
    path = tmp_path / "koniq.png"
    Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(path)
    cached = load_resized(Sample(str(path), 50.0, None, "test"), [384, 512], 224)
    reference = transforms.Resize((512, 384))(Image.open(path).convert("RGB"))  # HyperIQA's KonIQ transform
    assert tuple(cached.shape) == (3, 512, 384)
    np.testing.assert_array_equal(cached.permute(1, 2, 0).numpy(), np.asarray(reference))


def test_protocol_defaults_and_explicit_flags_winning(demo_root):
    koniq = demo_root / "koniq-10k"
    ours = parse("--data_root", koniq)
    assert (ours.train_patch_num, ours.test_patch_num, ours.test_random_crop, ours.train_test_num, ours.epochs,
            ours.resize) == (5, 10, False, 1, 50, 384)
    hyper = parse("--protocol", "hyperiqa", "--data_root", koniq)
    assert (hyper.train_patch_num, hyper.test_patch_num, hyper.test_random_crop, hyper.train_test_num, hyper.epochs,
            hyper.resize) == (25, 25, True, 10, 16, [384, 512])
    assert parse("--protocol", "hyperiqa", "--dataset", "livec", "--data_root", demo_root / "livec").resize == 0
    assert parse("--protocol", "hyperiqa", "--dataset", "spaq", "--data_root", demo_root / "spaq").resize == 384
    explicit = parse("--protocol", "hyperiqa", "--data_root", koniq, "--train_patch_num", "3", "--train_test_num",
                     "2", "--epochs", "4", "--resize", "300x400", "--lr", "1e-5")
    assert (explicit.train_patch_num, explicit.train_test_num, explicit.epochs, explicit.resize, explicit.lr) == \
        (3, 2, 4, [300, 400], 1e-5)
    with pytest.raises(UserError, match="smaller than --patch_size 224"):
        parse("--data_root", koniq, "--resize", "200x400")


def test_random_test_crops_are_seeded_and_differ_from_the_grid():
    images = [torch.zeros(3, 512, 384, dtype=torch.uint8), torch.zeros(3, 300, 500, dtype=torch.uint8)]
    first, again, other = (EvalPatchDataset(images, 25, 224, random_crop=True, seed=s) for s in (3, 3, 4))
    assert first.offsets == again.offsets and first.offsets != other.offsets
    for offsets, image in zip(first.offsets, images):
        assert len(offsets) == 25 and offsets != grid_offsets(image.shape[1], image.shape[2], 224, 25)
        assert all(0 <= top <= image.shape[1] - 224 and 0 <= left <= image.shape[2] - 224 for top, left in offsets)
        assert len(set(offsets)) > 20  # random positions, not a few repeated ones


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_train_swin_hyperiqa_rounds_report_the_median_and_the_protocol(demo_root, tmp_path):
    root, out = demo_root / "koniq-10k", tmp_path / "run"
    result = run_cli(os.path.join(ROOT, "train_swin.py"), "--protocol", "hyperiqa", "--data_root", root,
                     "--train_test_num", "2", "--split_seed", "11", "--output_dir", out, *NANO, *FAST_STAGE2,
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    protocol = results["protocol"]
    assert protocol["name"] == "hyperiqa" and protocol["rounds"] == 2 and protocol["selection"] == "validation"
    assert (protocol["train_patch_num"], protocol["test_patch_num"], protocol["test_crops"]) == (2, 3, "random")
    assert protocol["label"] == "MOS_zscore" and protocol["resize"].startswith("384x512")
    assert "80/20" in protocol["split"]
    srcc = [r["test"]["srcc"] for r in results["rounds"]]
    assert results["summary"]["test"]["srcc"]["median"] == pytest.approx(np.median(srcc))
    splits = []
    for k in (1, 2):
        round_dir = out / f"round_{k}"
        assert json.loads((round_dir / "results.json").read_text())["protocol"] == {**protocol, "split_seed": 10 + k}
        split = json.loads((round_dir / "split.json").read_text())
        expected = by_split(read_index("koniq-10k", root, seed=11 + k - 1, protocol="hyperiqa"))
        assert {key: set(names) for key, names in split.items()} == expected
        with open(round_dir / "predictions_test.csv", newline="") as f:
            mos = {os.path.basename(r["image"]): float(r["mos"]) for r in csv.DictReader(f)}
        zscore = {os.path.basename(s.path): s.mos for s in read_index("koniq-10k", root, protocol="hyperiqa")}
        assert mos == {name: zscore[name] for name in split["test"]}
        splits.append(split)
    assert splits[0]["test"] != splits[1]["test"]
    assert "test over 2 rounds (protocol hyperiqa): SRCC median" in result.stdout


@pytest.mark.slow
def test_pipeline_hyperiqa_runs_one_round_per_seed_with_its_own_stage1(demo_root, tmp_path, text_features_file):
    out, missing = tmp_path / "results", tmp_path / "none"
    root = demo_root / "koniq-10k"
    result = run_pipeline(
        "--protocol", "hyperiqa", "--data_root", root, "--spaq_root", demo_root / "spaq", "--kadid_root", missing,
        "--agiqa_root", missing, "--livec_root", missing, "--model_size", "nano", "--epochs_pretrain", "1",
        "--epochs", "1", "--seeds", "2", "--split_seed", "3", "--output", out,
        "--pretrain_args", f"--text_features {text_features_file} --crop_size 64 --num_levels 2 --num_workers 0 "
                           "--eval_patch_num 1 --resize 96 --batch_size 16",
        # batches that hold a round's training split: one step per run
        "--", "--num_workers", "0", "--train_patch_num", "1", "--test_patch_num", "1", "--batch_size", "32",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for seed in (0, 1):
        split_seed = 3 + seed
        stage1 = json.loads((out / "pretrain" / f"seed_{seed}" / "args.json").read_text())
        assert (stage1["protocol"], stage1["split_seed"]) == ("hyperiqa", split_seed)
        pkl = out / "pretrain" / f"seed_{seed}" / "swin_nano_qualiclip_pretrained.pkl"
        trained = {os.path.basename(n) for n in torch.load(pkl, weights_only=True)["train_images"]}
        expected = by_split(read_index("koniq-10k", root, seed=split_seed, protocol="hyperiqa"))
        assert trained == expected["train"]
        for model in ("baseline", "baseline_matched_lr", "pretrained"):
            run_dir = out / model / f"seed_{seed}"
            args = json.loads((run_dir / "args.json").read_text())
            assert (args["protocol"], args["split_seed"], args["train_test_num"], args["seed"], args["resize"]) == \
                ("hyperiqa", split_seed, 1, seed, [384, 512])
            split = json.loads((run_dir / "split.json").read_text())
            assert set(split["test"]) == expected["test"]
        assert str(pkl) == json.loads((out / "pretrained" / f"seed_{seed}" / "args.json").read_text())[
            "pretrained_encoder"]
    assert not (out / "pretrain" / "results.json").exists()
    # a KonIQ-10k model trained at HyperIQA's fixed 384x512 scores SPAQ at the default shorter side
    cross = json.loads((out / "cross_dataset.json").read_text())
    assert len(cross) == 6 and all(set(per_set) == {"spaq"} for per_set in cross.values())
    summary = (out / "summary.md").read_text()
    assert "Protocol: hyperiqa" in summary and "split seeds 3, 4" in summary
    data = json.loads((out / "summary.json").read_text())
    assert data["protocol"] == "hyperiqa" and [r["split_seed"] for r in data["pretrain"]["per_round"]] == [3, 4]
    timings = dict(line.split("\t") for line in (out / "timings.tsv").read_text().splitlines())
    assert {"pretrain_seed0", "pretrain_seed1"} <= set(timings) and "pretrain" not in timings


# ----------------------------------------------------------------------------- summary tool

def metrics(srcc, plcc):
    return {"srcc": srcc, "plcc": plcc, "plcc_logistic": plcc, "krcc": srcc, "rmse": 0.5, "n": 20}


@pytest.mark.slow
def test_summary_puts_the_median_over_rounds_first_under_hyperiqa(tmp_path):
    """Three rounds whose median (0.80) differs from their mean (0.77)."""
    root = tmp_path / "results"
    test_srcc = {"baseline": (0.70, 0.80, 0.81), "baseline_matched_lr": (0.60, 0.62, 0.70),
                 "pretrained": (0.90, 0.85, 0.70)}
    record = {"name": "hyperiqa", "train_patch_num": 25, "test_patch_num": 25, "test_crops": "random",
              "resize": "384x512 (width x height, bilinear)", "label": "MOS_zscore", "targets": "rescaled",
              "rounds": 1}
    for model, values in test_srcc.items():
        for seed, value in enumerate(values):
            run_dir = root / model / f"seed_{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "results.json").write_text(json.dumps(
                {"best_epoch": 1, "val": metrics(0.9, 0.9), "test": metrics(value, value), "protocol": record}))
            (run_dir / "args.json").write_text(json.dumps(
                {"lr": 5e-6, "lr_ratio": 10, "lr_encoder_pretrained": 1e-6, "protocol": "hyperiqa",
                 "pretrained_encoder": "x.pkl" if model == "pretrained" else None, "split_seed": 3 + seed,
                 "match_pretrained_lr": model == "baseline_matched_lr"}))
            with open(run_dir / "predictions_test.csv", "w", newline="") as f:
                csv.writer(f).writerows([("image", "mos", "pred"), *((f"{i}.jpg", i, i / 2) for i in range(5))])
    for seed, zero_shot in enumerate((0.2, 0.5, 0.3)):
        stage1 = root / "pretrain" / f"seed_{seed}"
        stage1.mkdir(parents=True)
        (stage1 / "results.json").write_text(json.dumps({"zero_shot_val": metrics(zero_shot, zero_shot)}))
        (stage1 / "args.json").write_text(json.dumps({"split_seed": 3 + seed, "protocol": "hyperiqa"}))
    result = run_cli("tools/summarize_experiment.py", root)
    assert result.returncode == 0, result.stderr
    summary = (root / "summary.md").read_text()
    assert "Protocol: hyperiqa (HyperIQA's: 25 random training crops, 25 random test crops averaged" in summary
    assert "split seeds 3, 4, 5" in summary and "median over the rounds, with (mean ± sample standard" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| Baseline (No Pretrain) |"))
    mean, std = np.mean([0.70, 0.80, 0.81]), np.std([0.70, 0.80, 0.81], ddof=1)
    assert f"0.8000 (mean {mean:.4f} ± {std:.4f})" in row
    # paired differences pretrained - matched: 0.30, 0.23, 0.00 -> median +0.2300
    effect = next(line for line in summary.splitlines() if line.startswith("| QualiCLIP Pretrain − Baseline at"))
    assert re.search(r"\| \+0\.2300 \(mean \+0\.1767 ± 0\.\d{4}\) /", effect)
    assert "zero-shot SRCC/PLCC of the encoder on each round's validation part: 0.3000 (mean 0.3333" in summary

    (root / "pretrained" / "seed_0" / "args.json").write_text(json.dumps({"protocol": "ours", "lr": 1, "lr_ratio": 1}))
    assert_user_error(run_cli("tools/summarize_experiment.py", root), "different protocols")
