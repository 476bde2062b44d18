"""Decoded-once image cache, the patch datasets of Stage 2, the DataLoader and the normalisation.

Every image is decoded (``iqa.datasets.load_rgb``) and resized **once** (shorter side to
``resize``, aspect kept, or to a fixed ``[width, height]``; images smaller than a patch are
upscaled so one fits) into a uint8 ``3×H×W`` tensor.  The datasets then only slice those tensors: a worker never decodes, never
converts to float; ImageNet normalisation happens on the device (``to_model_input``).

* ``TrainPatchDataset``: ``patch_num`` random crops (+ horizontal flip) per image per epoch.
  The crops of an epoch are drawn up front from a generator seeded with (seed, epoch), so the
  data of an epoch depend on nothing else: not on the number of workers, not on the global RNG,
  not on whether the run was resumed.
* ``EvalPatchDataset``: ``patch_num`` crops per image on a deterministic grid (or seeded random
  crops); items carry the image index so scores can be averaged per image.
* ``make_loader``: the one DataLoader factory (Stage 1's training data, Stage 2's patches,
  evaluation); ``to_model_input``: uint8 batch -> ImageNet-normalised float on the device.
"""
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from iqa import datasets

DEFAULT_RESIZE = 384  # shorter side of every image both stages see; KonIQ 1024×768 -> 512×384, as in HyperIQA
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FORK = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def resized_size(width, height, resize, patch_size):
    """``(w, h)`` with the shorter side scaled to ``resize`` (0 = native), or ``resize`` itself when it
    is a fixed ``[width, height]``; never below ``patch_size``."""
    if isinstance(resize, (list, tuple)):
        return max(patch_size, int(resize[0])), max(patch_size, int(resize[1]))
    short = min(width, height)
    target = max(resize or short, patch_size)
    if target == short:
        return width, height
    scale = target / short
    return max(patch_size, round(width * scale)), max(patch_size, round(height * scale))


def resize_rgb(image, resize, patch_size):
    """An RGB PIL image -> uint8 ``3×H×W`` tensor, resized with PIL bicubic (antialiased); a fixed
    ``[width, height]`` with PIL bilinear, which is what HyperIQA's torchvision ``Resize((h, w))``
    does to PIL images."""
    size = resized_size(*image.size, resize, patch_size)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR if isinstance(resize, (list, tuple)) else Image.BICUBIC)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_resized(sample, resize, patch_size):
    """One sample decoded and resized by ``resize_rgb``."""
    return resize_rgb(datasets.load_rgb(sample.path, sample.origin), resize, patch_size)


def decode_threads(processes_per_node=1):
    """Decoding threads per process: the node's cores shared by the processes on that node."""
    return max(1, min(16, (os.cpu_count() or 1) // max(1, processes_per_node)))


def _parallel_map(fn, items, threads, desc, progress):
    """``[fn(x) for x in items]`` on a thread pool with a progress bar; the first error cancels the rest."""
    with ThreadPoolExecutor(threads or decode_threads()) as pool:
        try:
            return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not progress, leave=False))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def cache_images(samples, resize, patch_size, *, threads=None, device=None, desc="decode", progress=True):
    """Decode and resize every sample once (thread pool) -> list of uint8 tensors.

    A file that is missing or does not decode raises ``UserError`` naming it (from ``load_rgb``).
    ``device``: keep the cache there (``--cache_on_device``), so crops are sliced on the GPU.
    """
    images = _parallel_map(lambda s: load_resized(s, resize, patch_size), samples, threads, desc, progress)
    if device is not None and torch.device(device).type != "cpu":
        images = [image.to(device) for image in images]
    return images


def verify_images(items, *, threads=None, progress=True):
    """Check that every ``(path, origin)`` decodes (JPEGs at reduced scale, see ``load_rgb``).

    For data decoded lazily by workers (Stage 1): a bad file stops the run at start, named,
    instead of mid-epoch.
    """
    def check(item):
        datasets.load_rgb(*item, reduced=True)  # result dropped: only the decode matters

    _parallel_map(check, items, threads, "check images", progress)


def crop(image, top, left, patch_size):
    return image[:, top:top + patch_size, left:left + patch_size]


def epoch_generator(seed, epoch):
    """A CPU generator that depends on (seed, epoch) only."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class TrainPatchDataset(Dataset):
    """``len = n_images * patch_num``; item = (uint8 random crop, randomly flipped; float target)."""

    def __init__(self, images, targets, patch_num, patch_size, seed=0):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.float32)
        self.patch_num = patch_num
        self.patch_size = patch_size
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        """Draw this epoch's crop positions and flips: (row fraction, column fraction, flip)."""
        self.plan = torch.rand(len(self), 3, generator=epoch_generator(self.seed, epoch))

    def __len__(self):
        return len(self.images) * self.patch_num

    def __getitem__(self, index):
        image_index = index // self.patch_num
        image = self.images[image_index]
        row, col, flip = self.plan[index].tolist()
        top = int(row * (image.shape[1] - self.patch_size + 1))
        left = int(col * (image.shape[2] - self.patch_size + 1))
        patch = crop(image, top, left, self.patch_size)
        return (patch.flip(-1) if flip < 0.5 else patch), self.targets[image_index]


def _spaced(extent, count):
    if count == 1:
        return [extent // 2]
    return np.linspace(0, extent, count).round().astype(int).tolist()


def grid_offsets(height, width, patch_size, patch_num):
    """``patch_num`` (top, left) offsets spread over a rows×cols grid matching the aspect ratio.

    One patch is the centre crop; otherwise the grid has corners at the image corners and the
    ``patch_num`` positions are taken evenly from it in row-major order.
    """
    cols = max(1, min(patch_num, int(np.ceil(np.sqrt(patch_num * width / height)))))
    rows = int(np.ceil(patch_num / cols))
    positions = [(top, left) for top in _spaced(height - patch_size, rows)
                 for left in _spaced(width - patch_size, cols)]
    picks = np.linspace(0, len(positions) - 1, patch_num).round().astype(int)
    return [positions[i] for i in picks]


def random_offsets(height, width, patch_size, patch_num, generator):
    tops = torch.randint(0, height - patch_size + 1, (patch_num,), generator=generator)
    lefts = torch.randint(0, width - patch_size + 1, (patch_num,), generator=generator)
    return list(zip(tops.tolist(), lefts.tolist()))


class EvalPatchDataset(Dataset):
    """``len = n_images * patch_num``; item = (uint8 crop, index of its image in ``images``)."""

    def __init__(self, images, patch_num, patch_size, random_crop=False, seed=0):
        self.images = images
        self.patch_num = patch_num
        self.patch_size = patch_size
        generator = epoch_generator(seed, 0)
        self.offsets = [
            random_offsets(img.shape[1], img.shape[2], patch_size, patch_num, generator) if random_crop
            else grid_offsets(img.shape[1], img.shape[2], patch_size, patch_num)
            for img in images
        ]

    def __len__(self):
        return len(self.images) * self.patch_num

    def __getitem__(self, index):
        image_index, k = divmod(index, self.patch_num)
        top, left = self.offsets[image_index][k]
        return crop(self.images[image_index], top, left, self.patch_size), image_index


# ----------------------------------------------------------------------------- loading and normalisation

def make_loader(dataset, batch_size, num_workers, device, *, sampler=None, generator=None, drop_last=False):
    """A DataLoader over uint8 items in ``sampler``'s order (None: in order); ``generator`` seeds the
    workers' base seed.  In-process when the dataset's images already live on the device."""
    images = getattr(dataset, "images", None)
    on_device = bool(images) and images[0].device.type != "cpu"
    workers = 0 if on_device else num_workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda" and not on_device, drop_last=drop_last, generator=generator,
                      multiprocessing_context=_FORK if workers else None)


_NORMALISATION = {}


def _normalisation(device):
    """ImageNet mean/std on ``device``, built once per device (no host-to-device copy per step)."""
    if device not in _NORMALISATION:
        _NORMALISATION[device] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255.0
                                       for v in (IMAGENET_MEAN, IMAGENET_STD))
    return _NORMALISATION[device]


def to_model_input(images, device, channels_last=False):
    """uint8 (or float 0..255) N×3×H×W on any device -> ImageNet-normalised float32 on ``device``."""
    mean, std = _normalisation(torch.device(device))
    x = (images.to(device, non_blocking=True).float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
