"""Stage 1's --all_types_per_image: every type's ladder on the same two crops of an image, checked
against scipy / PIL on the pixels, in the workers and on the device."""
import argparse
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import default_collate

from iqa.patches import IMAGENET_MEAN, IMAGENET_STD
from iqa.runtime import UserError
from qualiclip_pretrain.degradation_generator import DISTORTION_TYPES, LEVEL_PARAMS
from qualiclip_pretrain.engine import prepare_batch
from qualiclip_pretrain.pretrain_dataset import PretrainDataset
from tests.helpers import run_cli

CROP = 32
TYPES = ["blur", "jpeg", "noise"]
LEVELS = [0, 2, 4]  # --num_levels 3


def textured_image(path, seed=0, size=(80, 60)):
    """Smooth random texture in 60..190: blur changes it, and noise up to σ 25 rarely clips."""
    rng = np.random.default_rng(seed)
    array = ndimage.gaussian_filter(rng.uniform(0, 255, (size[1], size[0], 3)), (1.5, 1.5, 0))
    array = 60 + 130 * (array - array.min()) / (array.max() - array.min())
    Image.fromarray(array.round().astype(np.uint8)).save(path)
    return str(path)


def expected_blur(clean, sigma):
    """scipy's Gaussian (mirror borders, truncate 4) of a (3, S, S) uint8 crop, rounded as an 8-bit image."""
    blurred = ndimage.gaussian_filter(clean.numpy().astype(np.float64), (0, sigma, sigma), mode="mirror", truncate=4)
    return np.clip(np.rint(blurred), 0, 255)


def expected_jpeg(clean, quality):
    buffer = io.BytesIO()
    Image.fromarray(clean.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality, subsampling=2)
    return np.asarray(Image.open(buffer).convert("RGB")).transpose(2, 0, 1).astype(np.float64)


def check_ladders(ladders, clean_crops, type_names):
    """``ladders`` (T, 2, L, 3, S, S) pixel values: each type at LEVELS of both clean crops."""
    for ladder, name in zip(ladders, type_names):
        for view, clean in zip(ladder, clean_crops):
            for row, level in zip(view, LEVELS):
                param = LEVEL_PARAMS[name][level]
                if name == "blur":
                    assert np.abs(row - expected_blur(clean, param)).max() <= 1, param
                elif name == "jpeg":
                    assert np.array_equal(row, expected_jpeg(clean, param)), param
                else:
                    assert abs(((row - clean.numpy()) / param).std() - 1) < 0.1, param
            if name == "noise":
                # one field per crop, the levels differ only in σ (within rounding; clipped pixels left out)
                unclipped = ((view > 0) & (view < 255)).all(axis=0)
                fields = [(row - clean.numpy())[unclipped] / LEVEL_PARAMS["noise"][level]
                          for row, level in zip(view, LEVELS)]
                assert np.abs(fields[0] - fields[-1]).max() <= 0.5 / 5 + 0.5 / 25 + 1e-9


def clean_crops_of(paths, seed, index=0):
    """The two clean crops of image ``index`` that a dataset of ``seed`` cuts (offsets are drawn first,
    whatever the flags)."""
    return PretrainDataset(paths, CROP, ["blur"], 3, "device", seed)[index]["crops"][:, 0]


def test_worker_items_carry_every_type_on_the_same_crops(tmp_path):
    path = textured_image(tmp_path / "img.png")
    dataset = PretrainDataset([path], CROP, TYPES, 3, "worker", seed=4, all_types=True)
    item = dataset[0]
    assert item["crops"].shape == (3, 2, 3, 3, CROP, CROP) and item["crops"].dtype == torch.uint8
    assert item["distortion_type"].tolist() == [DISTORTION_TYPES.index(name) for name in TYPES]
    check_ladders(item["crops"].numpy().astype(np.float64), clean_crops_of([path], 4), TYPES)


def test_device_batch_gives_every_image_and_type_a_ladder(tmp_path):
    paths = [textured_image(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    dataset = PretrainDataset(paths, CROP, TYPES, 3, "device", seed=7, all_types=True)
    batch = default_collate([dataset[0], dataset[1]])
    args = argparse.Namespace(degrade_on="device", channels_last=False)
    images, shape = prepare_batch(batch, LEVELS, args, torch.device("cpu"), torch.Generator().manual_seed(0))
    # B images x T types ladders, image-major, as the loss's batch axis
    assert shape == (2 * 3, 2, 3) and images.shape == (2 * 3 * 2 * 3, 3, CROP, CROP)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    pixels = ((images.double() * std + mean) * 255).round().numpy().reshape(2, 3, 2, 3, 3, CROP, CROP)
    for i in range(len(paths)):
        check_ladders(pixels[i], clean_crops_of(paths, 7, i), TYPES)


def test_curriculum_epochs_carry_only_the_curriculum_ladders(tmp_path):
    path = textured_image(tmp_path / "img.png")
    dataset = PretrainDataset([path], CROP, TYPES, 2, "device", seed=1, curriculum_types=["noise"],
                              curriculum_epochs=1, all_types=True)
    assert dataset[0]["distortion_type"].tolist() == [DISTORTION_TYPES.index("noise")]
    dataset.set_epoch(1)
    assert dataset[0]["crops"].shape == (3, 2, 2, 3, CROP, CROP)


def test_arniqa_refuses_all_types_per_image(tmp_path):
    with pytest.raises(UserError, match="--degradations original"):
        PretrainDataset([textured_image(tmp_path / "img.png")], CROP, degradations="arniqa", all_types=True)


@pytest.mark.slow
def test_cli_trains_on_every_type_per_image(tmp_path, text_features_file):
    images = tmp_path / "clean"
    images.mkdir()
    for i in range(4):
        textured_image(images / f"{i}.png", seed=i, size=(96, 80))
    save_dir = tmp_path / "run"
    result = run_cli("pretrain_qualiclip.py", "--image_dir", images, "--text_features", text_features_file,
                     "--save_dir", save_dir, "--epochs", "1", "--model_size", "nano", "--no_imagenet_pretrained",
                     "--batch_size", "2", "--num_workers", "0", "--crop_size", "64", "--num_levels", "3",
                     "--distortion_types", "blur", "noise", "--all_types_per_image", "--heldout_fraction", "0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((save_dir / "args.json").read_text())["all_types_per_image"] is True
    record = json.loads((save_dir / "log.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["train_loss"]) and set(record["level_ranking_accuracy"]) == {"blur", "noise", "overall"}
