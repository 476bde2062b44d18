"""Stage 1's data selection, training epoch and zero-shot evaluation (``pretrain_qualiclip.py`` runs them).

* ``load_images``: the clean training images, the held-out clean images and the labelled validation
  samples, from KonIQ-10k's split or ``--image_dir`` (``holdout_split``);
* ``make_train_loader`` / ``prepare_batch``: worker batches -> degraded, normalised model input;
* ``train_one_epoch``: one epoch; its loss sums stay on the device and are read back only every
  ``--log_every`` steps (``iqa.training_run.LossMonitor``);
* ``zero_shot_eval``: SRCC/PLCC of the zero-shot score on the validation split.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DistributedSampler, RandomSampler
from tqdm import tqdm

from iqa.datasets import read_index, select_split
from iqa.distributed import DistInfo
from iqa.evaluation import EvalOptions, evaluate
from iqa.patches import make_loader, to_model_input
from iqa.runtime import UserError, autocast
from iqa.training_run import LossMonitor, ScalarLog
from qualiclip_pretrain.arniqa import distort_compositions
from qualiclip_pretrain.degradation_generator import degrade_batch
from qualiclip_pretrain.diagnostics import feature_spread
from qualiclip_pretrain.pretrain_dataset import list_image_dir

STATE_FORMAT = "qualiclip-pretrain-state/2"  # last.pt (resume state), as opposed to the encoder .pkl
LOSS_TERMS = ("loss", "cons", "pos", "neg")
NON_FINITE_ADVICE = "a smaller --lr or --amp bf16/off"


@dataclass
class RunContext:
    """What an epoch needs beyond the model and its optimizer."""
    dist_info: DistInfo
    amp_dtype: object          # autocast dtype, None = off
    levels: list               # the selected degradation levels
    scalar_log: ScalarLog


# ----------------------------------------------------------------------------- data

def holdout_split(paths, fraction, seed):
    """(train, held out): a seeded ``fraction`` of ``paths`` (at least one image when fraction > 0) held out."""
    n_heldout = max(1, round(fraction * len(paths))) if fraction > 0 and len(paths) > 1 else 0
    heldout = set(np.random.default_rng(seed).permutation(len(paths))[:n_heldout].tolist())
    return ([p for i, p in enumerate(paths) if i not in heldout], [p for i, p in enumerate(paths) if i in heldout])


def load_images(args):
    """``(train images as (path, origin), held-out clean image paths, labelled validation samples)``.

    The held-out images are never trained on: KonIQ-10k's validation split (whose MOS also give the
    zero-shot SRCC/PLCC), or a seeded ``--heldout_fraction`` of ``--image_dir`` (no labels).  Both
    depend on ``--split_seed`` only, never on ``--seed``.  ``--protocol hyperiqa`` splits KonIQ-10k as
    ``train_swin.py --protocol hyperiqa`` does for the same ``--split_seed`` (its round).
    """
    if args.image_dir and args.protocol == "hyperiqa":
        raise UserError("--protocol hyperiqa splits a labelled dataset (--data_root); with --image_dir use "
                        "--protocol ours")
    if args.image_dir:
        train, heldout = holdout_split(list_image_dir(args.image_dir), args.heldout_fraction, args.split_seed)
        return [(path, None) for path in train], heldout, []
    if not os.path.isdir(args.data_root):
        raise UserError(f"--data_root '{args.data_root}' does not exist; point it at KonIQ-10k or use --image_dir")
    samples = read_index("koniq-10k", args.data_root, seed=args.split_seed, split_file=args.split_file,
                         protocol=args.protocol)
    train = [(s.path, s.origin) for s in select_split(samples, "train")]
    val = [s for s in samples if s.split == "val"]
    return train, [s.path for s in val], ([] if args.no_eval else val)


def image_names(paths, args):
    """Image paths relative to ``--image_dir`` or ``--data_root``: what the .pkl records as ``train_images``."""
    root = args.image_dir or args.data_root
    return [os.path.relpath(path, root) for path in paths]


def make_train_loader(dataset, args, dist_info):
    """Shuffled batches: a DistributedSampler under DDP, else a RandomSampler re-seeded every epoch."""
    generator = torch.Generator()
    if dist_info.enabled:
        sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                     shuffle=True, seed=args.seed, drop_last=True)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return make_loader(dataset, args.batch_size, args.num_workers, dist_info.device, sampler=sampler,
                       generator=generator, drop_last=len(dataset) > args.batch_size)


def prepare_batch(batch, levels, args, device, generator):
    """Worker output -> normalised model input (B*2*L, 3, S, S), degraded in pixel space first.

    ``levels``: the selected 0-based levels. ``args.degrade_on`` ('device' or 'worker') and
    ``args.jpeg_on`` ('worker' when absent, as from callers that predate it) say what the workers left
    to do; an ARNIQA batch (with ``composition``) carries how many steps each worker applied.
    A batch of ``--all_types_per_image`` items (crops ``(B, T, 2, L, ...)``) becomes B*T ladders, image-major.
    """
    crops = batch["crops"].to(device, non_blocking=True)
    distortion_types = batch.get("distortion_type")
    if crops.ndim == 7:
        crops, distortion_types = crops.flatten(0, 1), distortion_types.flatten()
    b, two, num_levels = crops.shape[:3]
    jpeg_on = getattr(args, "jpeg_on", "worker")
    if "composition" in batch:
        # Compositions and worker steps stay on the host: rows are grouped by distortion without a read-back.
        degraded = distort_compositions(crops.float() / 255, batch["composition"], [level + 1 for level in levels],
                                        generator, first_step=batch["worker_steps"],
                                        jpeg="cuda" if jpeg_on == "cuda" else "pil")
        images = (degraded * 255).round().flatten(0, 2)
    elif args.degrade_on == "device":
        images = crops.flatten(0, 2)
        # distortion types stay on the host: degrade_batch then runs each type on its own rows only
        row_types = distortion_types.repeat_interleave(two * num_levels)
        level_ids = torch.as_tensor(levels).repeat(b * two)
        # Rows run (image, crop, level): the levels of a crop share one noise field, as in the workers.
        images = degrade_batch(images, row_types, level_ids, generator=generator, noise_group_size=num_levels,
                               jpeg="cuda" if jpeg_on == "cuda" else "skip")
    else:
        images = crops.flatten(0, 2)
    return to_model_input(images, device, args.channels_last), (b, two, num_levels)


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, loader, loss_fn, text_features, optimizer, scheduler, scaler, epoch, args, run):
    """Train epoch ``epoch`` (1-based) -> the means of the loss terms and the feature spread, over ranks."""
    device = run.dist_info.device
    model.train()
    # Data, crops and device noise of epoch e are seeded with e - 1, as when epochs were counted from 0:
    # earlier runs reproduce.
    seed_index = epoch - 1
    loader.dataset.set_epoch(seed_index)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(seed_index)
    else:
        loader.generator.manual_seed(args.seed * 1000 + seed_index)
    generator = torch.Generator(device=device)
    monitor = LossMonitor((*LOSS_TERMS, "spread"), device, run.dist_info, args.log_every, epoch=epoch,
                          run_dir=args.save_dir, advice=NON_FINITE_ADVICE)
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"pretrain epoch {epoch}/{args.epochs}", disable=not run.dist_info.is_main,
               dynamic_ncols=True)
    for it, batch in enumerate(bar):
        generator.manual_seed(args.seed * 1_000_003 + seed_index * 100_003 + it)
        images, shape = prepare_batch(batch, run.levels, args, device, generator)
        with autocast(device, run.amp_dtype):
            features = model(images)
        parts = loss_fn(features.float().view(*shape, -1), text_features)
        scaler.scale(parts["loss"] / args.grad_accum).backward()
        if (it + 1) % args.grad_accum == 0 or it + 1 == len(loader):
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        running = monitor.add(*(parts[k] for k in LOSS_TERMS), feature_spread(features))
        if running is not None:
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{running['loss']:.4f}", lr=f"{lr:.2e}")
            run.scalar_log.add({"loss": running["loss"], "lr": lr}, (epoch - 1) * len(loader) + it + 1, prefix="step/")
    return monitor.read()


def zero_shot_eval(encoder, eval_set, text_features, args, run):
    """SRCC/PLCC of the encoder's ``zero_shot_quality`` against MOS on the validation split, in eval mode
    (stochastic depth off: the score of an image must not depend on the call) -> (predictions, metrics)."""
    opts = EvalOptions(args.eval_patch_num, args.crop_size, max(8, args.batch_size * 4), run.amp_dtype,
                       args.channels_last, seed=args.seed)
    was_training = encoder.training
    encoder.eval()
    try:
        metrics, pred = evaluate(lambda x: encoder.zero_shot_quality(x, text_features), eval_set, run.dist_info, opts)
    finally:
        encoder.train(was_training)
    return pred, metrics
