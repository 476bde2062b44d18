"""Stage-2 image cache and patch datasets (iqa/patches.py)."""
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from iqa import datasets
from iqa.datasets import Sample
from iqa.patches import EvalPatchDataset, TrainPatchDataset, cache_images, grid_offsets, resized_size

PATCH = 224


def write_image(path, width, height, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return Sample(str(path), float(seed), "train", f"list.csv:{seed + 2}")


def pil_resized(path, size):
    return np.asarray(Image.open(path).convert("RGB").resize(size, Image.BICUBIC)).transpose(2, 0, 1)


def locate(patch, image):
    """All (top, left) where ``patch`` (3×p×p) sits exactly in ``image`` (3×H×W)."""
    p = patch.shape[1]
    rows = sliding_window_view(image, (3, 1, p), axis=(0, 1, 2))[0]  # (H, W-p+1, 3, 1, p)
    first_row = (rows[..., 0, :] == patch[:, 0, :]).all(axis=(-2, -1))
    return [(int(t), int(l)) for t, l in zip(*np.nonzero(first_row))
            if t + p <= image.shape[1] and np.array_equal(image[:, t:t + p, l:l + p], patch)]


@pytest.fixture
def images_on_disk(tmp_path):
    # landscape, portrait, and one smaller than a patch (must be upscaled, never rejected)
    return [write_image(tmp_path / f"{i}.png", w, h, i) for i, (w, h) in enumerate([(400, 300), (260, 390), (120, 90)])]


def test_resized_size_keeps_aspect_and_fits_a_patch():
    assert resized_size(1024, 768, 384, PATCH) == (512, 384)
    assert resized_size(768, 1024, 384, PATCH) == (384, 512)
    assert resized_size(120, 90, 0, PATCH) == (299, 224)      # native size, but upscaled so a patch fits
    assert resized_size(600, 500, 0, PATCH) == (600, 500)


def test_cache_decodes_each_file_once_and_patches_are_exact_slices(images_on_disk, monkeypatch):
    calls = []
    original = datasets.load_rgb

    def counting_load_rgb(path, origin=None):
        calls.append(path)
        return original(path, origin)

    monkeypatch.setattr(datasets, "load_rgb", counting_load_rgb)
    cache = cache_images(images_on_disk, 256, PATCH, threads=2, progress=False)
    assert sorted(calls) == sorted(s.path for s in images_on_disk)

    expected = [pil_resized(s.path, resized_size(*Image.open(s.path).size, 256, PATCH)) for s in images_on_disk]
    for image, reference in zip(cache, expected):
        assert image.dtype == torch.uint8 and min(image.shape[1:]) == 256
        assert np.array_equal(image.numpy(), reference)

    train = TrainPatchDataset(cache, [0.1, 0.5, 0.9], patch_num=3, patch_size=PATCH, seed=0)
    assert len(train) == 9
    flips = 0
    for epoch in (0, 1):
        train.set_epoch(epoch)
        for index in range(len(train)):
            patch, target = train[index]
            reference = expected[index // 3]
            assert patch.shape == (3, PATCH, PATCH) and patch.dtype == torch.uint8
            assert target.item() == pytest.approx([0.1, 0.5, 0.9][index // 3])
            found = locate(patch.numpy(), reference)
            if not found:  # must then be the mirror image of a slice
                found = locate(patch.flip(-1).numpy(), reference)
                flips += 1
            assert found, f"train patch {index} is not a slice of the resized image"
    assert 0 < flips < 18  # both flipped and unflipped crops occur

    evaluation = EvalPatchDataset(cache, patch_num=4, patch_size=PATCH)
    for index in range(len(evaluation)):
        patch, image_index = evaluation[index]
        assert image_index == index // 4
        top, left = evaluation.offsets[image_index][index % 4]
        assert np.array_equal(patch.numpy(), expected[image_index][:, top:top + PATCH, left:left + PATCH])
    assert len(calls) == len(images_on_disk)  # slicing never decodes again


def test_cache_reports_undecodable_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(datasets.UserError, match="broken.jpg"):
        cache_images([Sample(str(bad), 1.0, "train", "scores.csv:7")], 256, PATCH, progress=False)


def test_train_plan_depends_on_seed_and_epoch_only():
    images = [torch.randint(0, 256, (3, 256, 300), dtype=torch.uint8) for _ in range(4)]
    a = TrainPatchDataset(images, [0.0] * 4, 2, PATCH, seed=3)
    b = TrainPatchDataset(images, [0.0] * 4, 2, PATCH, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    a.set_epoch(5)
    torch.manual_seed(999)
    b.set_epoch(5)
    assert torch.equal(a.plan, b.plan)
    b.set_epoch(6)
    assert not torch.equal(a.plan, b.plan)
    assert not torch.equal(a.plan, TrainPatchDataset(images, [0.0] * 4, 2, PATCH, seed=4).plan)


def test_test_grid_is_deterministic_and_spread():
    offsets = grid_offsets(384, 512, PATCH, 10)
    assert offsets == grid_offsets(384, 512, PATCH, 10)
    assert len(set(offsets)) == 10
    assert offsets[0] == (0, 0) and offsets[-1] == (384 - PATCH, 512 - PATCH)  # corners covered
    assert all(0 <= t <= 384 - PATCH and 0 <= l <= 512 - PATCH for t, l in offsets)
    assert grid_offsets(384, 512, PATCH, 1) == [((384 - PATCH) // 2, (512 - PATCH) // 2)]  # centre crop

    images = [torch.randint(0, 256, (3, 300, 410), dtype=torch.uint8)]
    grid = EvalPatchDataset(images, 5, PATCH)
    assert grid.offsets == EvalPatchDataset(images, 5, PATCH).offsets
    rand = EvalPatchDataset(images, 5, PATCH, random_crop=True, seed=1)
    assert rand.offsets == EvalPatchDataset(images, 5, PATCH, random_crop=True, seed=1).offsets
    assert rand.offsets != EvalPatchDataset(images, 5, PATCH, random_crop=True, seed=2).offsets
    assert rand.offsets != grid.offsets
