"""Stage-1 data pipeline and the pretrain_qualiclip.py CLI, end to end."""
import argparse
import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from iqa.patches import IMAGENET_MEAN, IMAGENET_STD
from iqa.runtime import UserError
from models.swin_backbone import create_swin
from qualiclip_pretrain.degradation_generator import DISTORTION_TYPES, LEVEL_PARAMS
from qualiclip_pretrain.pretrain_dataset import PretrainDataset, overlapping_offsets
from tests.helpers import assert_user_error, run_cli

CROP = 32


def coordinate_image(path, width=120, height=90):
    """R = x, G = y: every crop's position can be read back from its pixels."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    array = np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    Image.fromarray(array).save(path)
    return array


def test_overlapping_offsets_stay_inside_and_within_half_a_crop():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        a, b = overlapping_offsets(rng, 100, CROP)
        assert 0 <= a <= 100 - CROP and 0 <= b <= 100 - CROP
        assert abs(a - b) <= CROP // 2


def test_two_crops_overlap_and_share_type(tmp_path):
    array = coordinate_image(tmp_path / "img.png")
    dataset = PretrainDataset([str(tmp_path / "img.png")], crop_size=CROP, distortion_types=["blur", "noise"],
                              num_levels=5, degrade_on="device", seed=3)
    seen_types = set()
    for epoch in range(20):
        dataset.set_epoch(epoch)
        item = dataset[0]
        crops = item["crops"]
        assert crops.shape == (2, 5, 3, CROP, CROP) and crops.dtype == torch.uint8
        (x1, y1), (x2, y2) = [(int(c[0, 0, 0, 0]), int(c[0, 1, 0, 0])) for c in crops]
        assert abs(x1 - x2) <= CROP // 2 and abs(y1 - y2) <= CROP // 2
        for view, (x, y) in zip(crops, [(x1, y1), (x2, y2)]):
            expected = torch.from_numpy(array[y:y + CROP, x:x + CROP]).permute(2, 0, 1)
            # device mode leaves blur/noise rows clean for the batched path: every level is the crop
            assert all(torch.equal(level, expected) for level in view)
        seen_types.add(DISTORTION_TYPES[item["distortion_type"]])
    assert seen_types == {"blur", "noise"}


def test_curriculum_epochs_draw_only_the_curriculum_types(tmp_path):
    coordinate_image(tmp_path / "img.png")
    paths = [str(tmp_path / "img.png")] * 8
    dataset = PretrainDataset(paths, crop_size=CROP, distortion_types=["blur", "jpeg", "noise"], num_levels=2,
                              seed=1, curriculum_types=["blur", "jpeg"], curriculum_epochs=3)
    seen = {}
    for epoch in range(6):
        dataset.set_epoch(epoch)
        seen[epoch] = {DISTORTION_TYPES[dataset[i]["distortion_type"]] for i in range(len(paths))}
    assert all(seen[epoch] == {"blur", "jpeg"} for epoch in range(3)), seen
    assert set().union(*(seen[epoch] for epoch in range(3, 6))) == {"blur", "jpeg", "noise"}, seen
    with pytest.raises(UserError, match="--curriculum_types"):
        PretrainDataset(paths, crop_size=CROP, distortion_types=["blur", "noise"], curriculum_types=["jpeg"],
                        curriculum_epochs=1)


def test_worker_jpeg_levels_match_pil_on_both_crops(tmp_path):
    coordinate_image(tmp_path / "img.png")
    paths = [str(tmp_path / "img.png")]
    # Same seed: the crop offsets are drawn before the type, so a device-mode blur dataset
    # yields the clean crops at exactly the positions the JPEG dataset used.
    clean = PretrainDataset(paths, crop_size=CROP, distortion_types=["blur"], num_levels=3, seed=5)[0]["crops"]
    jpeg = PretrainDataset(paths, crop_size=CROP, distortion_types=["jpeg"], num_levels=3, seed=5,
                           degrade_on="worker")[0]["crops"]
    assert jpeg.shape == (2, 3, 3, CROP, CROP)
    for clean_view, jpeg_view in zip(clean, jpeg):
        crop = Image.fromarray(clean_view[0].permute(1, 2, 0).numpy())
        for level, quality in enumerate((85, 55, 25)):
            buffer = io.BytesIO()
            crop.save(buffer, format="JPEG", quality=quality, subsampling=2)
            expected = torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1)
            assert torch.equal(jpeg_view[level], expected)


def test_small_and_grayscale_images_are_upscaled_not_rejected(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8), "L").save(tmp_path / "g.png")
    dataset = PretrainDataset([str(tmp_path / "g.png")], crop_size=CROP, num_levels=2)
    assert dataset[0]["crops"].shape == (2, 2, 3, CROP, CROP)


def test_normalisation_happens_after_degradation(tmp_path):
    from qualiclip_pretrain.engine import prepare_batch

    coordinate_image(tmp_path / "img.png")
    dataset = PretrainDataset([str(tmp_path / "img.png")], crop_size=CROP, distortion_types=["brightness"],
                              num_levels=5)
    item = dataset[0]
    batch = {"crops": item["crops"].unsqueeze(0), "distortion_type": torch.tensor([item["distortion_type"]])}
    args = argparse.Namespace(degrade_on="device", channels_last=False)
    images, shape = prepare_batch(batch, [0, 1, 2, 3, 4], args, torch.device("cpu"), torch.Generator())
    assert shape == (1, 2, 5) and images.shape == (10, 3, CROP, CROP)
    clean = item["crops"][0, 0].double()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    for level, factor in enumerate(LEVEL_PARAMS["brightness"]):
        # float32 product, as an 8-bit pipeline computes it (5 × 1.3 must round as 6.4999998)
        degraded = torch.clamp(torch.round(clean.float() * factor), 0, 255).double()
        expected = (degraded / 255 - mean) / std
        assert torch.allclose(images[level].double(), expected, atol=1e-5)
    # the original script normalised first: brightness would then scale the normalised values
    wrong = ((clean / 255 - mean) / std) * LEVEL_PARAMS["brightness"][4]
    assert not torch.allclose(images[4].double(), wrong, atol=1e-2)


# ----------------------------------------------------------------------------- CLI

def write_images(folder, count=6, size=(96, 80)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


# batches of 16: one step per epoch on the few training images of these tests
PRETRAIN_FAST = ["--model_size", "nano", "--no_imagenet_pretrained", "--batch_size", "16", "--num_workers", "0",
                 "--crop_size", "64", "--num_levels", "3", "--eval_patch_num", "1"]


@pytest.mark.slow
def test_cli_writes_encoder_that_loads_into_fresh_swin(tmp_path, text_features_file):
    images = write_images(tmp_path / "clean")
    save_dir = tmp_path / "run"
    result = run_cli("pretrain_qualiclip.py", "--image_dir", images, "--text_features", text_features_file,
                     "--epochs", "2", "--save_dir", save_dir, "--save_freq", "1", "--tensorboard", "--log_every", "1",
                     *PRETRAIN_FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    pkl = save_dir / "swin_nano_qualiclip_pretrained.pkl"
    ckpt = torch.load(pkl, weights_only=True)
    assert ckpt["format"] == "qualiclip-swin-encoder/1" and ckpt["model_size"] == "nano"
    assert torch.allclose(ckpt["text_features"], torch.load(text_features_file, weights_only=True))
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["epochs"] == 2
    swin = create_swin("nano")
    swin.load_state_dict(ckpt["encoder"], strict=True)
    assert (save_dir / "swin_nano_qualiclip_pretrained_epoch1.pkl").is_file()
    log = [json.loads(line) for line in (save_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(np.isfinite(r[k]) for r in log for k in ("train_loss", "train_cons", "train_pos", "train_neg"))
    assert json.loads((save_dir / "args.json").read_text())["model_size"] == "nano"
    assert (save_dir / "curves.png").stat().st_size > 0 and (save_dir / "results.json").is_file()
    # encoder weights really were trained (they differ from a fresh random init of the same seed's run)
    last = torch.load(save_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and set(last) >= {"model", "optimizer", "scheduler", "scaler", "rng"}
    # --tensorboard: the log's numbers per epoch, and the running loss at every read-back (--log_every 1)
    events = EventAccumulator(str(save_dir / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "feature_spread"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(r["epoch"], pytest.approx(r[key])) for r in log]
    assert [e.value for e in events.Scalars("lr/encoder")] == pytest.approx([r["lr"]["encoder"] for r in log])
    assert [e.value for e in events.Scalars("level_ranking_accuracy/overall")] == pytest.approx(
        [r["level_ranking_accuracy"]["overall"] for r in log])
    steps = [e.step for e in events.Scalars("step/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % 2 == 0  # both epochs, every step


@pytest.mark.slow
def test_cli_on_koniq_reports_zero_shot_validation(tmp_path, demo_root, text_features_file):
    save_dir = tmp_path / "run"
    result = run_cli("pretrain_qualiclip.py", "--data_root", demo_root / "koniq-10k", "--text_features",
                     text_features_file, "--epochs", "1", "--save_dir", save_dir, *PRETRAIN_FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((save_dir / "log.jsonl").read_text().splitlines()[0])
    assert -1 <= record["val"]["srcc"] <= 1 and record["val"]["n"] > 0
    results = json.loads((save_dir / "results.json").read_text())
    assert results["zero_shot_val"] == record["val"]
    assert (save_dir / "scatter_zero_shot_val.png").is_file()


@pytest.mark.slow
def test_offline_without_clip_weights_stops_at_once(tmp_path):
    images = write_images(tmp_path / "clean", count=2)
    start = time.time()
    result = run_cli("pretrain_qualiclip.py", "--image_dir", images, "--save_dir", tmp_path / "run", *PRETRAIN_FAST,
                     env={"HF_HOME": str(tmp_path / "empty_hf"), "XDG_CACHE_HOME": str(tmp_path / "empty_cache")})
    elapsed = time.time() - start
    line = assert_user_error(result, "--clip_weights", "--text_features")
    assert elapsed < 60, f"took {elapsed:.0f}s: {line}"
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_offline_without_imagenet_weights_stops_at_once(tmp_path, text_features_file):
    images = write_images(tmp_path / "clean", count=2)
    start = time.time()
    result = run_cli("pretrain_qualiclip.py", "--image_dir", images, "--text_features", text_features_file,
                     "--model_size", "tiny", "--save_dir", tmp_path / "run", "--num_workers", "0",
                     env={"HF_HOME": str(tmp_path / "empty_hf")})
    assert_user_error(result, "--backbone_weights", "--no_imagenet_pretrained")
    assert time.time() - start < 60


@pytest.mark.slow
@pytest.mark.parametrize("flags, fragment", [
    (["--num_levels", "7"], "--num_levels"),
    (["--distortion_types", "blur", "rain"], "--distortion_types"),
    (["--distortion_types", "blur", "noise", "--curriculum_types", "jpeg", "--curriculum_epochs", "1"],
     "--curriculum_types"),
])
def test_bad_flags_are_one_line_errors(tmp_path, text_features_file, flags, fragment):
    images = write_images(tmp_path / "clean", count=2)
    result = run_cli("pretrain_qualiclip.py", "--image_dir", images, "--text_features", text_features_file,
                     "--save_dir", tmp_path / "run", *PRETRAIN_FAST, *flags)
    assert_user_error(result, fragment)
    assert not (tmp_path / "run").exists()
