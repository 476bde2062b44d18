"""Synthetic degradations: PIL path against independent references, batched path against PIL."""
import argparse
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, stats
from skimage import data as skdata

from iqa.runtime import UserError
from qualiclip_pretrain.degradation_generator import (
    DISTORTION_TYPES,
    LEVEL_PARAMS,
    SyntheticDegradation,
    _degrade_masked,
    _degrade_rows,
    _tables,
    degrade_batch,
    parse_distortion_types,
    select_levels,
)

# Tolerances asserted here (and stated in the module docstring).
BLUR_MAX_ABS = 1          # grey levels, vs a true Gaussian and between the two paths
BLUR_MAX_DIFF_SHARE = 0.01  # share of pixels that may differ (by 1) at all
NOISE_STD_REL = 0.03      # measured std within 3 % of sigma


@pytest.fixture(scope="module")
def astronaut():
    return skdata.astronaut()


@pytest.fixture(scope="module")
def photo(astronaut):
    """A 96×96 textured crop (face, helmet, white suit: it has saturated pixels)."""
    return np.ascontiguousarray(astronaut[200:296, 150:246])


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10.0 * math.log10(255.0 ** 2 / mse)


def pil_jpeg(arr, quality):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=2)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def as_np(img):
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    return np.asarray(img)


# ----------------------------------------------------------------------------- parameters

def test_level_parameters_mildest_first():
    assert DISTORTION_TYPES == ("blur", "jpeg", "noise", "brightness")
    assert LEVEL_PARAMS["blur"] == (0.5, 1.0, 1.5, 2.0, 2.5)
    assert LEVEL_PARAMS["jpeg"] == (85, 70, 55, 40, 25)
    assert LEVEL_PARAMS["noise"] == (5, 10, 15, 20, 25)
    assert LEVEL_PARAMS["brightness"] == (1.3, 0.7, 1.5, 0.5, 0.3)
    severity = [abs(math.log(f)) for f in LEVEL_PARAMS["brightness"]]
    assert severity == sorted(severity) and len(set(severity)) == 5


def test_select_levels():
    assert select_levels(5) == [0, 1, 2, 3, 4]
    assert select_levels(4) == [0, 1, 3, 4]
    assert select_levels(3) == [0, 2, 4]
    assert select_levels(2) == [0, 4]
    assert select_levels(1) == [0]
    assert select_levels(np.int64(3)) == [0, 2, 4]
    for bad in (0, 6, -1, 2.5, "3", True, None):
        with pytest.raises(UserError, match="--num_levels"):
            select_levels(bad)
    with pytest.raises(UserError, match="--num_levels"):
        SyntheticDegradation("blur", num_levels=7)


def test_parse_distortion_types():
    assert parse_distortion_types("blur,jpeg") == ["blur", "jpeg"]
    assert parse_distortion_types("noise brightness") == ["noise", "brightness"]
    assert parse_distortion_types("blur, noise,blur") == ["blur", "noise"]
    assert parse_distortion_types(["jpeg", "blur"]) == ["jpeg", "blur"]
    assert parse_distortion_types(["blur,jpeg", "noise"]) == ["blur", "jpeg", "noise"]
    assert parse_distortion_types("all") == list(DISTORTION_TYPES)
    for bad in ("blur,gaussian", ["blurr"], "", 3):
        with pytest.raises(UserError, match="--distortion_types") as err:
            parse_distortion_types(bad)
    assert all(name in str(err.value) or bad == 3 for name in DISTORTION_TYPES)
    with pytest.raises(UserError, match="--distortion_types") as err:
        SyntheticDegradation("contrast")
    assert all(name in str(err.value) for name in DISTORTION_TYPES)


# ----------------------------------------------------------------------------- PIL path

def test_jpeg_is_plain_pil_encode_decode(photo):
    img = Image.fromarray(photo)
    outs = SyntheticDegradation("jpeg")(img)
    assert len(outs) == 5
    for i, q in enumerate((85, 70, 55, 40, 25)):
        ref = pil_jpeg(photo, q)
        assert np.array_equal(as_np(outs[i]), ref), q
        assert np.array_equal(as_np(SyntheticDegradation("jpeg").apply(img, i)), ref), q


def test_blur_is_a_true_gaussian(photo):
    img = Image.fromarray(photo)
    outs = SyntheticDegradation("blur")(img)
    for out, sigma in zip(outs, LEVEL_PARAMS["blur"]):
        got = as_np(out).astype(np.int64)
        ref = ndimage.gaussian_filter(photo.astype(np.float64), sigma=(sigma, sigma, 0), mode="mirror", truncate=4.0)
        diff = np.abs(got - np.clip(np.rint(ref), 0, 255))
        assert diff.max() <= BLUR_MAX_ABS, sigma
        assert (diff > 0).mean() < BLUR_MAX_DIFF_SHARE, sigma
        # Away from the borders the edge mode does not matter: scipy's default agrees too.
        ref_default = ndimage.gaussian_filter(photo.astype(np.float64), sigma=(sigma, sigma, 0))
        inner = np.abs(got - np.rint(ref_default))[11:-11, 11:-11]
        assert inner.max() <= BLUR_MAX_ABS, sigma


def test_noise_std_measured_on_mid_grey():
    grey = np.full((64, 64, 3), 128, np.uint8)
    outs = SyntheticDegradation("noise", rng=np.random.default_rng(1))(Image.fromarray(grey))
    for out, sigma in zip(outs, LEVEL_PARAMS["noise"]):
        residual = as_np(out).astype(np.float64) - 128.0
        assert abs(residual.std() - sigma) <= NOISE_STD_REL * sigma, sigma
        assert abs(residual.mean()) < 0.5, sigma
        assert np.array_equal(residual, np.rint(residual))


def test_noise_reproducibility():
    img = Image.fromarray(np.full((16, 16, 3), 100, np.uint8))
    a = [as_np(o) for o in SyntheticDegradation("noise", rng=7)(img)]
    b = [as_np(o) for o in SyntheticDegradation("noise", rng=7)(img)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    fresh = SyntheticDegradation("noise")
    assert not np.array_equal(as_np(fresh(img)[2]), as_np(fresh(img)[2]))  # new noise every call
    np.random.seed(3)
    c = as_np(fresh(img)[4])
    np.random.seed(3)
    assert np.array_equal(c, as_np(fresh(img)[4]))  # rng=None follows numpy's global seed


def test_brightness_factor_measured():
    ramp = np.linspace(40, 170, 64 * 64 * 3).reshape(64, 64, 3).round().astype(np.uint8)  # x·1.5 <= 255
    outs = SyntheticDegradation("brightness")(Image.fromarray(ramp))
    for out, factor in zip(outs, LEVEL_PARAMS["brightness"]):
        got = as_np(out).astype(np.float64)
        assert got.sum() / ramp.astype(np.float64).sum() == pytest.approx(factor, rel=2e-3)
        assert np.abs(got - ramp * factor).max() <= 0.5 + 1e-6  # rounded, nothing clipped here
    bright = np.full((8, 8, 3), 230, np.uint8)
    assert as_np(SyntheticDegradation("brightness").apply(Image.fromarray(bright), 2)).min() == 255  # clipped


@pytest.mark.parametrize("dtype", DISTORTION_TYPES)
def test_quality_strictly_falls_with_level(photo, dtype):
    clean = Image.fromarray(photo)
    scores = [psnr(as_np(o), photo) for o in SyntheticDegradation(dtype, rng=0)(clean)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


@pytest.mark.parametrize("dtype", DISTORTION_TYPES)
def test_num_levels_selects_evenly_spaced_levels(photo, dtype):
    img = Image.fromarray(photo[:48, :40])
    three = SyntheticDegradation(dtype, num_levels=3, rng=5)(img)
    assert len(three) == 3
    for out, level in zip(three, (0, 2, 4)):
        ref = SyntheticDegradation(dtype, rng=5).apply(img, level)
        assert out.size == img.size and np.array_equal(as_np(out), as_np(ref))
    one = SyntheticDegradation(dtype, num_levels=1, rng=5)(img)
    assert len(one) == 1 and np.array_equal(as_np(one[0]), as_np(SyntheticDegradation(dtype, rng=5).apply(img, 0)))
    assert SyntheticDegradation(dtype, num_levels=3).params == [LEVEL_PARAMS[dtype][i] for i in (0, 2, 4)]


def test_pil_path_input_checks(photo):
    deg = SyntheticDegradation("blur")
    gray = Image.fromarray(photo[..., 0])
    assert all(o.mode == "RGB" and o.size == gray.size for o in deg(gray))
    for bad in (-1, 5, 1.0):
        with pytest.raises(ValueError, match="level_index"):
            deg.apply(Image.fromarray(photo), bad)
    with pytest.raises(TypeError):
        deg(photo)


# ----------------------------------------------------------------------------- batched path

def _mixed_batch(astronaut, h=40, w=52):
    """All 20 (type, level) combinations in a shuffled order, each row a different crop."""
    combos = [(t, l) for t in range(4) for l in range(5)]
    order = np.random.default_rng(0).permutation(len(combos))
    combos = [combos[i] for i in order]
    crops = [np.ascontiguousarray(astronaut[20 * i: 20 * i + h, 15 * i + 30: 15 * i + 30 + w]) for i in range(len(combos))]
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    types = torch.tensor([c[0] for c in combos])
    levels = torch.tensor([c[1] for c in combos])
    return crops, images, types, levels


def _row(t):
    return t.permute(1, 2, 0).numpy()


def test_batched_matches_pil_per_sample(astronaut):
    crops, images, types, levels = _mixed_batch(astronaut)
    out_u8 = degrade_batch(images, types, levels, generator=torch.Generator().manual_seed(0))
    out_f = degrade_batch(images.float(), types, levels, generator=torch.Generator().manual_seed(0))
    assert out_u8.dtype == torch.float32 and out_u8.shape == images.shape
    assert torch.equal(out_u8, out_f)  # uint8 and float input give the same result
    assert torch.equal(out_u8, out_u8.round()) and out_u8.min() >= 0 and out_u8.max() <= 255
    out_tv = degrade_batch(images, types, levels, generator=torch.Generator().manual_seed(0), jpeg="torchvision")
    for i, (crop, t, lvl) in enumerate(zip(crops, types.tolist(), levels.tolist())):
        name = DISTORTION_TYPES[t]
        ref = as_np(SyntheticDegradation(name, rng=0).apply(Image.fromarray(crop), lvl)).astype(np.float64)
        got = _row(out_u8[i]).astype(np.float64)
        if name == "blur":
            diff = np.abs(got - ref)
            assert diff.max() <= BLUR_MAX_ABS and (diff > 0).mean() < BLUR_MAX_DIFF_SHARE, (i, lvl)
        elif name == "brightness":
            assert np.array_equal(got, ref), (i, lvl)
        elif name == "jpeg":
            assert np.array_equal(got, crop), (i, lvl)  # jpeg='skip': left to the data workers
            assert np.array_equal(_row(out_tv[i]), ref), (i, lvl)  # torchvision: pixel-identical
        else:  # noise: same strength, different random stream (statistics tested below)
            assert abs((got - crop).std() - LEVEL_PARAMS["noise"][lvl]) < 0.25 * LEVEL_PARAMS["noise"][lvl]
        if name != "jpeg":
            assert torch.equal(out_tv[i], out_u8[i])


def test_batched_torchvision_jpeg_pixel_identical_to_pil(photo):
    images = torch.from_numpy(photo).permute(2, 0, 1).unsqueeze(0).repeat(5, 1, 1, 1)
    out = degrade_batch(images, torch.full((5,), 1), torch.arange(5), jpeg="torchvision")
    for lvl, q in enumerate(LEVEL_PARAMS["jpeg"]):
        assert np.array_equal(_row(out[lvl]), pil_jpeg(photo, q)), q


def test_batched_noise_statistics_and_generator():
    grey = torch.full((10, 3, 64, 64), 128, dtype=torch.uint8)
    types = torch.full((10,), DISTORTION_TYPES.index("noise"))
    levels = torch.arange(10) % 5
    out = degrade_batch(grey, types, levels, generator=torch.Generator().manual_seed(3))
    residual = out.double() - 128.0
    for i in range(10):
        sigma = LEVEL_PARAMS["noise"][i % 5]
        assert abs(residual[i].std().item() - sigma) <= NOISE_STD_REL * sigma
        assert abs(residual[i].mean().item()) < 0.5
    again = degrade_batch(grey, types, levels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    assert not torch.equal(residual[0] / 5, residual[5] / 5)  # rows draw independent noise


def test_batched_float_input_rounded_and_clipped():
    x = torch.tensor([100.4, 100.6, 0.2, 254.7]).view(1, 1, 2, 2).expand(3, 3, 2, 2).contiguous()
    bright = DISTORTION_TYPES.index("brightness")
    out = degrade_batch(x, torch.tensor([1, bright, bright]), torch.tensor([0, 0, 1]))
    base = torch.tensor([100.0, 101.0, 0.0, 255.0]).view(1, 2, 2)
    assert torch.equal(out[0], base.expand(3, 2, 2))  # jpeg skipped: only rounded
    assert torch.equal(out[1], (base * torch.tensor(1.3)).round().clamp(0, 255).expand(3, 2, 2))
    assert out[1].max() == 255  # 255 * 1.3 clipped
    assert torch.equal(out[2], (base * torch.tensor(0.7)).round().expand(3, 2, 2))
    extremes = torch.tensor([0.0, 255.0]).view(1, 1, 1, 2).repeat(4, 3, 64, 16)
    noisy = degrade_batch(extremes, torch.full((4,), 2), torch.full((4,), 4))
    assert noisy.min() == 0 and noisy.max() == 255 and torch.equal(noisy, noisy.round())


def test_batched_blur_small_and_odd_sizes(astronaut):
    for h, w in ((6, 5), (1, 9), (23, 11)):  # smaller than the 10-pixel kernel radius
        crops = [np.ascontiguousarray(astronaut[200 + 7 * i: 200 + 7 * i + h, 180: 180 + w]) for i in range(5)]
        images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
        out = degrade_batch(images, torch.zeros(5, dtype=torch.long), torch.arange(5))
        for lvl, crop in enumerate(crops):
            ref = as_np(SyntheticDegradation("blur").apply(Image.fromarray(crop), lvl))
            assert np.abs(_row(out[lvl]) - ref).max() <= BLUR_MAX_ABS, (h, w, lvl)


def test_batched_unaffected_by_autocast(astronaut):
    _, images, types, levels = _mixed_batch(astronaut, 24, 24)
    ref = degrade_batch(images, types, levels, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = degrade_batch(images, types, levels, generator=torch.Generator().manual_seed(1))
    assert got.dtype == torch.float32 and torch.equal(got, ref)


@pytest.mark.parametrize("noise_group_size", [1, 3])
def test_batched_needs_no_host_sync(noise_group_size):
    # Meta tensors carry no data: any .item()/.tolist()/nonzero() on them would raise.
    n = 6
    images = torch.empty(n, 3, 32, 32, device="meta")
    types = torch.empty(n, dtype=torch.long, device="meta")
    levels = torch.empty(n, dtype=torch.long, device="meta")
    out = degrade_batch(images, types, levels, noise_group_size=noise_group_size)
    assert out.shape == images.shape and out.dtype == torch.float32 and out.device.type == "meta"


def test_batched_argument_checks():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="N×3×H×W"):
        degrade_batch(images[:, :2], torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="levels"):
        degrade_batch(images, torch.zeros(2, dtype=torch.long), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="dist_types"):
        degrade_batch(images, torch.tensor([0, 4]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        degrade_batch(images, torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError):
        degrade_batch(images, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="jpeg"):
        degrade_batch(images, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), jpeg="nvjpeg")
    for bad in (0, 3, 2.0, True):
        with pytest.raises(ValueError, match="noise_group_size must be a positive integer dividing the batch size 2"):
            degrade_batch(images, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                          noise_group_size=bad)
    with pytest.raises(UserError, match="--distortion_types"):
        degrade_batch(images, ["blur", "sharpen"], [0, 0])
    by_name = degrade_batch(images + 100, ["brightness", "noise"], [0, 0], generator=torch.Generator().manual_seed(0))
    by_index = degrade_batch(images + 100, torch.tensor([3, 2]), torch.tensor([0, 0]),
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_name, by_index) and by_name[0].eq(130).all()


@pytest.mark.parametrize("noise_group_size", [1, 3])
def test_row_and_masked_paths_agree(noise_group_size):
    """Types on the host (rows indexed) and on the device (torch.where) give the same images."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.integers(0, 256, (12, 3, 20, 24))).float()
    types = torch.tensor([0, 1, 2, 3] * 3)
    levels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    rows = _degrade_rows(x, types, levels, _tables(x.device), torch.Generator().manual_seed(0), noise_group_size)
    masked = _degrade_masked(x, types, levels, _tables(x.device), torch.Generator().manual_seed(0), noise_group_size)
    deterministic = types != 2
    assert torch.equal(rows[deterministic], masked[deterministic])
    assert torch.equal(rows[types == 1], x[types == 1])  # JPEG rows pass through
    for out in (rows, masked):
        noise = (out - x)[types == 2].flatten(1).std(dim=1)
        sigmas = torch.tensor([LEVEL_PARAMS["noise"][i] for i in levels[types == 2]])
        assert torch.allclose(noise, sigmas, rtol=0.25)


# ----------------------------------------------------------------------------- one noise field per crop

NOISE = DISTORTION_TYPES.index("noise")
GREY = 128.0


def unit_fields(residuals, sigmas):
    """(level − clean) / σ of each level: the unit field, up to rounding (±0.5 / σ)."""
    return [r / s for r, s in zip(residuals, sigmas)]


def assert_one_field_across_levels(residuals, sigmas):
    """Every level is the same unit field times its σ, within the rounding of both levels."""
    fields = unit_fields(residuals, sigmas)
    for field, sigma in zip(fields[1:], sigmas[1:]):
        assert np.abs(field - fields[0]).max() <= 0.5 / sigma + 0.5 / sigmas[0] + 1e-9, sigma


def grey_crops(crops, levels, size=48):
    """``crops`` mid-grey crops × ``levels`` rows each, ordered (crop, level)."""
    return torch.full((crops * levels, 3, size, size), int(GREY), dtype=torch.uint8)


def test_worker_noise_levels_differ_only_in_sigma():
    grey = Image.fromarray(np.full((48, 48, 3), int(GREY), np.uint8))
    residuals = [as_np(o).astype(np.float64) - GREY for o in SyntheticDegradation("noise", rng=3)(grey)]
    assert_one_field_across_levels(residuals, LEVEL_PARAMS["noise"])


@pytest.mark.parametrize("path", ["rows", "masked"])
def test_batched_noise_shares_one_field_per_crop(path):
    """Rows (image, crop, level) with noise_group_size = L: the levels of a crop share one unit field,
    different crops draw independent fields; both the host-typed and the device-typed path."""
    n_crops, n_levels = 4, 5  # 2 images × 2 crops
    x = grey_crops(n_crops, n_levels)
    types = torch.full((len(x),), NOISE)
    levels = torch.arange(n_levels).repeat(n_crops)
    generator = torch.Generator().manual_seed(11)
    if path == "rows":
        out = degrade_batch(x, types, levels, generator=generator, noise_group_size=n_levels)
    else:
        out = _degrade_masked(x.float(), types, levels, _tables(x.device), generator, n_levels)
    residual = (out.double() - GREY).numpy().reshape(n_crops, n_levels, -1)
    sigmas = LEVEL_PARAMS["noise"]
    for crop in residual:
        assert_one_field_across_levels(list(crop), sigmas)
    fields = residual[:, -1] / sigmas[-1]  # strongest level: least rounding
    for a in range(n_crops):
        for b in range(a + 1, n_crops):
            assert abs(stats.pearsonr(fields[a], fields[b]).statistic) < 0.05, (a, b)  # independent crops


def test_batched_noise_groups_follow_rows_mixed_with_other_types():
    """Groups are counted over all rows: a noise crop among other types still gets its own field."""
    n_levels = 3
    x = grey_crops(4, n_levels)
    types = torch.tensor([3, 3, 3, 2, 2, 2, 0, 0, 0, 2, 2, 2])  # brightness, noise, blur, noise crops
    levels = torch.tensor([0, 2, 4] * 4)
    out = degrade_batch(x, types, levels, generator=torch.Generator().manual_seed(5), noise_group_size=n_levels)
    residual = (out.double() - GREY).numpy().reshape(4, n_levels, -1)
    sigmas = [LEVEL_PARAMS["noise"][i] for i in (0, 2, 4)]
    for crop in (1, 3):
        assert_one_field_across_levels(list(residual[crop]), sigmas)
    assert abs(stats.pearsonr(residual[1, -1], residual[3, -1]).statistic) < 0.05
    assert np.array_equal(residual[2], np.zeros_like(residual[2]))  # blur of a flat image: unchanged


def test_batched_noise_default_draws_one_field_per_row():
    x = grey_crops(1, 5)
    out = degrade_batch(x, torch.full((5,), NOISE), torch.arange(5), generator=torch.Generator().manual_seed(2))
    fields = (out.double() - GREY).numpy().reshape(5, -1) / np.array(LEVEL_PARAMS["noise"])[:, None]
    assert abs(stats.pearsonr(fields[0], fields[4]).statistic) < 0.05
    # The same stream as one torch.randn per row, scaled and rounded (float32, as the module computes).
    unit = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    expected = (GREY + unit * torch.tensor(LEVEL_PARAMS["noise"]).view(5, 1, 1, 1)).round().clamp(0, 255)
    assert torch.equal(out, expected)


def test_batched_and_worker_noise_agree_in_distribution():
    """The unit fields of both paths: same distribution (KS test), same std; per level the residual std is σ."""
    n_crops = 8
    out = degrade_batch(grey_crops(n_crops, 5, size=64), torch.full((n_crops * 5,), NOISE),
                        torch.arange(5).repeat(n_crops), generator=torch.Generator().manual_seed(7), noise_group_size=5)
    batched = (out.double() - GREY).numpy().reshape(n_crops, 5, -1)
    grey = Image.fromarray(np.full((64, 64, 3), int(GREY), np.uint8))
    degrader = SyntheticDegradation("noise", rng=7)
    worker = np.stack([[as_np(o).astype(np.float64).ravel() - GREY for o in degrader(grey)] for _ in range(n_crops)])
    for level, sigma in enumerate(LEVEL_PARAMS["noise"]):
        a, b = batched[:, level].ravel(), worker[:, level].ravel()
        assert abs(a.std() - sigma) <= NOISE_STD_REL * sigma and abs(b.std() - sigma) <= NOISE_STD_REL * sigma
        assert stats.ks_2samp(a, b).pvalue > 0.01, sigma
    # Across crops of the worker path, fields are independent too (one draw per call).
    assert abs(stats.pearsonr(worker[0, -1], worker[1, -1]).statistic) < 0.05


def test_prepare_batch_shares_the_noise_field_across_levels():
    """engine.prepare_batch groups the rows by crop: one field per crop, levels differ only in σ."""
    from iqa.patches import IMAGENET_MEAN, IMAGENET_STD
    from qualiclip_pretrain.engine import prepare_batch

    levels = [0, 2, 4]
    crops = torch.full((2, 2, len(levels), 3, 32, 32), int(GREY), dtype=torch.uint8)  # 2 images × 2 crops
    batch = {"crops": crops, "distortion_type": torch.tensor([NOISE, NOISE])}
    args = argparse.Namespace(degrade_on="device", channels_last=False)
    images, shape = prepare_batch(batch, levels, args, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert shape == (2, 2, 3)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    pixels = ((images.double() * std + mean) * 255).round()  # back to 0..255
    residual = (pixels - GREY).numpy().reshape(4, len(levels), -1)
    sigmas = [LEVEL_PARAMS["noise"][i] for i in levels]
    for crop in residual:
        assert_one_field_across_levels(list(crop), sigmas)
    assert abs(stats.pearsonr(residual[0, -1], residual[1, -1]).statistic) < 0.05  # two crops of one image
