"""No leakage between the stages: one split for both, the Stage-1 images recorded in the .pkl, and
Stage 2 refusing to validate or test on an image Stage 1 trained on; zero-shot scores in eval mode."""
import csv
import json
import os
import shutil

import pytest
import torch

from iqa.datasets import read_index
from tests.helpers import assert_user_error, run_cli

NANO = ("--model_size", "nano", "--no_imagenet_pretrained", "--device", "cpu", "--num_workers", "0")
STAGE1 = (*NANO, "--batch_size", "2", "--crop_size", "64", "--num_levels", "2", "--resize", "96",
          "--epochs", "1")
STAGE2 = (*NANO, "--batch_size", "8", "--train_patch_num", "1", "--test_patch_num", "1", "--resize", "224",
          "--epochs", "1")


def koniq_without_sets_file(demo_root, tmp_path):
    """A KonIQ-10k root with only the scores file: every split is the seeded 70/10/20."""
    root = tmp_path / "koniq-10k"
    shutil.copytree(demo_root / "koniq-10k", root)
    (root / "koniq10k_distributions_sets.csv").unlink()
    return root


@pytest.fixture(scope="module")
def stage1(demo_root, tmp_path_factory, text_features_file):
    """A Stage-1 run on a KonIQ root without a sets file, with Stage 1's default run seed (42)."""
    tmp = tmp_path_factory.mktemp("stage1")
    root = koniq_without_sets_file(demo_root, tmp)
    save_dir = tmp / "pretrain"
    result = run_cli("pretrain_qualiclip.py", "--data_root", root, "--text_features", text_features_file,
                     "--save_dir", save_dir, "--drop_path_rate", "0.5", "--eval_patch_num", "2", *STAGE1)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, save_dir, save_dir / "swin_nano_qualiclip_pretrained.pkl"


@pytest.mark.slow
def test_stage1_records_exactly_its_training_split(stage1):
    root, _, pkl = stage1
    trained = torch.load(pkl, weights_only=True)["train_images"]
    samples = read_index("koniq-10k", root, seed=0)
    expected = sorted(os.path.relpath(s.path, root) for s in samples if s.split == "train")
    assert sorted(trained) == expected and len(trained) > 0
    assert all(name.startswith("512x384" + os.sep) for name in trained)


@pytest.mark.slow
def test_different_run_seeds_share_one_split_and_the_fine_tune_starts(stage1, tmp_path):
    root, _, pkl = stage1
    out = tmp_path / "finetune"
    result = run_cli("train_swin.py", "--data_root", root, "--pretrained_encoder", pkl, "--seed", "7",
                     "--output_dir", out, *STAGE2)
    assert result.returncode == 0, result.stderr[-3000:]
    split = json.loads((out / "split.json").read_text())
    trained = {os.path.basename(name) for name in torch.load(pkl, weights_only=True)["train_images"]}
    assert split["val"] and split["test"]
    assert trained.isdisjoint(split["val"]) and trained.isdisjoint(split["test"])
    assert trained == set(split["train"])


@pytest.mark.slow
def test_fine_tune_on_another_split_is_refused_and_writes_nothing(stage1, tmp_path):
    root, _, pkl = stage1
    samples = read_index("koniq-10k", root, seed=5)
    trained = {os.path.basename(n) for n in torch.load(pkl, weights_only=True)["train_images"]}
    held_out = [os.path.basename(s.path) for s in samples if s.split in ("val", "test")]
    overlap = sum(name in trained for name in held_out)
    assert overlap > 0  # the seeded splits of seed 0 and seed 5 differ on this root
    out = tmp_path / "refused"
    result = run_cli("train_swin.py", "--data_root", root, "--pretrained_encoder", pkl, "--split_seed", "5",
                     "--output_dir", out, *STAGE2)
    line = assert_user_error(result, f"trained on {overlap} of the {len(held_out)} validation/test images",
                             "--split_seed 0", "--split_file", "--allow_pretrain_overlap")
    example = line.split("(e.g. ")[1].split(")")[0]
    assert example in trained and example in held_out
    assert not out.exists()


@pytest.mark.slow
def test_overlap_can_be_accepted_knowingly(stage1, tmp_path):
    root, _, pkl = stage1
    out = tmp_path / "accepted"
    result = run_cli("train_swin.py", "--data_root", root, "--pretrained_encoder", pkl, "--split_seed", "5",
                     "--allow_pretrain_overlap", "--output_dir", out, *STAGE2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning:" in result.stdout and "not a clean evaluation" in result.stdout
    assert (out / "results.json").is_file()


def test_hyperiqa_json_split_files_keep_validation_apart(demo_root, tmp_path):
    """With koniq_train.json / koniq_test.json, validation is carved from train by the split seed:
    both stages carve the same images, whatever their run seeds."""
    root = koniq_without_sets_file(demo_root, tmp_path)
    names = sorted(os.listdir(root / "512x384"))
    (root / "koniq_train.json").write_text(json.dumps([{"image": f"koniq_train/{n}"} for n in names[:18]]))
    (root / "koniq_test.json").write_text(json.dumps([{"image": f"koniq_test/{n}"} for n in names[18:]]))
    from pretrain_qualiclip import check_args, get_args_parser
    from qualiclip_pretrain.engine import load_images

    args = get_args_parser().parse_args(["--data_root", str(root), "--seed", "123"])
    check_args(args)
    train, heldout, val = load_images(args)
    stage2 = read_index("koniq-10k", root, seed=0)
    stage1_train = {os.path.basename(path) for path, _ in train}
    stage2_val_test = {os.path.basename(s.path) for s in stage2 if s.split in ("val", "test")}
    assert stage1_train and stage1_train.isdisjoint(stage2_val_test)
    assert {os.path.basename(p) for p in heldout} == {os.path.basename(s.path) for s in stage2 if s.split == "val"}


def test_image_dir_holds_out_a_seeded_fraction(tmp_path):
    from PIL import Image

    from pretrain_qualiclip import check_args, get_args_parser
    from qualiclip_pretrain.engine import load_images

    folder = tmp_path / "clean"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (40, 30), (i, 2 * i, 3 * i)).save(folder / f"{i:02d}.png")
    parse = get_args_parser().parse_args
    runs = []
    for seed in ("1", "2"):
        args = parse(["--image_dir", str(folder), "--heldout_fraction", "0.1", "--seed", seed])
        check_args(args)
        runs.append(load_images(args))
    (train, heldout, val), (train2, heldout2, _) = runs
    assert len(heldout) == 4 and len(train) == 36 and val == []
    assert set(heldout).isdisjoint(path for path, _ in train)
    assert heldout == heldout2 and train == train2  # the run seed does not move the held-out images


@pytest.mark.slow
def test_stage1_zero_shot_validation_equals_cross_dataset_test(demo_root, tmp_path, text_features_file):
    """Eval mode everywhere: with stochastic depth 0.5 a train-mode score would change per call."""
    root = demo_root / "koniq-10k"
    names = sorted(os.listdir(root / "512x384"))
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": names[:10], "val": names[10:]}))
    save_dir = tmp_path / "pretrain"
    result = run_cli("pretrain_qualiclip.py", "--data_root", root, "--split_file", split_file, "--text_features",
                     text_features_file, "--save_dir", save_dir, "--drop_path_rate", "0.5", "--eval_patch_num", "2",
                     *STAGE1)
    assert result.returncode == 0, result.stderr[-3000:]
    val = [s for s in read_index("koniq-10k", root, split_file=split_file) if s.split == "val"]
    table = tmp_path / "val.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mos"])
        writer.writerows([s.path, s.mos] for s in val)
    out = tmp_path / "cross.json"
    pkl = save_dir / "swin_nano_qualiclip_pretrained.pkl"
    result = run_cli("cross_dataset_test.py", "--checkpoint", pkl, "--datasets", f"csv={table}", "--output", out,
                     "--device", "cpu", "--num_workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    cross = json.loads(out.read_text())[str(pkl)]["csv"]
    stage1_val = json.loads((save_dir / "results.json").read_text())["zero_shot_val"]
    logged = json.loads((save_dir / "log.jsonl").read_text().splitlines()[-1])["val"]
    assert cross["n"] == stage1_val["n"] == len(val) == len(names) - 10
    for key in ("srcc", "plcc", "krcc"):
        assert cross[key] == pytest.approx(stage1_val[key], abs=1e-6)
        assert logged[key] == pytest.approx(stage1_val[key], abs=1e-6)
