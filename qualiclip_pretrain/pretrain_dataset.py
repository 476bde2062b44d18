"""Stage-1 data: two overlapping random crops of clean images, one distortion type per item.

Each item is ``{'crops': uint8 (2, L, 3, S, S), 'dist_type': int, 'index': int}``: both crops of
the image at the L selected levels of one distortion type, mildest first.  By default
(``degrade_on='device'``) workers only decode, crop and JPEG-encode; blur, noise and brightness
rows are left clean (the L copies are views of one crop until collation) and are degraded in a
batch on the training device by ``degradation_generator.degrade_batch``.  ``degrade_on='worker'``
applies every degradation with PIL in the worker instead.

Randomness comes from a generator seeded with (seed, epoch, index), so an item is the same
whatever the number of workers, and a resumed run sees exactly the data it would have seen.
"""
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from iqa.datasets import list_image_files, load_rgb
from iqa.patches import resized_size
from iqa.runtime import UserError
from qualiclip_pretrain.degradation_generator import (
    DISTORTION_TYPES,
    SyntheticDegradation,
    select_levels,
)


def list_image_dir(image_dir):
    """All image files under ``image_dir`` (recursive, sorted)."""
    return [os.path.join(image_dir, name) for name in list_image_files(image_dir, "--image_dir")]


def overlapping_offsets(rng, size, crop):
    """Two crop offsets along one axis, at most half a crop apart, both inside ``size``."""
    first = int(rng.integers(0, size - crop + 1))
    lo, hi = max(0, first - crop // 2), min(size - crop, first + crop // 2)
    return first, int(rng.integers(lo, hi + 1))


def resize_for_crops(image, resize, crop_size):
    """Shorter side to ``resize`` (0 = native), as Stage 2 and the evaluation see images; images
    smaller than the crop are upscaled (keeping aspect), never rejected."""
    size = resized_size(*image.size, resize, crop_size)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def pil_to_uint8_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class PretrainDataset(Dataset):
    """Clean images -> two overlapping crops at L degradation levels of one distortion type.

    ``resize``: shorter side of each clean image before cropping (0 = native size); the CLI passes
    ``--resize`` (384 by default, the scale Stage 2 and the zero-shot evaluation use).
    """

    def __init__(self, image_paths, crop_size=224, distortion_types=DISTORTION_TYPES, num_levels=5,
                 degrade_on="device", seed=0, resize=0):
        if degrade_on not in ("device", "worker"):
            raise UserError(f"--degrade_on '{degrade_on}' is not one of device, worker")
        self.image_paths = list(image_paths)
        self.crop_size = crop_size
        self.resize = resize
        self.distortion_types = list(distortion_types)
        self.type_ids = [DISTORTION_TYPES.index(t) for t in self.distortion_types]
        self.levels = select_levels(num_levels)
        self.degraders = {t: SyntheticDegradation(t, num_levels) for t in self.distortion_types}
        self.degrade_on = degrade_on
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Workers are forked per epoch (no persistent workers), so they see the new epoch."""
        self.epoch = epoch

    def __len__(self):
        return len(self.image_paths)

    def _needs_worker_degradation(self, dist_type):
        return self.degrade_on == "worker" or dist_type == "jpeg"

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = resize_for_crops(load_rgb(self.image_paths[index]), self.resize, self.crop_size)
        w, h = image.size
        xs, ys = overlapping_offsets(rng, w, self.crop_size), overlapping_offsets(rng, h, self.crop_size)
        choice = int(rng.integers(len(self.distortion_types)))
        dist_type = self.distortion_types[choice]
        views = []
        for x, y in zip(xs, ys):
            crop = image.crop((x, y, x + self.crop_size, y + self.crop_size))
            if self._needs_worker_degradation(dist_type):
                degrader = self.degraders[dist_type]
                degrader.rng = rng
                views.append(torch.stack([pil_to_uint8_tensor(im) for im in degrader(crop)]))
            else:
                views.append(pil_to_uint8_tensor(crop).unsqueeze(0).expand(len(self.levels), -1, -1, -1))
        return {
            "crops": torch.stack(views),
            "dist_type": self.type_ids[choice],
            "index": index,
        }
