"""The one evaluation path: decode a labelled set once, score grid patches, gather over ranks.

Used by Stage 2 (validation, test, cross-dataset), ``cross_dataset_test.py``, ``predict.py`` and
Stage 1's zero-shot validation.  A scorer is any callable mapping an ImageNet-normalised
``N×3×S×S`` batch to N scores (a Stage-2 model: in [0, 1]); per-image scores are the mean over
``EvalOptions.patch_num`` crops.

In-domain and out-of-domain sets differ only in the RMSE they report:

* an ``EvalSet`` made with ``bounds=`` (Stage-2 val/test: the MOS range the model was trained to
  predict on [0, 1]) reports predictions on that MOS scale (a score p becomes lo + p·(hi − lo)),
  the raw ``rmse`` in MOS units and ``rmse_logistic``;
* an ``EvalSet`` made without bounds (cross-dataset sets, ``cross_dataset_test.py``, Stage-1
  zero-shot validation) keeps the model's own scores and reports only ``rmse_logistic``, the
  RMSE after the 4-parameter logistic mapping onto that dataset's MOS: the model never saw
  that MOS scale, so a raw RMSE would compare two different scales.

SRCC/PLCC/PLCC-logistic/KRCC do not depend on the scale.  A NaN/inf prediction is a
``UserError`` naming the set.
"""
import csv
import io
import os
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from iqa import plots
from iqa.datasets import DATASET_NAMES
from iqa.metrics import all_metrics
from iqa.distributed import all_gather_cat
from iqa.patches import EvalPatchDataset, cache_images, decode_threads, make_loader, to_model_input
from iqa.runtime import UserError, atomic_write_text, autocast

# Grid crops averaged per evaluated image: Stage 2, and Stage-1 .pkl files that predate eval_patch_num.
DEFAULT_TEST_PATCH_NUM = 10


def parse_dataset_specs(specs, flag):
    """``["spaq=/data/spaq", ...]`` -> {name: root}; names from ``iqa.datasets.DATASET_NAMES``."""
    parsed = {}
    for spec in specs:
        name, sep, root = spec.partition("=")
        if not sep or not name or not root:
            raise UserError(f"{flag} '{spec}' is not NAME=ROOT (e.g. spaq=/data/spaq)")
        if name not in DATASET_NAMES:
            raise UserError(f"{flag} '{spec}': dataset '{name}' is unknown; choose one of {', '.join(DATASET_NAMES)}")
        if name in parsed:
            raise UserError(f"{flag} names {name} twice; give each dataset once")
        parsed[name] = root
    return parsed


@dataclass
class EvalOptions:
    patch_num: int
    patch_size: int
    batch_size: int
    amp: Optional[torch.dtype] = None
    channels_last: bool = False
    num_workers: int = 0
    random_crop: bool = False
    seed: int = 0


@dataclass
class EvalSet:
    """A labelled image set split over ranks: every rank holds the decoded images of its share."""
    name: str
    samples: list             # all samples, in order
    bounds: Optional[tuple]   # MOS range the scores were trained on (maps [0, 1] to MOS); None: out-of-domain
    indices: list             # positions in ``samples`` of this rank's images
    images: list              # this rank's decoded uint8 images


def make_eval_set(name, samples, resize, patch_size, dist_info, *, bounds=None, on_device=False):
    """Decode this rank's share (every world_size-th image) of ``samples`` once.

    ``bounds``: the (lo, hi) MOS range the scorer was trained on, only for a set on that scale
    (in-domain); leave it None for any other set (see the module docstring)."""
    if len(samples) < 2:
        raise UserError(f"{name} has {len(samples)} image(s); correlation metrics need at least 2")
    indices = list(range(dist_info.rank, len(samples), dist_info.world_size))
    images = cache_images([samples[i] for i in indices], resize, patch_size,
                          threads=decode_threads(dist_info.local_world_size),
                          device=dist_info.device if on_device else None,
                          desc=f"decode {name}", progress=dist_info.is_main)
    return EvalSet(name, list(samples), None if bounds is None else tuple(bounds), indices, images)


def predict_images(score_fn, images, device, opts, progress=True, desc="eval"):
    """Mean score over ``opts.patch_num`` crops of each image -> (len(images),) float64 CPU tensor."""
    dataset = EvalPatchDataset(images, opts.patch_num, opts.patch_size, opts.random_crop, opts.seed)
    sums = torch.zeros(len(images), dtype=torch.float64, device=device)
    loader = make_loader(dataset, opts.batch_size, opts.num_workers, device)
    with torch.inference_mode():
        for patches, index in tqdm(loader, desc=desc, disable=not progress, leave=False):
            x = to_model_input(patches, device, opts.channels_last)
            with autocast(device, opts.amp):
                scores = score_fn(x)
            sums.index_add_(0, index.to(device), scores.double())
    return (sums / opts.patch_num).cpu()


def evaluate(score_fn, eval_set, dist_info, opts, predict=predict_images):
    """Predict every image of ``eval_set`` (ranks share the work) -> (metrics, predictions).

    ``predict`` turns a rank's images into scores (grid crops by default; ``iqa.scoring`` passes its
    whole-image path for scorers without crops).  Predictions are on the training MOS scale for a
    set with bounds, else the model's own scores."""
    local = predict(score_fn, eval_set.images, dist_info.device, opts, progress=dist_info.is_main,
                    desc=f"eval {eval_set.name}")
    scores = all_gather_cat(local.to(dist_info.device), dist_info).cpu()
    order = all_gather_cat(torch.tensor(eval_set.indices, dtype=torch.long, device=dist_info.device), dist_info).cpu()
    full = torch.empty(len(eval_set.samples), dtype=torch.float64)
    full[order] = scores
    bad = int((~torch.isfinite(full)).sum())
    if bad:
        raise UserError(f"{bad} of {len(full)} predictions on '{eval_set.name}' are NaN/inf: the model diverged "
                        f"(or overflowed in fp16); use an earlier checkpoint, a lower learning rate or --amp bf16/off")
    pred = full.numpy()
    if eval_set.bounds is not None:
        lo, hi = eval_set.bounds
        pred = lo + pred * (hi - lo)
    metrics = all_metrics(pred, [s.mos for s in eval_set.samples], on_mos_scale=eval_set.bounds is not None)
    return metrics, pred


def csv_text(rows):
    """``rows`` (lists of cells; predictions as floats, written with 6 decimals) as CSV text."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows([f"{cell:.6f}" if isinstance(cell, float) else cell for cell in row] for row in rows)
    return buffer.getvalue()


def write_predictions(path, samples, pred, column="pred"):
    """CSV ``image, mos, <column>``: ``pred`` for predictions on the MOS scale, ``score`` for a model's own scores."""
    rows = [[s.path, str(s.mos), float(p)] for s, p in zip(samples, pred)]  # the MOS as read, not rounded
    atomic_write_text(path, csv_text([["image", "mos", column], *rows]))


def save_eval_outputs(run_dir, label, eval_set, metrics, pred):
    write_predictions(os.path.join(run_dir, f"predictions_{label}.csv"), eval_set.samples, pred,
                      "pred" if eval_set.bounds is not None else "score")
    plots.plot_scatter(pred, [s.mos for s in eval_set.samples], os.path.join(run_dir, f"scatter_{label}.png"),
                       title=f"{label} ({eval_set.name})", metrics=metrics)
