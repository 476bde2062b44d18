"""Stage-1 data: two overlapping random crops of clean images, degraded at L levels.

Two degradation models (``degradations``):

* ``'original'``: one distortion type of ``degradation_generator`` per item. Each item is
  ``{'crops': uint8 (2, L, 3, S, S), 'distortion_type': int, 'index': int}``: both crops at the L
  selected levels, mildest first. ``all_types=True`` gives every item the ladders of all its types on
  the same two crops: ``crops`` ``(T, 2, L, 3, S, S)`` and ``distortion_type`` a ``(T,)`` tensor, so
  every training step ranks each type on the same images, in the same proportions.
  With ``degrade_on='device'`` workers only decode, crop and JPEG-encode; blur, noise and brightness
  rows are left clean (the L copies are views of one crop until collation) and are degraded in a
  batch on the training device by
  ``degradation_generator.degrade_batch``.  ``degrade_on='worker'`` applies every degradation with
  PIL in the worker instead.
* ``'arniqa'``: one ARNIQA composition per item (``arniqa.draw_composition``: 1..``max_distortions``
  distortions from distinct groups, random order), the same for both crops and every level, so
  the levels differ only in intensity. Items are ``{'crops', 'composition': long (7,),
  'worker_steps': int, 'index'}``: ``composition`` lists the distortions in order (indices into
  ``arniqa.DISTORTIONS``, padded with -1), and the worker has applied its first ``worker_steps``
  of them. With ``degrade_on='device'`` that is nothing, or, when the composition holds a codec
  (computed on the CPU), every step up to and including the codec; the rest runs batched on the
  device (``arniqa.distort_compositions``). With ``degrade_on='worker'`` the worker applies all.

``jpeg_on='cuda'`` leaves JPEG (not JPEG 2000) to the device, through nvjpeg.

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
from qualiclip_pretrain import arniqa
from qualiclip_pretrain.degradation_generator import (
    DISTORTION_TYPES,
    SyntheticDegradation,
    select_levels,
)

DEGRADATIONS = ("original", "arniqa")
DEGRADE_ON = ("auto", "device", "worker")
JPEG_ON = ("worker", "cuda")


def resolve_degrade_on(degrade_on, device):
    """``--degrade_on auto`` -> ``'device'`` on a CUDA device, ``'worker'`` on the CPU (where the batched
    device path is no faster than the workers and takes the training process's cores)."""
    if degrade_on not in DEGRADE_ON:
        raise UserError(f"--degrade_on '{degrade_on}' is not one of {', '.join(DEGRADE_ON)}")
    if degrade_on != "auto":
        return degrade_on
    return "device" if torch.device(device).type == "cuda" else "worker"


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
    """Clean images -> two overlapping crops at L degradation levels (module docstring).

    ``resize``: shorter side of each clean image before cropping (0 = native size); the CLI passes
    ``--resize`` (384 by default, the scale Stage 2 and the zero-shot evaluation use).
    ``distortion_types``: the original model's types; ``arniqa_groups`` / ``max_distortions``: the
    ARNIQA model's groups (default all) and composition length (default ARNIQA's 4, at most the
    number of groups).
    ``curriculum_types``, ``curriculum_epochs``: in the first ``curriculum_epochs`` epochs (``set_epoch``
    counts from 0) the type is drawn from ``curriculum_types`` only, later from all ``distortion_types``
    (with ``all_types``, every item carries those types' ladders).
    ``all_types``: see the module docstring (original model only).
    """

    def __init__(self, image_paths, crop_size=224, distortion_types=DISTORTION_TYPES, num_levels=5,
                 degrade_on="device", seed=0, resize=0, *, degradations="original", arniqa_groups=None,
                 max_distortions=None, jpeg_on="worker", curriculum_types=(), curriculum_epochs=0,
                 all_types=False):
        if degrade_on not in ("device", "worker"):
            raise UserError(f"--degrade_on '{degrade_on}' is not one of device, worker (resolve auto first)")
        if degradations not in DEGRADATIONS:
            raise UserError(f"--degradations '{degradations}' is not one of {', '.join(DEGRADATIONS)}")
        if jpeg_on not in JPEG_ON:
            raise UserError(f"--jpeg_on '{jpeg_on}' is not one of {', '.join(JPEG_ON)}")
        if jpeg_on == "cuda" and degrade_on == "worker":
            raise UserError("--jpeg_on cuda needs --degrade_on device (or auto on a CUDA device)")
        if curriculum_epochs and not (curriculum_types and set(curriculum_types) <= set(distortion_types)):
            raise UserError(f"--curriculum_types {' '.join(curriculum_types) or '(none)'} must be one or more of "
                            f"--distortion_types {' '.join(distortion_types)}")
        if degradations == "arniqa" and all_types:
            raise UserError("--all_types_per_image applies to --degradations original only")
        self.image_paths = list(image_paths)
        self.crop_size = crop_size
        self.resize = resize
        self.degradations = degradations
        self.distortion_types = list(distortion_types)
        self.curriculum_types = list(curriculum_types)
        self.curriculum_epochs = curriculum_epochs
        self.all_types = all_types
        self.levels = select_levels(num_levels)
        self.degraders = {t: SyntheticDegradation(t, num_levels) for t in self.distortion_types}
        if degradations == "arniqa":
            self.arniqa_groups, self.max_distortions = arniqa.composition_settings(arniqa_groups, max_distortions,
                                                                                   crop_size)
        self.degrade_on = degrade_on
        self.jpeg_on = jpeg_on
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Workers are forked per epoch (no persistent workers), so they see the new epoch."""
        self.epoch = epoch

    def __len__(self):
        return len(self.image_paths)

    def _needs_worker_degradation(self, distortion_type):
        return self.degrade_on == "worker" or (distortion_type == "jpeg" and self.jpeg_on == "worker")

    def _crops(self, rng, index):
        """The two overlapping clean crops of image ``index`` (PIL), offsets drawn from ``rng``."""
        image = resize_for_crops(load_rgb(self.image_paths[index]), self.resize, self.crop_size)
        w, h = image.size
        xs, ys = overlapping_offsets(rng, w, self.crop_size), overlapping_offsets(rng, h, self.crop_size)
        return [image.crop((x, y, x + self.crop_size, y + self.crop_size)) for x, y in zip(xs, ys)]

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        crops = self._crops(rng, index)
        if self.degradations == "arniqa":
            return self._arniqa_item(rng, crops, index)
        drawn_from = self.curriculum_types if self.epoch < self.curriculum_epochs else self.distortion_types
        if self.all_types:
            ladders = [self._ladders(rng, crops, name) for name in drawn_from]
            type_ids = torch.tensor([DISTORTION_TYPES.index(name) for name in drawn_from])
            return {"crops": torch.stack(ladders), "distortion_type": type_ids, "index": index}
        distortion_type = drawn_from[int(rng.integers(len(drawn_from)))]
        return {
            "crops": self._ladders(rng, crops, distortion_type),
            "distortion_type": DISTORTION_TYPES.index(distortion_type),
            "index": index,
        }

    def _ladders(self, rng, crops, distortion_type):
        """uint8 ``(2, L, 3, S, S)``: both crops at every level, or left clean where the device degrades them."""
        views = []
        for crop in crops:
            if self._needs_worker_degradation(distortion_type):
                degrader = self.degraders[distortion_type]
                degrader.rng = rng
                views.append(torch.stack([pil_to_uint8_tensor(im) for im in degrader(crop)]))
            else:
                views.append(pil_to_uint8_tensor(crop).unsqueeze(0).expand(len(self.levels), -1, -1, -1))
        return torch.stack(views)

    def worker_steps(self, composition):
        """How many leading steps of ``composition`` the worker applies (module docstring)."""
        names = [arniqa.DISTORTIONS[i] for i in composition.tolist() if i != arniqa.NO_DISTORTION]
        if self.degrade_on == "worker":
            return len(names)
        on_cpu = [name for name in arniqa.CODECS if not (name == "jpeg" and self.jpeg_on == "cuda")]
        codec_steps = [step for step, name in enumerate(names) if name in on_cpu]
        return codec_steps[-1] + 1 if codec_steps else 0

    def _arniqa_item(self, rng, crops, index):
        composition = arniqa.draw_composition(rng, self.arniqa_groups, self.max_distortions)
        steps = self.worker_steps(composition)
        clean = torch.stack([pil_to_uint8_tensor(crop) for crop in crops])
        views = clean.unsqueeze(1).expand(-1, len(self.levels), -1, -1, -1)
        if steps:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            done = torch.where(torch.arange(len(composition)) < steps, composition, arniqa.NO_DISTORTION)
            degraded = arniqa.distort_compositions(views.unsqueeze(0).float() / 255, done.unsqueeze(0),
                                                   [level + 1 for level in self.levels], generator)
            views = (degraded[0] * 255).round().to(torch.uint8)
        return {"crops": views, "composition": composition, "worker_steps": steps, "index": index}
