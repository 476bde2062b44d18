"""ARNIQA's degradation model: shapes, severity order, and values against independent references
(scipy, skimage, PIL, colorsys, numpy)."""
import colorsys
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from scipy.interpolate import CubicSpline
from skimage import color as skcolor
from skimage import data as skdata

from qualiclip_pretrain import arniqa
from qualiclip_pretrain.arniqa import DISTORTION_GROUPS, DISTORTIONS, LEVEL_PARAMS, RANDOM_DISTORTIONS, distort

H, W = 48, 64

# ARNIQA's utils/utils_data.py (commit ceac522), typed in by hand.
ARNIQA_GROUPS = {
    "blur": ["gaublur", "lensblur", "motionblur"],
    "color_distortion": ["colordiff", "colorshift", "colorsat1", "colorsat2"],
    "jpeg": ["jpeg2000", "jpeg"],
    "noise": ["whitenoise", "whitenoiseCC", "impulsenoise", "multnoise"],
    "brightness_change": ["brighten", "darken", "meanshift"],
    "spatial_distortion": ["jitter", "noneccpatch", "pixelate", "quantization", "colorblock"],
    "sharpness_contrast": ["highsharpen", "lincontrchange", "nonlincontrchange"],
}
ARNIQA_RANGE = {
    "gaublur": [0.1, 0.5, 1, 2, 5], "lensblur": [1, 2, 4, 6, 8], "motionblur": [1, 2, 4, 6, 10],
    "colordiff": [1, 3, 6, 8, 12], "colorshift": [1, 3, 6, 8, 12], "colorsat1": [0.4, 0.2, 0.1, 0, -0.4],
    "colorsat2": [1, 2, 3, 6, 9], "jpeg2000": [16, 32, 45, 120, 170], "jpeg": [43, 36, 24, 7, 4],
    "whitenoise": [0.001, 0.002, 0.003, 0.005, 0.01], "whitenoiseCC": [0.0001, 0.0005, 0.001, 0.002, 0.003],
    "impulsenoise": [0.001, 0.005, 0.01, 0.02, 0.03], "multnoise": [0.001, 0.005, 0.01, 0.02, 0.05],
    "brighten": [0.1, 0.2, 0.4, 0.7, 1.1], "darken": [0.05, 0.1, 0.2, 0.4, 0.8],
    "meanshift": [0, 0.08, -0.08, 0.15, -0.15], "jitter": [0.05, 0.1, 0.2, 0.5, 1],
    "noneccpatch": [20, 40, 60, 80, 100], "pixelate": [0.01, 0.05, 0.1, 0.2, 0.5],
    "quantization": [20, 16, 13, 10, 7], "colorblock": [2, 4, 6, 8, 10], "highsharpen": [1, 2, 3, 6, 12],
    "lincontrchange": [0., 0.15, -0.4, 0.3, -0.6], "nonlincontrchange": [0.4, 0.3, 0.2, 0.1, 0.05],
}
# Mean |distorted - clean| on the photo must rise strictly with the level for these.
MONOTONE = [n for n in DISTORTIONS if n not in {
    "meanshift",       # shifts alternate in sign (clipping differs)
    "quantization",    # levels are stretched to the image's range; counted below instead
    "noneccpatch",     # patches copy image content, more of them can undo earlier ones
    "colorblock",      # a later block may be closer to the image than the one it covers; area below
    "lincontrchange",  # levels 1 and 2 are equally far from the identity (checked below)
}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These images are tiny: with several threads, OpenMP hand-offs cost more than the work
    (measured 17 s vs 3.4 s for this file on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photo():
    """A 48x64 textured crop of skimage's astronaut, float32 (3, H, W) in [0, 1]."""
    return torch.from_numpy(skdata.astronaut()[200:200 + H, 150:150 + W].copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def batch(photo):
    """Five different 48x64 crops."""
    full = torch.from_numpy(skdata.astronaut().copy()).permute(2, 0, 1).float() / 255
    return torch.stack([full[:, 40 * i + 100:40 * i + 100 + H, 30 * i + 120:30 * i + 120 + W] for i in range(5)])


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def severity(photo, name, level):
    return float((distort(photo, name, level, generator=seeded()) - photo).abs().mean())


def to_uint8(x):
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- names and levels

def test_groups_and_levels_are_arniqas():
    assert {g: list(n) for g, n in DISTORTION_GROUPS.items()} == ARNIQA_GROUPS
    assert list(DISTORTION_GROUPS) == list(ARNIQA_GROUPS)
    assert len(DISTORTIONS) == len(set(DISTORTIONS)) == 24
    assert set(LEVEL_PARAMS) == set(DISTORTIONS)
    for name in DISTORTIONS:
        if name != "lincontrchange":
            assert list(LEVEL_PARAMS[name]) == ARNIQA_RANGE[name], name
    # Reordered by the distance of the tone curve from the identity, |a + 0.2|.
    values = LEVEL_PARAMS["lincontrchange"]
    assert sorted(values) == sorted(ARNIQA_RANGE["lincontrchange"])
    assert [abs(a + 0.2) for a in values] == sorted(abs(a + 0.2) for a in values)


@pytest.mark.parametrize("name", DISTORTIONS)
def test_shape_dtype_range(name, photo, batch):
    single = distort(photo, name, 5, generator=seeded())
    assert single.shape == photo.shape and single.dtype == torch.float32
    assert float(single.min()) >= 0 and float(single.max()) <= 1
    many = distort(batch.double(), name, torch.tensor([5, 1, 2, 3, 4]), generator=seeded())
    assert many.shape == batch.shape and many.dtype == torch.float64
    assert float(many.min()) >= 0 and float(many.max()) <= 1


@pytest.mark.parametrize("name", DISTORTIONS)
def test_level5_more_severe_than_level1(name, photo):
    assert severity(photo, name, 5) > severity(photo, name, 1) + 1e-3


@pytest.mark.parametrize("name", MONOTONE)
def test_severity_rises_with_level(name, photo):
    values = [severity(photo, name, level) for level in range(1, 6)]
    if name == "jpeg2000":  # 48x64 is too small for ratios 45..170 to differ (header bytes); use 96x128
        big = torch.from_numpy(skdata.astronaut()[100:196, 150:278].copy()).permute(2, 0, 1).float() / 255
        values = [severity(big, name, level) for level in range(1, 6)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_batched_equals_per_image(batch):
    levels = torch.tensor([1, 2, 3, 4, 5])
    for name in DISTORTIONS:
        if name in RANDOM_DISTORTIONS:
            continue
        together = distort(batch, name, levels)
        alone = torch.stack([distort(img, name, int(lv)) for img, lv in zip(batch, levels)])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("name", sorted(RANDOM_DISTORTIONS))
def test_generator_reproduces(name, batch):
    a = distort(batch, name, 5, generator=seeded(1))
    b = distort(batch, name, 5, generator=seeded(1))
    c = distort(batch, name, 5, generator=seeded(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("level", [2, 3, 4, 5])
def test_gaublur_is_scipy_gaussian(level, photo):
    sigma = LEVEL_PARAMS["gaublur"][level - 1]
    # fspecial's window 2*ceil(2*sigma)+1 = scipy's truncate=2 for these sigmas; ARNIQA replicates borders.
    ref = np.stack([ndimage.gaussian_filter(c, sigma, mode="nearest", truncate=2.0) for c in photo.double().numpy()])
    np.testing.assert_allclose(distort(photo, "gaublur", level).numpy(), ref, atol=1e-5)


def impulse(size=21):
    x = torch.zeros(3, size, size)
    x[:, size // 2, size // 2] = 1
    return x


def test_lensblur_is_pixel_coverage_of_a_disk():
    radius = LEVEL_PARAMS["lensblur"][2]  # 4
    out = distort(impulse(), "lensblur", 3)[0].numpy()  # correlation of an impulse = the (symmetric) kernel
    # Independent: cover each pixel with 200x200 sample points and count those inside the disk.
    s = (np.arange(200) + 0.5) / 200 - 0.5
    t = np.arange(-10, 11)
    xs = (t[:, None] + s[None, :]).ravel()
    inside = (xs[:, None] ** 2 + xs[None, :] ** 2 <= radius ** 2).reshape(21, 200, 21, 200).mean((1, 3))
    np.testing.assert_allclose(out, inside / inside.sum(), atol=2e-4)
    # MATLAB's fspecial('disk', 2), as published in its documentation (4 decimals).
    k2 = distort(impulse(), "lensblur", 2)[0].numpy()[8:13, 8:13]
    np.testing.assert_allclose(k2[0], [0, 0.0170, 0.0381, 0.0170, 0], atol=6e-5)
    np.testing.assert_allclose(k2[1], [0.0170, 0.0784, 0.0796, 0.0784, 0.0170], atol=6e-5)


def test_motionblur_is_a_line():
    img = impulse()
    assert torch.equal(distort(img, "motionblur", 1, generator=seeded()), img)  # length 1: identity
    k = distort(img, "motionblur", 5, generator=seeded())[0].double().numpy()
    assert k.sum() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-6)  # symmetric about the centre
    rows, cols = np.nonzero(k > 1e-7)
    assert np.hypot(rows - 10, cols - 10).max() <= 5.5 + 1e-9  # length 10: within half length + 1
    pos = np.stack([rows - 10, cols - 10], 1).astype(float)
    cov = (pos * k[rows, cols, None]).T @ pos
    small, large = np.linalg.eigvalsh(cov)
    assert small < 0.5 and large > 5  # a thin line (variance of a length-10 segment ~ 8)


@pytest.mark.parametrize("level", [1, 5])
def test_jpeg_is_pil(level, photo):
    buf = io.BytesIO()
    Image.fromarray(to_uint8(photo)).save(buf, format="JPEG", quality=LEVEL_PARAMS["jpeg"][level - 1])
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(to_uint8(distort(photo, "jpeg", level)), ref)


def test_jpeg2000_needs_openjpeg(photo, monkeypatch):
    monkeypatch.setattr(arniqa.features, "check", lambda feature: False)
    with pytest.raises(RuntimeError, match="OpenJPEG"):
        distort(photo, "jpeg2000", 1)


def grey(n=4, size=64):
    return torch.full((n, 3, size, size), 0.5)


@pytest.mark.parametrize("level", [1, 5])
def test_whitenoise_variance(level):
    var = LEVEL_PARAMS["whitenoise"][level - 1]
    diff = distort(grey(), "whitenoise", level, generator=seeded()) - 0.5
    assert float(diff.var()) == pytest.approx(var, rel=0.05)
    assert abs(float(diff.mean())) < 0.1 * var ** 0.5


def test_whitenoise_cc_is_white_in_ycbcr():
    var = LEVEL_PARAMS["whitenoiseCC"][4]
    diff = (distort(grey(), "whitenoiseCC", 5, generator=seeded()) - 0.5).double()
    ycbcr_from_rgb = np.array([[0.299, 0.587, 0.114], [-0.168636, -0.331068, 0.499704],
                               [0.499813, -0.418531, -0.081282]])  # kornia's rgb_to_ycbcr
    noise = np.einsum("ij,njhw->inhw", ycbcr_from_rgb, diff.numpy()).reshape(3, -1)
    np.testing.assert_allclose(np.cov(noise), var * np.eye(3), atol=0.05 * var)


def test_multnoise_variance():
    var = LEVEL_PARAMS["multnoise"][4]
    diff = distort(grey(), "multnoise", 5, generator=seeded()) - 0.5
    assert float(diff.var()) == pytest.approx(0.25 * var, rel=0.05)


def test_impulsenoise_share():
    d = LEVEL_PARAMS["impulsenoise"][4]
    out = distort(grey(), "impulsenoise", 5, generator=seeded())
    assert float((out == 1).float().mean()) == pytest.approx(d / 2, rel=0.15)
    assert float((out == 0).float().mean()) == pytest.approx(d / 2, rel=0.15)
    assert bool(((out == 0) | (out == 1) | (out == 0.5)).all())


@pytest.mark.parametrize("level", [1, 3, 5])
def test_quantization_levels(level):
    n_levels = LEVEL_PARAMS["quantization"][level - 1]
    ramp = torch.arange(256.0).div(255).expand(3, 8, 256)  # every 8-bit value
    out = distort(ramp, "quantization", level)
    # Independent: np.histogram's bin edges, truncated to int, then numpy's digitize.
    edges = np.histogram(np.zeros(1), n_levels, (0, 255))[1].astype(int)[:-1]
    bucket = np.digitize(np.arange(256.0), edges, right=True).astype(float)
    ref = (bucket - bucket.min()) / (bucket.max() - bucket.min())
    np.testing.assert_allclose(out[0, 0].numpy(), ref, atol=1e-6)
    assert len(torch.unique(out)) == n_levels + 1  # the exact zero keeps a bucket of its own


@pytest.mark.parametrize("level", [1, 3, 5])
def test_pixelate_blocks(level, photo):
    z = 0.95 - LEVEL_PARAMS["pixelate"][level - 1] ** 0.6
    small = (int(H * z), int(W * z))
    ref = F.interpolate(F.interpolate(photo[None], size=small, mode="nearest"), size=(H, W), mode="nearest")[0]
    out = distort(photo, "pixelate", level)
    assert torch.equal(out, ref)
    rows = torch.arange(H, dtype=torch.float32).view(1, H, 1).expand(3, H, W) / H  # every row distinct
    index = (distort(rows, "pixelate", level)[0, :, 0] * H).round().long()
    runs = torch.unique_consecutive(index, return_counts=True)[1]
    assert len(runs) == small[0]
    assert set(runs.tolist()) <= {H // small[0], -(-H // small[0])}


def test_brighten_darken_direction(photo):
    for level in range(1, 6):
        assert float(distort(photo, "brighten", level).mean()) > float(photo.mean())
        assert float(distort(photo, "darken", level).mean()) < float(photo.mean())
    ramp = torch.linspace(0, 1, 101).expand(3, 1, 101)
    c = 0.5 - LEVEL_PARAMS["darken"][4] / 2
    parabola = np.polyfit([0, 0.5, 1], [0, c, 1], 2)  # MATLAB spline through 3 points
    np.testing.assert_allclose(distort(ramp, "darken", 5)[0, 0].numpy(),
                               np.clip(np.polyval(parabola, np.linspace(0, 1, 101)), 0, 1), atol=1e-6)


@pytest.mark.parametrize("level", [1, 4, 5])
def test_colorsat1_is_hsv_saturation(level):
    factor = LEVEL_PARAMS["colorsat1"][level - 1]
    rng = np.random.default_rng(0)
    pixels = rng.random((3, 4, 5))
    out = distort(torch.from_numpy(pixels).float(), "colorsat1", level).numpy()
    for i in range(4):
        for j in range(5):
            h, s, v = colorsys.rgb_to_hsv(*pixels[:, i, j])
            ref = np.clip(colorsys.hsv_to_rgb(h, s * factor, v), 0, 1)
            np.testing.assert_allclose(out[:, i, j], ref, atol=1e-5)


def sk_lab(photo):
    return skcolor.rgb2lab(photo.double().permute(1, 2, 0).numpy())


def sk_rgb(lab):
    # Sharpening and boosted chroma leave the gamut (negative Z), which both sides clip to 0.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*negative Z values.*")
        return torch.from_numpy(skcolor.lab2rgb(lab)).permute(2, 0, 1)


def assert_close_after_floor(out, ref):
    """Our float32 and skimage's float64 may land on either side of a 1/255 step, rarely."""
    diff = (out.double() - ref).abs()
    assert float(diff.max()) <= 1 / 255 + 1e-6
    assert float((diff > 1e-6).double().mean()) < 0.01


def test_colorsat2_is_skimage_lab(photo):
    lab = sk_lab(photo)
    lab[..., 1:] *= LEVEL_PARAMS["colorsat2"][2]
    assert_close_after_floor(distort(photo, "colorsat2", 3), torch.floor(sk_rgb(lab) * 255) / 255)


def test_colordiff_is_skimage_lab_and_scipy_blur(photo):
    amount = LEVEL_PARAMS["colordiff"][1]
    lab = sk_lab(photo)
    for ch in (1, 2):
        lab[..., ch] = amount * ndimage.gaussian_filter(lab[..., ch], 1.5 * amount + 2, mode="nearest", truncate=2.0)
    assert_close_after_floor(distort(photo, "colordiff", 2), torch.floor(sk_rgb(lab) * 255) / 255)


def test_highsharpen_is_unsharp_mask_on_lightness(photo):
    amount = LEVEL_PARAMS["highsharpen"][4]
    lab = sk_lab(photo)
    t = np.arange(-6, 7)
    g = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / 72.0)  # fspecial('gaussian', 13, 6)
    blurred = ndimage.correlate(lab[..., 0], g / g.sum(), mode="nearest")
    lab[..., 0] = lab[..., 0] + amount * (lab[..., 0] - blurred)
    torch.testing.assert_close(distort(photo, "highsharpen", 5).double(), sk_rgb(lab), atol=2e-4, rtol=0)


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_lincontrchange_is_not_a_knot_spline(level):
    a = LEVEL_PARAMS["lincontrchange"][level - 1]
    xs = np.linspace(0, 1, 201)
    spline = CubicSpline([0, 0.3, 0.5, 0.7, 1], [0, 0.25 - a / 4, 0.5, 0.75 + a / 4, 1], bc_type="not-a-knot")
    out = distort(torch.from_numpy(xs).float().expand(3, 1, 201), "lincontrchange", level)
    np.testing.assert_allclose(out[0, 0].numpy(), np.clip(spline(xs), 0, 1), atol=2e-6)


def test_lincontrchange_first_levels_mirror_each_other():
    ramp = torch.linspace(0, 1, 201).expand(3, 1, 201)
    up, down = distort(ramp, "lincontrchange", 1) - ramp, distort(ramp, "lincontrchange", 2) - ramp
    torch.testing.assert_close(up, -down, atol=2e-6, rtol=0)
    assert float(up.abs().max()) > 0.03


def test_contrast_and_shift_hand_worked():
    x = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0]).expand(3, 1, 5)
    torch.testing.assert_close(distort(x, "nonlincontrchange", 1)[0, 0], torch.tensor([0.1, 0.3, 0.5, 0.82, 0.9]))
    torch.testing.assert_close(distort(x, "meanshift", 4)[0, 0], torch.tensor([0.15, 0.4, 0.65, 1.0, 1.0]))
    torch.testing.assert_close(distort(x, "meanshift", 5)[0, 0], torch.tensor([0.0, 0.1, 0.35, 0.75, 0.85]))
    assert torch.equal(distort(x, "meanshift", 1), x)


def test_colorshift_moves_only_green(photo):
    out = distort(photo, "colorshift", 5, generator=seeded())
    assert torch.equal(out[0], photo[0]) and torch.equal(out[2], photo[2])
    assert float((out[1] - photo[1]).abs().max()) > 0.05


def test_colorblock_paints_flat_blocks():
    img = torch.full((3, 64, 96), 0.5)
    out = distort(img, "colorblock", 1, generator=seeded())  # 2 blocks of 32x32
    changed = (out != img).any(0)
    assert 32 * 32 <= int(changed.sum()) <= 2 * 32 * 32
    assert len(torch.unique(out[:, changed].T, dim=0)) <= 2
    # One generator state: each level's blocks extend the previous level's, so the area grows.
    areas = [int((distort(img, "colorblock", lv, generator=seeded()) != img).any(0).sum()) for lv in range(1, 6)]
    assert areas == sorted(areas) and areas[-1] > areas[0]


def test_noneccpatch_changes_at_most_its_patches(photo):
    out = distort(photo, "noneccpatch", 1, generator=seeded())  # 20 patches of 16x16
    changed = int((out != photo).any(0).sum())
    assert 0 < changed <= 20 * 16 * 16


# ----------------------------------------------------------------------------- errors

def test_errors(photo, batch):
    with pytest.raises(ValueError, match="valid names: gaublur, lensblur"):
        distort(photo, "gaussian_blur", 1)
    for level in (0, 6, 2.0, True, "3"):
        with pytest.raises(ValueError, match="1..5"):
            distort(photo, "gaublur", level)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        distort(batch, "gaublur", torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1..5"):
        distort(batch, "gaublur", torch.tensor([1, 2, 3, 4, 6]))
    with pytest.raises(ValueError, match="integer tensor"):
        distort(batch, "gaublur", torch.ones(5))
    with pytest.raises(ValueError, match="needs an \\(N, 3, H, W\\) batch"):
        distort(photo, "gaublur", torch.tensor([1]))
    with pytest.raises(ValueError, match="at least 48 pixels"):
        distort(photo[:, :40], "noneccpatch", 1)
    with pytest.raises(ValueError, match="float tensor"):
        distort((photo * 255).to(torch.uint8), "gaublur", 1)
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(N, 3, H, W\)"):
        distort(photo[:1], "gaublur", 1)
