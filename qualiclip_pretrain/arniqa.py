"""ARNIQA's image degradation model, batched and device-agnostic in torch.

QualiCLIP's synthetic degradations come from ARNIQA (Agnolucci et al., WACV 2024,
https://github.com/miccunifi/ARNIQA, ``utils/utils_data.py`` and ``utils/distortions.py``):
24 distortions in 7 groups, 5 levels each. This module re-implements them in our own code
(``docs/degradations_arniqa.md`` has the table, the level values and every difference).

``distort(image, name, level, generator=None)`` takes a float ``(3, H, W)`` or ``(N, 3, H, W)``
tensor in [0, 1] and returns the same shape and dtype in [0, 1] on the same device (computed in
float32 with autocast off). ``level`` is 1..5, 1 the mildest; for a batch it may also be an
``(N,)`` integer tensor, one level per sample. A ``torch.Generator`` on the image's device makes
the random distortions (``RANDOM_DISTORTIONS``) reproducible.

Everything except the two codecs is tensor ops on the image's device, with no loop over samples
and no host-device synchronisation. ``noneccpatch`` and ``colorblock`` loop over patches (at most
100 and 10), because later patches overwrite (and, for ``noneccpatch``, copy from) earlier ones.
``jpeg`` (Pillow's libjpeg, 4:2:0) and ``jpeg2000`` (Pillow's OpenJPEG) go through the CPU, one
image at a time, at 8 bits (rounded).

Level order: the ladders are ARNIQA's ``distortion_range`` values, which are ordered by severity
except ``lincontrchange`` ([0, 0.15, -0.4, 0.3, -0.6]). Its tone curve passes through
(0.3, 0.25 - a/4) and (0.7, 0.75 + a/4), so a = -0.2, not a = 0, is the identity; we order the
five values by the distance of the curve from the identity, |a + 0.2|: 0, -0.4, 0.15, -0.6, 0.3
(levels 1 and 2 are equally far, one raising and one lowering contrast). ``meanshift``
([0, 0.08, -0.08, 0.15, -0.15]) is already ordered by |shift|; its level 1 is the identity, and
levels 2/3 and 4/5 are shifts of equal size and opposite sign.

Where ARNIQA calls kornia, scipy or a MATLAB port, the same math is written here in torch:
sRGB <-> CIELAB (D65, kornia's constants), RGB <-> YCbCr (BT.601), MATLAB's
``fspecial('gaussian'|'disk'|'motion')`` and ``spline`` (3 knots: the interpolating parabola,
5 knots: the not-a-knot cubic spline). Deliberate differences, each explained in the doc page:
colours are converted in RGB order (ARNIQA swaps R and B before its LAB conversions), the
YCbCr inverse is exact, ``colorshift`` clips the edge map at its 1st/99th percentiles and
replicates edges instead of wrapping, ``impulsenoise`` hits each value with probability d, the
lens-blur disk is the exact pixel coverage, JPEG 2000 uses fewer wavelet levels on images
smaller than 128 pixels, and 8-bit conversions round instead of truncating.
"""
import contextlib
import functools
import io
import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, features

from iqa.runtime import UserError
from qualiclip_pretrain.degradation_generator import cuda_jpeg

DISTORTION_GROUPS = {
    "blur": ("gaublur", "lensblur", "motionblur"),
    "color_distortion": ("colordiff", "colorshift", "colorsat1", "colorsat2"),
    "jpeg": ("jpeg2000", "jpeg"),
    "noise": ("whitenoise", "whitenoiseCC", "impulsenoise", "multnoise"),
    "brightness_change": ("brighten", "darken", "meanshift"),
    "spatial_distortion": ("jitter", "noneccpatch", "pixelate", "quantization", "colorblock"),
    "sharpness_contrast": ("highsharpen", "lincontrchange", "nonlincontrchange"),
}
DISTORTIONS = tuple(name for names in DISTORTION_GROUPS.values() for name in names)
NUM_LEVELS = 5

# ARNIQA's distortion_range, mildest first (only lincontrchange reordered; module docstring).
LEVEL_PARAMS = {
    "gaublur": (0.1, 0.5, 1, 2, 5),                      # Gaussian sigma, pixels
    "lensblur": (1, 2, 4, 6, 8),                         # disk radius, pixels
    "motionblur": (1, 2, 4, 6, 10),                      # line length, pixels (random angle)
    "colordiff": (1, 3, 6, 8, 12),                       # a*b* blur sigma 1.5x+2, a*b* gain x
    "colorshift": (1, 3, 6, 8, 12),                      # green shift, pixels (random direction)
    "colorsat1": (0.4, 0.2, 0.1, 0, -0.4),               # HSV saturation factor
    "colorsat2": (1, 2, 3, 6, 9),                        # LAB a*b* factor
    "jpeg2000": (16, 32, 45, 120, 170),                  # compression ratio
    "jpeg": (43, 36, 24, 7, 4),                          # JPEG quality
    "whitenoise": (0.001, 0.002, 0.003, 0.005, 0.01),    # variance, RGB
    "whitenoiseCC": (0.0001, 0.0005, 0.001, 0.002, 0.003),  # variance, YCbCr
    "impulsenoise": (0.001, 0.005, 0.01, 0.02, 0.03),    # share of values hit
    "multnoise": (0.001, 0.005, 0.01, 0.02, 0.05),       # variance of the relative noise
    "brighten": (0.1, 0.2, 0.4, 0.7, 1.1),               # tone curve through (0.5, 0.5 + x/2)
    "darken": (0.05, 0.1, 0.2, 0.4, 0.8),                # tone curve through (0.5, 0.5 - x/2)
    "meanshift": (0, 0.08, -0.08, 0.15, -0.15),          # added to every value
    "jitter": (0.05, 0.1, 0.2, 0.5, 1),                  # std of the per-pixel shift, 5 rounds
    "noneccpatch": (20, 40, 60, 80, 100),                # number of 16x16 patches moved
    "pixelate": (0.01, 0.05, 0.1, 0.2, 0.5),             # s: nearest down/up by 0.95 - s**0.6
    "quantization": (20, 16, 13, 10, 7),                 # number of uniform levels
    "colorblock": (2, 4, 6, 8, 10),                      # number of 32x32 flat patches
    "highsharpen": (1, 2, 3, 6, 12),                     # unsharp-mask amount on L*
    "lincontrchange": (0, -0.4, 0.15, -0.6, 0.3),        # tone curve through (0.3, 0.25 - x/4)
    "nonlincontrchange": (0.4, 0.3, 0.2, 0.1, 0.05),     # output range 0.5 +- x
}
RANDOM_DISTORTIONS = frozenset({
    "motionblur", "colorshift", "whitenoise", "whitenoiseCC", "impulsenoise", "multnoise",
    "jitter", "noneccpatch", "colorblock",
})

# sRGB (D65) <-> XYZ, as in kornia and skimage.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_D65_WHITE = (0.95047, 1.0, 1.08883)
# YCbCr (BT.601, kornia's coefficients) -> RGB, exact inverse of the linear part.
_YCBCR_FROM_RGB = np.array([[0.299, 0.587, 0.114],
                            [-0.168636, -0.331068, 0.499704],
                            [0.499813, -0.418531, -0.081282]])
_RGB_FROM_YCBCR = np.linalg.inv(_YCBCR_FROM_RGB)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)

_CONTRAST_KNOTS = (0.0, 0.3, 0.5, 0.7, 1.0)
_NONECC_PATCH = 16   # noneccpatch: patch side and the range of its displacement
_COLOR_BLOCK = 32    # colorblock: patch side


# ----------------------------------------------------------------------------- small helpers

def _mix(x, matrix):
    """``matrix`` (3x3, host floats) applied to the channels of ``x`` (N,3,H,W)."""
    c = x.unbind(1)
    return torch.stack([sum(float(m) * ch for m, ch in zip(row, c)) for row in matrix], 1)


def _rgb_to_lab(x):
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)
    xyz = _mix(lin, _XYZ_FROM_RGB / np.array(_D65_WHITE)[:, None])
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856).pow(1 / 3), 7.787 * xyz + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def _lab_to_rgb(lab):
    """CIELAB -> sRGB, clipped to [0, 1] (kornia's ``clip=True``)."""
    l, a, b = lab.unbind(1)
    fy = (l + 16) / 116
    f = torch.stack([a / 500 + fy, fy, (fy - b / 200).clamp(min=0)], 1)
    xyz = torch.where(f > 0.2068966, f.pow(3), (f - 4 / 29) / 7.787)
    lin = _mix(xyz, _RGB_FROM_XYZ * np.array(_D65_WHITE)[None, :])
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308).pow(1 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0, 1)


def _floor8(x):
    """ARNIQA's ``trunc(x * 255) / 255`` after its LAB round trips (x >= 0 here)."""
    return torch.floor(x * 255) / 255


def _column(values):
    """Per-sample values (N,) as an (N,1,1,1) float32 tensor."""
    return values.to(torch.float32).view(-1, 1, 1, 1)


def _filter_separable(x, taps):
    """Correlate each sample of ``x`` (N,C,H,W) with its own separable kernel ``taps`` (N, K)
    along both axes; borders replicated (ARNIQA's ``filter2D``)."""
    n, c, h, w = x.shape
    k = taps.shape[1]
    r = k // 2
    weight = taps.to(torch.float32).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, weight.view(n * c, 1, k, 1), groups=n * c)
    y = F.conv2d(y, weight.view(n * c, 1, 1, k), groups=n * c)
    return y.view(n, c, h, w)


def _filter2d(x, kernels):
    """Correlate each sample of ``x`` (N,C,H,W) with its own 2-D kernel (N, K, K); borders replicated."""
    n, c, h, w = x.shape
    k = kernels.shape[-1]
    r = k // 2
    weight = kernels.to(torch.float32).repeat_interleave(c, dim=0).view(n * c, 1, k, k)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="replicate")
    return F.conv2d(y, weight, groups=n * c).view(n, c, h, w)


def _gaussian_taps(sigma, support):
    """MATLAB ``fspecial('gaussian', 2*ceil(2*sigma)+1, sigma)`` as 1-D factors: (N, 2*support+1)
    taps, zero beyond each sample's radius ceil(2*sigma), normalised (the 2-D kernel is their
    outer product)."""
    t = torch.arange(-support, support + 1, device=sigma.device, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    g = torch.where(t.abs() <= torch.ceil(2 * sigma)[:, None], g, 0.0)
    return g / g.sum(1, keepdim=True)


def _gaussian_blur_fixed(x, sigma, radius):
    """Blur with MATLAB's ``fspecial('gaussian', 2*radius+1, sigma)`` (a window of its own size)."""
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return _filter_separable(x, (g / g.sum()).expand(x.shape[0], -1))


def _disk_kernels(radius, support):
    """Pill-box kernels (N, 2*support+1, 2*support+1): the exact area of each pixel covered by a
    disk of the sample's radius centred on the middle pixel, normalised (what MATLAB's
    ``fspecial('disk')`` computes)."""
    r = radius[:, None, None]

    def quarter(a, b):
        # Area of the disk inside [0, a] x [0, b], odd in a and in b so that differences of it
        # give the area inside any pixel.
        sa, sb = torch.sign(a), torch.sign(b)
        a, b = a.abs().minimum(r), b.abs()
        cross = torch.sqrt((r * r - b * b).clamp(min=0)).minimum(a)  # where the arc meets y = b

        def under_arc(t):
            return 0.5 * (t * torch.sqrt((r * r - t * t).clamp(min=0)) + r * r * torch.asin(t / r))

        return sa * sb * (b * cross + under_arc(a) - under_arc(cross))

    t = torch.arange(-support, support + 1, device=radius.device, dtype=torch.float64)
    lo, hi = (t - 0.5)[:, None], (t + 0.5)[:, None]
    rows_lo, rows_hi, cols_lo, cols_hi = lo, hi, lo.T, hi.T
    area = (quarter(cols_hi, rows_hi) - quarter(cols_lo, rows_hi)
            - quarter(cols_hi, rows_lo) + quarter(cols_lo, rows_lo))
    return area / area.sum((1, 2), keepdim=True)


def _motion_kernels(length, angle_deg, support):
    """MATLAB ``fspecial('motion', length, angle)`` per sample: a line of ``length`` pixels through
    the centre at ``angle`` degrees (counter-clockwise, rows pointing down), one pixel wide with
    linear fall-off, on a (2*support+1)^2 grid, normalised."""
    half = ((length - 1) / 2)[:, None, None]
    phi = torch.deg2rad(angle_deg)[:, None, None]
    t = torch.arange(-support, support + 1, device=length.device, dtype=torch.float64)
    u, v = t[None, None, :], -t[None, :, None]  # column offset right, row offset up
    along = u * torch.cos(phi) + v * torch.sin(phi)
    across = v * torch.cos(phi) - u * torch.sin(phi)
    # Past the segment's half length, MATLAB measures the distance to the end point.
    beyond = (torch.hypot(u, v) >= half) & (across.abs() <= 1)
    dist = torch.where(beyond, torch.hypot(across, half - along.abs()), across.abs())
    weight = (1 - dist).clamp(min=0)
    return weight / weight.sum((1, 2), keepdim=True)


def _parabola_curve(x, middle):
    """MATLAB ``spline([0 0.5 1], [0 middle 1])`` (the interpolating parabola) applied to ``x``,
    clipped to [0, 1]; ``middle`` is (N,1,1,1)."""
    return ((2 - 4 * middle) * x * x + (4 * middle - 1) * x).clamp(0, 1)


def _not_a_knot_coefficients(knots, values):
    """Monomial coefficients (pieces, 4) of MATLAB's ``spline(knots, values)`` (cubic, not-a-knot)."""
    pieces = len(knots) - 1

    def row(piece, t, derivative):
        out = np.zeros(4 * pieces)
        for power in range(derivative, 4):
            out[4 * piece + power] = math.perm(power, derivative) * t ** (power - derivative)
        return out

    rows, rhs = [], []
    for k in range(pieces):
        rows += [row(k, knots[k], 0), row(k, knots[k + 1], 0)]
        rhs += [values[k], values[k + 1]]
    for k in range(1, pieces):
        for derivative in (1, 2):
            rows.append(row(k - 1, knots[k], derivative) - row(k, knots[k], derivative))
            rhs.append(0.0)
    for k in (1, pieces - 1):  # not-a-knot: third derivative continuous at the 2nd and 2nd-last knot
        rows.append(row(k - 1, knots[k], 3) - row(k, knots[k], 3))
        rhs.append(0.0)
    return np.linalg.solve(np.array(rows), np.array(rhs)).reshape(pieces, 4)


@functools.lru_cache(maxsize=None)
def _device_tables(device):
    """Constant tables on ``device``, built once so that later calls copy nothing from the host."""
    levels = torch.tensor([LEVEL_PARAMS[name] for name in DISTORTIONS], dtype=torch.float64, device=device)
    # lincontrchange's values 0, 0.25 - a/4, 0.5, 0.75 + a/4, 1 are affine in a, so are the
    # spline's coefficients: constant + a * slope.
    constant = _not_a_knot_coefficients(_CONTRAST_KNOTS, (0.0, 0.25, 0.5, 0.75, 1.0))
    slope = _not_a_knot_coefficients(_CONTRAST_KNOTS, (0.0, -0.25, 0.0, 0.25, 0.0))
    spline = torch.tensor(np.stack([constant, slope]), dtype=torch.float32, device=device)
    inner_knots = torch.tensor(_CONTRAST_KNOTS[1:-1], dtype=torch.float32, device=device)
    return levels, spline, inner_knots


# ----------------------------------------------------------------------------- the distortions
# Each takes x (N,3,H,W float32), the per-sample parameter (N,) float64 on x's device, the
# parameter values in use (host floats, for static sizes) and the generator; the caller clips.

def _gaublur(x, p, used, generator):
    return _filter_separable(x, _gaussian_taps(p, max(math.ceil(2 * s) for s in used)))


def _lensblur(x, p, used, generator):
    return _filter2d(x, _disk_kernels(p, max(math.ceil(r) for r in used)))


def _motionblur(x, p, used, generator):
    angle = torch.randint(0, 181, (x.shape[0],), generator=generator, device=x.device).to(torch.float64)
    support = math.ceil((max(used) - 1) / 2 + 1)
    return _filter2d(x, _motion_kernels(p, angle, support))


def _colordiff(x, p, used, generator):
    lab = _rgb_to_lab(x)
    support = max(math.ceil(2 * (1.5 * a + 2)) for a in used)
    ab = _filter_separable(lab[:, 1:], _gaussian_taps(1.5 * p + 2, support)) * _column(p)
    return _floor8(_lab_to_rgb(torch.cat([lab[:, :1], ab], 1)))


def _colorshift(x, p, used, generator):
    n, _, h, w = x.shape
    gray = _mix(x, [_GRAY_WEIGHTS])
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    grad_x = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    grad_y = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    edges = _gaussian_blur_fixed(torch.sqrt(grad_x ** 2 + grad_y ** 2), 4.0, 8)
    lo, hi = edges.amin((1, 2, 3), keepdim=True), edges.amax((1, 2, 3), keepdim=True)
    edges = torch.where(hi > lo, (edges - lo) / (hi - lo), edges)
    ranked = edges.flatten(1).sort(dim=1).values
    k = min(max(round(0.99 * h * w) - 1, 0), h * w - 1)
    edges = edges.clamp(min=ranked[:, h * w - 1 - k].view(n, 1, 1, 1), max=ranked[:, k].view(n, 1, 1, 1))
    # Shift (down, right) of length p in a random direction of the first quadrant.
    direction = torch.rand((n, 2), generator=generator, device=x.device, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp(min=1e-12)
    shift = torch.round(direction * p[:, None]).long()
    rows = (torch.arange(h, device=x.device) - shift[:, :1]).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device) - shift[:, 1:]).clamp(0, w - 1)
    green = x[:, 1]
    shifted = green.gather(1, rows[:, :, None].expand(n, h, w)).gather(2, cols[:, None, :].expand(n, h, w))
    e = edges[:, 0]
    return torch.stack([x[:, 0], shifted * e + green * (1 - e), x[:, 2]], 1)


def _colorsat1(x, p, used, generator):
    # Scaling HSV saturation by f keeps hue and value: each channel c becomes v - f * (v - c).
    value = x.amax(1, keepdim=True)
    return value + _column(p) * (x - value)


def _colorsat2(x, p, used, generator):
    lab = _rgb_to_lab(x)
    return _floor8(_lab_to_rgb(torch.cat([lab[:, :1], lab[:, 1:] * _column(p)], 1)))


def _codec(x, p, encode):
    """Round to 8 bits, ``encode(PIL image, parameter) -> bytes`` and decode, image by image on the CPU."""
    images = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for image, value in zip(images, p.tolist()):
        with Image.open(io.BytesIO(encode(Image.fromarray(image), value))) as out:
            decoded.append(np.asarray(out.convert("RGB")))
    return torch.from_numpy(np.stack(decoded)).to(x.device).permute(0, 3, 1, 2).to(torch.float32) / 255


def _encode_jpeg(image, quality):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(quality), subsampling=2)  # 4:2:0 as libjpeg's default
    return buf.getvalue()


def _encode_jpeg2000(image, ratio):
    # OpenJPEG needs every side to be at least 2**(resolutions - 1) pixels; ARNIQA uses 8.
    resolutions = min(8, int(math.log2(min(image.size))) + 1)
    buf = io.BytesIO()
    image.save(buf, format="JPEG2000", quality_mode="rates", quality_layers=[int(ratio)],
               num_resolutions=resolutions, prog_order="LRCP")
    return buf.getvalue()


def _jpeg2000(x, p, used, generator):
    if not features.check("jpg_2000"):
        raise RuntimeError("distortion 'jpeg2000' needs Pillow built with OpenJPEG "
                           "(PIL.features.check('jpg_2000') is False); install a Pillow wheel that includes it")
    return _codec(x, p, _encode_jpeg2000)


def _jpeg(x, p, used, generator):
    return _codec(x, p, _encode_jpeg)


def _randn(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def _whitenoise(x, p, used, generator):
    return x + _randn(x, generator) * _column(p.sqrt())


def _whitenoise_cc(x, p, used, generator):
    # Noise of variance p on Y, Cb and Cr, mapped back to RGB by the exact inverse.
    return x + _mix(_randn(x, generator), _RGB_FROM_YCBCR) * _column(p.sqrt())


def _impulsenoise(x, p, used, generator):
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    d = _column(p)
    return torch.where(u < d / 2, 1.0, torch.where(u < d, 0.0, x))


def _multnoise(x, p, used, generator):
    return x + x * _randn(x, generator) * _column(p.sqrt())


def _brighten(x, p, used, generator):
    middle = _column(0.5 + p / 2)
    lab = _rgb_to_lab(x)
    lightness = _parabola_curve(lab[:, :1] / 100, middle) * 100
    return (2 * _parabola_curve(x, middle) + _lab_to_rgb(torch.cat([lightness, lab[:, 1:]], 1))) / 3


def _darken(x, p, used, generator):
    return _parabola_curve(x, _column(0.5 - p / 2))


def _meanshift(x, p, used, generator):
    return x + _column(p)


def _jitter(x, p, used, generator):
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device, dtype=torch.float32).view(1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, w)
    scale = _column(p)
    for _ in range(5):  # ARNIQA scatters 5 times; each round moves every pixel by N(0, p^2) per axis
        shift = torch.randn((n, 2, h, w), generator=generator, device=x.device) * scale
        src_rows, src_cols = rows - shift[:, 0], cols - shift[:, 1]
        grid = torch.stack([src_cols / max(w - 1, 1) * 2 - 1, src_rows / max(h - 1, 1) * 2 - 1], -1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return x


def _noneccpatch(x, p, used, generator):
    n, _, h, w = x.shape
    size = _NONECC_PATCH
    count = int(max(used))
    # Source corners in [size, side - 2*size]; the copy lands within +-size/2 of it. Drawn for the
    # largest level, so that with one generator state each level's patches extend the previous'.
    u = torch.rand((4, n, max(LEVEL_PARAMS["noneccpatch"])), generator=generator, device=x.device,
                   dtype=torch.float64)
    src_r = torch.round(u[0] * (h - 3 * size)).long() + size
    src_c = torch.round(u[1] * (w - 3 * size)).long() + size
    dst_r = torch.round((u[2] - 0.5) * size + src_r).long()
    dst_c = torch.round((u[3] - 0.5) * size + src_c).long()
    active = torch.arange(count, device=x.device)[None, :] < p[:, None]
    offsets = torch.arange(size, device=x.device)
    # Pixels as rows of an (N*H*W, 3) table: each patch is one gather and one index_copy_.
    y = x.permute(0, 2, 3, 1).reshape(n * h * w, 3).clone()
    base = (torch.arange(n, device=x.device) * (h * w)).view(n, 1, 1)
    grid = offsets.view(1, size, 1) * w + offsets.view(1, 1, size)
    for i in range(count):  # sequential, as in ARNIQA: a patch may copy an earlier patch
        src = (base + (src_r[:, i] * w + src_c[:, i]).view(n, 1, 1) + grid).flatten()
        dst = (base + (dst_r[:, i] * w + dst_c[:, i]).view(n, 1, 1) + grid).flatten()
        # Inactive samples copy their destination onto itself.
        src = torch.where(active[:, i].view(n, 1, 1).expand(n, size, size).flatten(), src, dst)
        y.index_copy_(0, dst, y.index_select(0, src))
    return y.view(n, h, w, 3).permute(0, 3, 1, 2)


def _pixelate(x, p, used, generator):
    n, _, h, w = x.shape
    factor = 0.95 - p ** 0.6

    def index(side):
        # Nearest down to floor(side * factor), then nearest back up, with PyTorch's float32
        # source index floor(i * in / out) both ways.
        small = torch.floor(side * factor).to(torch.float32).clamp(min=1)[:, None]
        i = torch.arange(side, device=x.device, dtype=torch.float32)[None, :]
        low = torch.minimum(torch.floor(i * (small / side)), small - 1)
        return torch.floor(low * (side / small)).clamp(max=side - 1).long()

    rows, cols = index(h), index(w)
    y = x.gather(2, rows.view(n, 1, h, 1).expand(n, 3, h, w))
    return y.gather(3, cols.view(n, 1, 1, w).expand(n, 3, h, w))


def _quantization(x, p, used, generator):
    # Thresholds int(255 * k / L), k = 1..L-1 (ARNIQA's histogram edges); value 0 has a bucket of
    # its own. Bucket indices are then stretched to [0, 1] by the image's min and max.
    v = x * 255
    bucket = (v > 0).to(torch.float32)
    for k in range(1, int(max(used))):
        threshold = torch.where(k < p, torch.floor(255.0 * k / p), math.inf)
        bucket = bucket + (v > _column(threshold)).to(torch.float32)
    lo, hi = bucket.amin((1, 2, 3), keepdim=True), bucket.amax((1, 2, 3), keepdim=True)
    return torch.where(hi > lo, (bucket - lo) / (hi - lo), bucket)


def _colorblock(x, p, used, generator):
    n, _, h, w = x.shape
    size = _COLOR_BLOCK
    count = int(max(used))
    most = max(LEVEL_PARAMS["colorblock"])  # drawn for the largest level, as in noneccpatch
    colors = torch.rand((n, most, 3), generator=generator, device=x.device, dtype=torch.float32)
    corners = torch.rand((2, n, most), generator=generator, device=x.device, dtype=torch.float64)
    top = torch.floor(corners[0] * (h - size)).long()
    left = torch.floor(corners[1] * (w - size)).long()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    y = x
    for i in range(count):  # later blocks cover earlier ones
        inside = ((rows >= top[:, i].view(n, 1, 1)) & (rows < top[:, i].view(n, 1, 1) + size)
                  & (cols >= left[:, i].view(n, 1, 1)) & (cols < left[:, i].view(n, 1, 1) + size)
                  & (i < p).view(n, 1, 1))
        y = torch.where(inside[:, None], colors[:, i].view(n, 3, 1, 1), y)
    return y


def _highsharpen(x, p, used, generator):
    lab = _rgb_to_lab(x)
    lightness = lab[:, :1]
    # Unsharp mask on L*: MATLAB fspecial('gaussian', 13, 6), as ARNIQA (radius 3 -> 6).
    sharp = lightness + _column(p) * (lightness - _gaussian_blur_fixed(lightness, 6.0, 6))
    return _lab_to_rgb(torch.cat([sharp, lab[:, 1:]], 1))


def _lincontrchange(x, p, used, generator):
    _, spline, inner_knots = _device_tables(x.device)
    coefficients = spline[0] + p.to(torch.float32)[:, None, None] * spline[1]  # (N, pieces, 4)
    piece = torch.bucketize(x.contiguous(), inner_knots).flatten(1)
    y = torch.zeros_like(x)
    for power in (3, 2, 1, 0):  # Horner
        c = coefficients[:, :, power].gather(1, piece).view_as(x)
        y = y * x + c
    return y.clamp(0, 1)


def _nonlincontrchange(x, p, used, generator):
    offset = _column(p)
    return (2 * offset * x.clamp(0, 1) + 0.5 - offset).clamp(0.5 - offset, 0.5 + offset)


_FUNCTIONS = {
    "gaublur": _gaublur, "lensblur": _lensblur, "motionblur": _motionblur,
    "colordiff": _colordiff, "colorshift": _colorshift, "colorsat1": _colorsat1, "colorsat2": _colorsat2,
    "jpeg2000": _jpeg2000, "jpeg": _jpeg,
    "whitenoise": _whitenoise, "whitenoiseCC": _whitenoise_cc, "impulsenoise": _impulsenoise,
    "multnoise": _multnoise,
    "brighten": _brighten, "darken": _darken, "meanshift": _meanshift,
    "jitter": _jitter, "noneccpatch": _noneccpatch, "pixelate": _pixelate, "quantization": _quantization,
    "colorblock": _colorblock,
    "highsharpen": _highsharpen, "lincontrchange": _lincontrchange, "nonlincontrchange": _nonlincontrchange,
}
# Smallest image side each patch-based distortion accepts (ARNIQA's position ranges).
MIN_SIDE = {"noneccpatch": 3 * _NONECC_PATCH, "colorblock": _COLOR_BLOCK}


# ----------------------------------------------------------------------------- public entry

def _level_params(name, level, n, device):
    """Per-sample parameter (N,) float64 on ``device`` and the parameter values in use (host)."""
    table = LEVEL_PARAMS[name]
    if isinstance(level, torch.Tensor):
        if level.dtype.is_floating_point or level.dtype.is_complex or level.dtype == torch.bool:
            raise ValueError(f"level must be an integer tensor, got {level.dtype}")
        if level.shape != (n,):
            raise ValueError(f"a level tensor needs shape ({n},) (one level per image of an (N, 3, H, W) batch), "
                             f"got {tuple(level.shape)}")
        # Only checked on the host; on a device it would cost a synchronisation.
        if level.device.type == "cpu" and n and (int(level.min()) < 1 or int(level.max()) > NUM_LEVELS):
            raise ValueError(f"levels must be in 1..{NUM_LEVELS}, got min {int(level.min())}, max {int(level.max())}")
        levels = _device_tables(device)[0]
        return levels[DISTORTIONS.index(name)][level.to(device=device, dtype=torch.long) - 1], table
    if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 1 <= level <= NUM_LEVELS:
        raise ValueError(f"level must be an integer in 1..{NUM_LEVELS} (1 = mildest) or an (N,) integer tensor, "
                         f"got {level!r}")
    value = table[int(level) - 1]
    return torch.full((n,), float(value), dtype=torch.float64, device=device), (value,)


def distort(image, name, level, generator=None):
    """Apply ARNIQA distortion ``name`` at ``level`` (1 = mildest .. 5) to ``image``.

    Args:
        image: float tensor ``(3, H, W)`` or ``(N, 3, H, W)`` with values in [0, 1], any device.
        name: one of ``DISTORTIONS``.
        level: int 1..5, or for an ``(N, 3, H, W)`` batch an ``(N,)`` integer tensor (one level per
            image; range-checked only when it is on the CPU).
        generator: optional ``torch.Generator`` on ``image.device`` for the random distortions
            (``RANDOM_DISTORTIONS``); the same generator state gives the same result.

    Returns:
        Tensor of ``image``'s shape, dtype and device, values in [0, 1].
    """
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown distortion {name!r}; valid names: {', '.join(DISTORTIONS)}")
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or image.shape[-3] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) or (N, 3, H, W) tensor, got {shape}")
    if not image.dtype.is_floating_point:
        raise ValueError(f"image must be a float tensor with values in [0, 1], got {image.dtype}")
    if isinstance(level, torch.Tensor) and image.ndim == 3:
        raise ValueError("a level tensor needs an (N, 3, H, W) batch; pass an int level for one image")
    h, w = image.shape[-2:]
    if min(h, w) < MIN_SIDE.get(name, 1):
        raise ValueError(f"distortion {name!r} needs images of at least {MIN_SIDE[name]} pixels a side, "
                         f"got {h}x{w}")
    batch = image if image.ndim == 4 else image.unsqueeze(0)
    device = image.device
    params, used = _level_params(name, level, batch.shape[0], device)
    amp_off = (torch.autocast(device.type, enabled=False)
               if torch.amp.is_autocast_available(device.type) else contextlib.nullcontext())
    with amp_off:
        out = _FUNCTIONS[name](batch.to(torch.float32), params, used, generator).clamp(0, 1)
    out = out.to(image.dtype)
    return out if image.ndim == 4 else out.squeeze(0)


# ----------------------------------------------------------------------------- compositions

GROUP_OF = {name: group for group, names in DISTORTION_GROUPS.items() for name in names}
CODECS = DISTORTION_GROUPS["jpeg"]  # the two distortions computed on the CPU (Pillow)
# ARNIQA's training setting (config.yaml, training.data.max_distortions; distort_images' default).
MAX_DISTORTIONS = 4
NO_DISTORTION = -1  # pads a composition to one entry per group
JPEG_CODECS = ("pil", "cuda")


def parse_groups(value):
    """``--arniqa_groups``: names (a list, or one comma/space separated string) or ``all`` -> group names
    in ``DISTORTION_GROUPS`` order."""
    items = [value] if isinstance(value, str) else value
    names = [part for item in items for part in str(item).replace(",", " ").split()]
    if names == ["all"]:
        return list(DISTORTION_GROUPS)
    unknown = [name for name in names if name not in DISTORTION_GROUPS]
    if unknown or not names:
        raise UserError(f"--arniqa_groups: unknown or no group ({', '.join(unknown) or 'empty'}); valid names: "
                        f"{', '.join(DISTORTION_GROUPS)} or all")
    return [group for group in DISTORTION_GROUPS if group in names]


def composition_settings(groups, max_distortions, crop_size):
    """``--arniqa_groups`` (None = all), ``--max_distortions`` (None = ``MAX_DISTORTIONS``, at most the
    number of groups) and ``--crop_size`` checked -> (group names, max_distortions)."""
    groups = parse_groups(groups or "all")
    if max_distortions is None:
        max_distortions = min(MAX_DISTORTIONS, len(groups))
    if isinstance(max_distortions, bool) or not isinstance(max_distortions, numbers.Integral) \
            or not 1 <= max_distortions <= len(groups):
        raise UserError(f"--max_distortions must be an integer in 1..{len(groups)} (the number of --arniqa_groups), "
                        f"got {max_distortions!r}")
    too_small = sorted({name for group in groups for name in DISTORTION_GROUPS[group]
                        if MIN_SIDE.get(name, 1) > crop_size})
    if too_small:
        raise UserError(f"--crop_size {crop_size} is too small for {', '.join(too_small)} (needs "
                        f"{max(MIN_SIDE[name] for name in too_small)}); use a larger --crop_size or leave its group "
                        f"out of --arniqa_groups")
    return groups, int(max_distortions)


def draw_composition(rng, groups, max_distortions):
    """ARNIQA's composition (its ``get_distortions_composition``): 1..``max_distortions`` distinct groups
    of ``groups`` in random order, one distortion drawn from each, all from ``rng`` (a numpy Generator).

    Returns a ``(len(DISTORTION_GROUPS),)`` long tensor of indices into ``DISTORTIONS``, in the order
    they are applied, padded with ``NO_DISTORTION``. Levels are not drawn: every level is used.
    """
    if not 1 <= max_distortions <= len(groups):
        raise ValueError(f"max_distortions must be in 1..{len(groups)} (the number of groups), got {max_distortions}")
    count = int(rng.integers(1, max_distortions + 1))
    composition = torch.full((len(DISTORTION_GROUPS),), NO_DISTORTION, dtype=torch.long)
    for step, group in enumerate(rng.choice(len(groups), size=count, replace=False).tolist()):
        names = DISTORTION_GROUPS[groups[group]]
        composition[step] = DISTORTIONS.index(names[int(rng.integers(len(names)))])
    return composition


def _generator(device, generator):
    if generator is not None:
        return generator
    # Levels share their random draws by replaying one generator state, so a generator is needed.
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, ())))


def distort_levels(crops, name, levels, generator=None, jpeg="pil"):
    """Distortion ``name`` at each of ``levels`` (ints 1..5): ``crops`` ``(N, L, 3, H, W)`` float in
    [0, 1] -> the same shape, ``[:, j]`` distorted at ``levels[j]``.

    Every level replays the same generator state, so the random draws (noise field, blur angle,
    patch positions, ...) of a crop are the same at every level: its levels differ only in
    intensity. ``jpeg='cuda'`` runs ``jpeg`` through nvjpeg (``degradation_generator.cuda_jpeg``,
    not pixel-identical to Pillow) instead of Pillow.
    """
    if jpeg not in JPEG_CODECS:
        raise ValueError(f"jpeg must be one of {', '.join(JPEG_CODECS)}, got {jpeg!r}")
    if crops.ndim != 5 or crops.shape[1] != len(levels):
        raise ValueError(f"crops must be (N, {len(levels)}, 3, H, W) for {len(levels)} levels, "
                         f"got {tuple(crops.shape)}")
    generator = _generator(crops.device, generator)
    state = generator.get_state()
    out = []
    for j, level in enumerate(levels):
        generator.set_state(state)
        if name == "jpeg" and jpeg == "cuda":
            pixels = (crops[:, j] * 255).round().clamp(0, 255).to(torch.uint8)
            quality = LEVEL_PARAMS["jpeg"][level - 1]
            out.append(cuda_jpeg(pixels, [quality] * len(pixels)).to(crops.dtype) / 255)
        else:
            out.append(distort(crops[:, j], name, level, generator))
    return torch.stack(out, 1)


def distort_compositions(crops, compositions, levels, generator=None, first_step=None, jpeg="pil"):
    """Apply each image's composition to all its crops at every level, batched over the images.

    Args:
        crops: ``(B, C, L, 3, H, W)`` float in [0, 1], any device: C crops of each image at L levels.
        compositions: ``(B, K)`` long tensor on the CPU (as the DataLoader delivers it), indices into
            ``DISTORTIONS`` in the order they are applied, padded with ``NO_DISTORTION``.
        levels: the L levels (ints 1..5), one per index of the third axis.
        generator: ``torch.Generator`` on ``crops.device`` for the random distortions.
        first_step: ``(B,)`` long tensor on the CPU, or None (0): the steps before it are skipped
            (already applied elsewhere, e.g. a codec and what precedes it in a data worker).
        jpeg: ``'pil'`` or ``'cuda'``, as in :func:`distort_levels`.

    Step by step, the images whose composition has distortion d at that step are gathered and
    distorted in one :func:`distort_levels` call per (step, distortion): no loop over images, and
    the row indices come from the host (no device read-back). Returns the same shape, in [0, 1].
    """
    b, c, num_levels = crops.shape[:3]
    if compositions.device.type != "cpu" or compositions.ndim != 2 or compositions.shape[0] != b:
        raise ValueError(f"compositions must be a ({b}, K) CPU tensor, got {tuple(compositions.shape)} "
                         f"on {compositions.device}")
    steps = torch.arange(compositions.shape[1])
    first_step = torch.zeros(b, dtype=torch.long) if first_step is None else first_step.cpu()
    todo = torch.where(steps[None, :] >= first_step[:, None], compositions, NO_DISTORTION)
    if not bool((todo != NO_DISTORTION).any()):
        return crops
    generator = _generator(crops.device, generator)
    out = crops.clone()
    for step in range(todo.shape[1]):
        column = todo[:, step]
        for index in column[column != NO_DISTORTION].unique().tolist():
            rows = (column == index).nonzero().flatten()
            rows = (rows.pin_memory() if crops.device.type == "cuda" else rows).to(crops.device, non_blocking=True)
            selected = out.index_select(0, rows)
            distorted = distort_levels(selected.flatten(0, 1), DISTORTIONS[index], levels, generator, jpeg)
            out.index_copy_(0, rows, distorted.view_as(selected))
    return out


__all__ = ["DISTORTION_GROUPS", "DISTORTIONS", "LEVEL_PARAMS", "NUM_LEVELS", "RANDOM_DISTORTIONS", "distort",
           "GROUP_OF", "CODECS", "MAX_DISTORTIONS", "MIN_SIDE", "NO_DISTORTION", "parse_groups", "composition_settings",
           "draw_composition",
           "distort_levels", "distort_compositions"]
