"""Synthetic degradations for Stage-1 pretraining (docs/method.md, "Data").

Four distortion types, five levels each, always ordered from mildest to strongest:

=============  ==============================================================
``blur``       Gaussian σ (pixels) 0.5, 1.0, 1.5, 2.0, 2.5
``jpeg``       JPEG quality 85, 70, 55, 40, 25 (libjpeg encode + decode, 4:2:0)
``noise``      additive Gaussian σ 5, 10, 15, 20, 25 on the 0–255 scale, clipped
``brightness`` pixel × f for f = 1.3, 0.7, 1.5, 0.5, 0.3, clipped
=============  ==============================================================

Brightness: the original recipe lists the factors as 0.7, 0.5, 0.3, 1.3, 1.5, which is not an order of
severity; the ranking loss needs one, so the same five factors are ordered by ``|ln f|``.

Everything happens in **pixel space** (uint8 values 0..255); ImageNet normalisation comes
afterwards, in the model-input step.  Every output is rounded to the nearest integer (ties to
even) and clipped to 0..255, exactly as if it were stored as an 8-bit image.

Two implementations of the same degradations:

* :class:`SyntheticDegradation` works on one PIL RGB image (data workers, the naive baseline).
* :func:`degrade_batch` works on an ``N×3×H×W`` tensor on any device with a distortion type and
  a level **per sample**, so that on a GPU the CPU only decodes and crops.

Blur is a true Gaussian in both (kernel radius ``int(4σ + 0.5)``, i.e. scipy's default
``truncate=4``, normalised to sum 1; separable; borders mirrored without repeating the edge
pixel: scipy ``mode='mirror'`` = torch ``'reflect'``).  ``PIL.ImageFilter.GaussianBlur`` is
*not* used: on a textured 224×224 photo it differs from ``scipy.ndimage.gaussian_filter`` by up
to 3 grey levels inside the image and up to 15 at the borders (it is an extended-box
approximation with clamped edges).

Agreement of the two paths (measured, and asserted by ``tests/test_degradation.py``):

* brightness: pixel-identical (both multiply float32 values by the float32 factor);
* blur: max |difference| <= 1 grey level (rounding of values within float error of .5);
  on CPU fewer than 1 % of the pixels differ at all.  On a CUDA GPU with TF32 convolutions
  allowed (``iqa.runtime.init_distributed`` allows them) more pixels differ by 1: TF32 keeps
  10 mantissa bits of the weights and of the first pass's output, a worst-case error of about
  2 × 255 × 2⁻¹¹ ≈ 0.25 before rounding, so the bound of 1 still holds (estimated, not yet
  measured on a GPU);
* noise: different random streams, same distribution (std of output − clean within a few % of
  σ on a mid-grey image).  Both share one unit Gaussian field across the levels of a crop, so
  the levels differ only in σ (``degrade_batch(..., noise_group_size=L)``; the two crops of an
  item draw independent fields);
* jpeg: ``degrade_batch(..., jpeg='torchvision')`` is pixel-identical to the PIL path;
  ``jpeg='cuda'`` (``--jpeg_on cuda``) encodes and decodes on the GPU with nvjpeg
  (:func:`cuda_jpeg`), which is *not* pixel-identical to PIL (its agreement is measured by
  ``make gpu-check``).
"""
import contextlib
import io
import numbers
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from iqa.runtime import UserError

DISTORTION_TYPES = ("blur", "jpeg", "noise", "brightness")
NUM_LEVELS = 5
LEVEL_PARAMS = {
    "blur": (0.5, 1.0, 1.5, 2.0, 2.5),       # Gaussian sigma, pixels
    "jpeg": (85, 70, 55, 40, 25),            # JPEG quality
    "noise": (5.0, 10.0, 15.0, 20.0, 25.0),  # Gaussian sigma, 0..255 scale
    "brightness": (1.3, 0.7, 1.5, 0.5, 0.3),  # multiplicative factor, ordered by |ln f|
}
JPEG_CODECS = ("skip", "torchvision", "cuda")  # degrade_batch(jpeg=...)
JPEG_SUBSAMPLING = 2  # PIL's code for 4:2:0 chroma subsampling (libjpeg's default)
BLUR_TRUNCATE = 4.0

_BLUR, _JPEG, _NOISE, _BRIGHTNESS = range(4)


# ----------------------------------------------------------------------------- parameters

def select_levels(num_levels):
    """0-based indices of ``num_levels`` evenly spaced levels: 5→[0..4], 3→[0,2,4], 2→[0,4], 1→[0]."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, numbers.Integral) or not 1 <= num_levels <= NUM_LEVELS:
        raise UserError(f"--num_levels must be an integer from 1 to {NUM_LEVELS}, got {num_levels!r}")
    return [int(i) for i in np.round(np.linspace(0, NUM_LEVELS - 1, int(num_levels)))]


def _check_type(name):
    if not isinstance(name, str) or name not in DISTORTION_TYPES:
        raise UserError(
            f"--distortion_types: unknown distortion type {name!r}; valid names: {', '.join(DISTORTION_TYPES)}"
        )
    return name


def parse_distortion_types(value):
    """``'blur,jpeg'`` / ``'blur jpeg'`` / ``['blur', 'jpeg']`` / ``'all'`` -> list of names (order kept, no repeats)."""
    if isinstance(value, str):
        names = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        names = [part for item in value for part in str(item).replace(",", " ").split()]
    else:
        raise UserError(f"--distortion_types must be a list or a comma/space separated string, got {value!r}")
    if names == ["all"]:
        return list(DISTORTION_TYPES)
    if not names:
        raise UserError(f"--distortion_types is empty; valid names: {', '.join(DISTORTION_TYPES)}")
    out = []
    for name in names:
        _check_type(name)
        if name not in out:
            out.append(name)
    return out


def blur_radius(sigma):
    """Kernel radius for a Gaussian of ``sigma`` (scipy's ``int(truncate*sigma + 0.5)``)."""
    return int(BLUR_TRUNCATE * float(sigma) + 0.5)


def gaussian_kernel1d(sigma, radius=None):
    """Normalised 1-D Gaussian (float64) of length ``2*radius+1``; zero beyond ``blur_radius(sigma)``."""
    r = blur_radius(sigma)
    radius = r if radius is None else radius
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k[np.abs(x) > r] = 0.0
    return k / k.sum()


MAX_BLUR_RADIUS = blur_radius(max(LEVEL_PARAMS["blur"]))


# ----------------------------------------------------------------------------- PIL / numpy path

def _to_uint8(arr):
    """Round (ties to even) and clip a float32 array to uint8; ``arr`` is overwritten."""
    np.rint(arr, out=arr)
    np.clip(arr, 0, 255, out=arr)
    return arr.astype(np.uint8)


def _blur_array(arr, sigma):
    k = gaussian_kernel1d(sigma)
    y = ndimage.correlate1d(arr.astype(np.float32), k, axis=0, mode="mirror", output=np.float32)
    y = ndimage.correlate1d(y, k, axis=1, mode="mirror", output=np.float32)
    return _to_uint8(y)


def _jpeg_image(img, quality):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality), subsampling=JPEG_SUBSAMPLING)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


def _noise_array(arr, sigma, unit_noise):
    noise = unit_noise * np.float32(sigma)
    noise += arr
    return _to_uint8(noise)


def _brightness_array(arr, factor):
    return _to_uint8(arr.astype(np.float32) * np.float32(factor))


class SyntheticDegradation:
    """One distortion type at ``num_levels`` evenly spaced levels, mildest first.

    ``degrader(pil_rgb_image)`` returns a list of ``num_levels`` PIL RGB images;
    ``degrader.apply(pil_image, level_index)`` applies one of the five levels (0-based index
    into ``LEVEL_PARAMS[type]``, independent of ``num_levels``).

    Noise: one unit-variance Gaussian field is drawn per call and scaled by each level's σ, so
    the levels of one image differ only in strength (``apply(img, i)`` with a generator in the
    same state gives the same image as the corresponding entry of ``degrader(img)``).
    ``rng`` (noise only): a ``numpy.random.Generator`` or an int seed for a reproducible stream.
    With ``rng=None`` every call draws a fresh seed from numpy's global RNG, so that
    ``np.random.seed`` / ``seed_everything`` make runs reproducible and DataLoader workers
    (which PyTorch seeds differently) never share one noise stream after ``fork``.
    """

    def __init__(self, distortion_type, num_levels=5, rng=None):
        self.distortion_type = _check_type(distortion_type)
        self.levels = select_levels(num_levels)
        self.num_levels = len(self.levels)
        if rng is not None and not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        self.rng = rng

    @property
    def params(self):
        """The parameter (σ, quality or factor) of each selected level, mildest first."""
        return [LEVEL_PARAMS[self.distortion_type][i] for i in self.levels]

    def __repr__(self):
        return (f"SyntheticDegradation({self.distortion_type!r}, num_levels={self.num_levels}, "
                f"params={self.params})")

    def _generator(self):
        if self.rng is not None:
            return self.rng
        return np.random.default_rng(np.random.randint(0, 2**31 - 1, size=4))

    def __call__(self, image):
        return self._run(image, self.levels)

    def apply(self, image, level_index):
        """Degrade one PIL image at level ``level_index`` (0..4, 0 = mildest)."""
        if isinstance(level_index, bool) or not isinstance(level_index, numbers.Integral) \
                or not 0 <= level_index < NUM_LEVELS:
            raise ValueError(f"level_index must be an integer in 0..{NUM_LEVELS - 1}, got {level_index!r}")
        return self._run(image, [int(level_index)])[0]

    def _run(self, image, levels):
        image = self._rgb(image)
        t = self.distortion_type
        if t == "jpeg":
            return [_jpeg_image(image, LEVEL_PARAMS[t][i]) for i in levels]
        arr = np.asarray(image)
        if t == "noise":
            # One unit-variance field per call, scaled per level: the levels of one image differ
            # only in noise strength (and drawing once is 5x cheaper than once per level).
            unit = self._generator().standard_normal(arr.shape, dtype=np.float32)
        out = []
        for i in levels:
            p = LEVEL_PARAMS[t][i]
            if t == "blur":
                y = _blur_array(arr, p)
            elif t == "noise":
                y = _noise_array(arr, p, unit)
            else:
                y = _brightness_array(arr, p)
            out.append(Image.fromarray(y))
        return out

    @staticmethod
    def _rgb(image):
        if not isinstance(image, Image.Image):
            raise TypeError(f"SyntheticDegradation expects a PIL image, got {type(image).__name__}")
        return image if image.mode == "RGB" else image.convert("RGB")


# ----------------------------------------------------------------------------- batched tensor path

_TABLES = {}


def _tables(device):
    """Per-device constant tables (built once, so later calls copy nothing from the host)."""
    key = str(device)
    if key not in _TABLES:
        kernels = np.stack([gaussian_kernel1d(s, MAX_BLUR_RADIUS) for s in LEVEL_PARAMS["blur"]])
        _TABLES[key] = {
            "blur": torch.tensor(kernels, dtype=torch.float32, device=device),
            "noise": torch.tensor(LEVEL_PARAMS["noise"], dtype=torch.float32, device=device),
            "brightness": torch.tensor(LEVEL_PARAMS["brightness"], dtype=torch.float32, device=device),
        }
    return _TABLES[key]


def _mirror_index(n, r, device):
    """Indices of a length-``n`` axis padded by ``r`` on each side, mirrored (scipy 'mirror')."""
    i = torch.arange(-r, n + r, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _blur_per_sample(x, kernels):
    """Separable blur of ``x`` (N,C,H,W float32) with one 1-D kernel per sample (N, K)."""
    n, c, h, w = x.shape
    k = kernels.shape[1]
    r = k // 2
    weight = kernels.repeat_interleave(c, dim=0)  # (N*C, K)
    y = x.reshape(1, n * c, h, w)
    y = y.index_select(2, _mirror_index(h, r, x.device))
    y = F.conv2d(y, weight.view(n * c, 1, k, 1), groups=n * c)
    y = y.index_select(3, _mirror_index(w, r, x.device))
    y = F.conv2d(y, weight.view(n * c, 1, 1, k), groups=n * c)
    return y.view(n, c, h, w)


def _index_tensor(value, n, device, what, size, names=None):
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{what} must be an integer tensor, got {value.dtype}")
        t = value
    else:
        items = list(value)
        if names is not None:
            items = [names.index(_check_type(v)) if isinstance(v, str) else v for v in items]
        t = torch.as_tensor(items, dtype=torch.long)
    if t.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},) (one entry per image), got {tuple(t.shape)}")
    if t.device.type == "cpu" and n and (int(t.min()) < 0 or int(t.max()) >= size):
        raise ValueError(f"{what} values must be in 0..{size - 1}, got min {int(t.min())}, max {int(t.max())}")
    return t.to(device=device, dtype=torch.long)


def _unit_noise(x, fields, generator):
    """Unit Gaussian noise for each row of ``x``; ``fields`` = (field index per row on the device,
    number of fields) lets rows share a field, None draws one per row."""
    if fields is None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    index, count = fields
    return torch.randn((count, *x.shape[1:]), generator=generator, device=x.device,
                       dtype=torch.float32).index_select(0, index)


def _degrade(kind, x, levels, tables, generator, noise_fields):
    """One distortion type on every row of ``x`` (float32 0..255) at per-row ``levels``; unrounded."""
    n = x.shape[0]
    if kind == _BLUR:
        return _blur_per_sample(x, tables["blur"][levels])
    if kind == _NOISE:
        return x + _unit_noise(x, noise_fields, generator) * tables["noise"][levels].view(n, 1, 1, 1)
    return x * tables["brightness"][levels].view(n, 1, 1, 1)


def _to_device(index, device):
    return (index.pin_memory() if device.type == "cuda" else index).to(device, non_blocking=True)


def _degrade_rows(x, host_types, levels, tables, generator, group_size):
    """Each type on its own rows, indexed from the host-side types (no device read-back)."""
    out = x.clone()
    for kind in (_BLUR, _NOISE, _BRIGHTNESS):
        rows = (host_types == kind).nonzero().flatten()
        if rows.numel():
            fields = None
            if kind == _NOISE and group_size > 1:  # one field per group present, counted on the host
                groups, index = torch.unique_consecutive(rows // group_size, return_inverse=True)
                fields = (_to_device(index, x.device), len(groups))
            rows = _to_device(rows, x.device)
            degraded = _degrade(kind, x.index_select(0, rows), levels.index_select(0, rows), tables, generator,
                                fields)
            out.index_copy_(0, rows, degraded.round().clamp(0, 255))
    return out


def _degrade_masked(x, dist_types, levels, tables, generator, group_size):
    """Every type on the whole batch, rows picked with ``torch.where`` (types only on the device)."""
    n = x.shape[0]
    fields = None if group_size == 1 else (torch.arange(n, device=x.device) // group_size, n // group_size)
    out = x
    for kind in (_BLUR, _NOISE, _BRIGHTNESS):
        mask = (dist_types == kind).view(-1, 1, 1, 1)
        out = torch.where(mask, _degrade(kind, x, levels, tables, generator, fields).round().clamp(0, 255), out)
    return out


def degrade_batch(images, dist_types, levels, generator=None, jpeg="skip", noise_group_size=1):
    """Degrade a batch, each sample with its own distortion type and level.

    Args:
        images: ``N×3×H×W`` uint8, or float with values in [0, 255], on any device. Float input
            is rounded and clipped first (as if it were an 8-bit image, like the PIL path).
        dist_types: ``(N,)`` integer tensor of indices into ``DISTORTION_TYPES`` (a list of
            names or ints is accepted too). On the CPU (as the DataLoader delivers it), each
            type is computed on its own rows only; on the device, every type is computed on
            the whole batch and selected with ``torch.where`` (no host-device sync either way).
        levels: ``(N,)`` integer tensor of 0-based level indices (0..4) into ``LEVEL_PARAMS``.
        generator: optional ``torch.Generator`` on ``images.device`` for the noise.
        jpeg: ``'skip'`` (default): JPEG rows are returned unchanged, because JPEG is applied
            in the data workers with PIL. ``'cuda'``: JPEG rows go through :func:`cuda_jpeg`
            (nvjpeg on the images' CUDA device; not pixel-identical to PIL; ``UserError`` on a
            CPU). ``'torchvision'``: JPEG rows go through
            ``torchvision.io.encode_jpeg`` / ``decode_jpeg`` on the CPU (4:2:0, like PIL).
            With Pillow 13.0 and torchvision 0.29.1 (both libjpeg-turbo) the encoded bytes are
            identical to PIL's at qualities 85/70/55/40/25 and the decodes pixel-identical
            (``tests/test_degradation.py`` checks this). Both options read the row indices
            back to the host (one sync); ``'torchvision'`` also copies the JPEG rows to the CPU
            and back. torchvision 0.29 deprecates its image codecs in favour of TorchCodec; the
            warning is silenced here.
        noise_group_size: consecutive groups of this many rows share one unit Gaussian noise
            field (each row scales it by its own σ); N must be a multiple of it. With rows
            ordered (image, crop, level), pass the number of levels: the levels of one crop
            then differ only in σ, as in :class:`SyntheticDegradation`, and the crops draw
            independent fields. The default 1 draws a field per row.

    Returns:
        float32 ``N×3×H×W`` on ``images.device`` with integer values in [0, 255].

    Blur, noise and brightness use only tensor ops: no host-device synchronisation, no loop
    over samples or levels. Blur is one depthwise separable convolution over its rows with a
    per-sample 21-tap kernel (zero taps beyond each σ's radius), mirrored borders, in float32
    with autocast disabled; noise is one ``torch.randn`` of one field per group of rows,
    scaled per sample. Agreement with the PIL path: see the module docstring.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be an N×3×H×W tensor, got {shape}")
    if images.dtype == torch.bool or images.dtype.is_complex:
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    if jpeg not in JPEG_CODECS:
        raise ValueError(f"jpeg must be one of {', '.join(map(repr, JPEG_CODECS))}, got {jpeg!r}")
    device = images.device
    n = images.shape[0]
    if isinstance(noise_group_size, bool) or not isinstance(noise_group_size, numbers.Integral) \
            or noise_group_size < 1 or n % noise_group_size:
        raise ValueError(f"noise_group_size must be a positive integer dividing the batch size {n}, "
                         f"got {noise_group_size!r}")
    noise_group_size = int(noise_group_size)
    # Types known on the host (a CPU tensor or a list, as the DataLoader delivers them) let
    # each distortion run on its own rows only, without reading anything back from the device.
    on_host = not (isinstance(dist_types, torch.Tensor) and dist_types.device.type != "cpu")
    host_types = (_index_tensor(dist_types, n, torch.device("cpu"), "dist_types", len(DISTORTION_TYPES),
                                DISTORTION_TYPES) if on_host else None)
    dist_types = _index_tensor(dist_types if host_types is None else host_types, n, device, "dist_types",
                               len(DISTORTION_TYPES), DISTORTION_TYPES)
    levels = _index_tensor(levels, n, device, "levels", NUM_LEVELS)

    amp_off = (torch.autocast(device.type, enabled=False)
               if torch.amp.is_autocast_available(device.type) else contextlib.nullcontext())
    with amp_off:
        x = images.to(torch.float32)
        if images.dtype != torch.uint8:
            x = x.round().clamp(0, 255)
        tables = _tables(device)
        out = (_degrade_rows(x, host_types, levels, tables, generator, noise_group_size) if host_types is not None
               else _degrade_masked(x, dist_types, levels, tables, generator, noise_group_size))

    if jpeg != "skip":
        out = _jpeg_rows(out, dist_types, levels, jpeg)
    return out


def _jpeg_rows(out, dist_types, levels, codec):
    """The JPEG rows of ``out`` encoded and decoded with torchvision on the CPU or with nvjpeg."""
    rows = (dist_types == _JPEG).nonzero().flatten()
    if rows.numel() == 0:
        return out
    qualities = [LEVEL_PARAMS["jpeg"][i] for i in levels.index_select(0, rows).cpu().tolist()]
    src = out.index_select(0, rows).to(torch.uint8)
    if codec == "cuda":
        decoded = cuda_jpeg(src, qualities)
    else:
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        with _quiet_torchvision_codecs():
            decoded = torch.stack([decode_jpeg(encode_jpeg(img.contiguous(), quality=q), mode=ImageReadMode.RGB)
                                   for img, q in zip(src.cpu(), qualities)])
    return out.index_copy(0, rows, decoded.to(device=out.device, dtype=torch.float32))


@contextlib.contextmanager
def _quiet_torchvision_codecs():
    """torchvision 0.29 deprecates its image codecs (in favour of TorchCodec) with a warning per call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities.*",
                                category=DeprecationWarning)
        yield


def cuda_jpeg(images, qualities):
    """JPEG-encode and decode ``images`` (uint8 ``N×3×H×W`` on a CUDA device) with nvjpeg, image ``i``
    at quality ``qualities[i]`` (host ints) -> uint8 ``N×3×H×W`` on the same device.

    Images of one quality are encoded in one batched ``torchvision.io.encode_jpeg`` call; the
    encoded bytes (a few kB per image) go to the host, as ``decode_jpeg`` requires, and are decoded
    on the device. nvjpeg is not libjpeg: the result is close to PIL's, not pixel-identical
    (``make gpu-check`` measures the agreement). On a machine without CUDA: ``UserError``.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"cuda_jpeg expects a uint8 N×3×H×W tensor, got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    if images.device.type != "cuda":
        raise UserError(f"JPEG on the GPU (--jpeg_on cuda) needs a CUDA device, but the images are on "
                        f"{images.device.type} (CUDA available: {torch.cuda.is_available()}); use --jpeg_on worker")
    qualities = [int(q) for q in qualities]
    if len(qualities) != images.shape[0]:
        raise ValueError(f"cuda_jpeg needs one quality per image ({images.shape[0]}), got {len(qualities)}")
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    out = torch.empty_like(images)
    with _quiet_torchvision_codecs():
        for quality in sorted(set(qualities)):
            rows = [i for i, q in enumerate(qualities) if q == quality]
            encoded = encode_jpeg([images[i].contiguous() for i in rows], quality=quality)
            decoded = decode_jpeg([data.cpu() for data in encoded], mode=ImageReadMode.RGB, device=images.device)
            out[rows] = torch.stack(decoded)
    return out


__all__ = [
    "DISTORTION_TYPES", "LEVEL_PARAMS", "NUM_LEVELS", "MAX_BLUR_RADIUS", "SyntheticDegradation",
    "select_levels", "parse_distortion_types", "degrade_batch", "gaussian_kernel1d", "blur_radius", "cuda_jpeg",
]
