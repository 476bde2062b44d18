"""Stage 1: QualiCLIP-style self-supervised pretraining of a Swin encoder (no MOS labels).

Clean images are cropped twice (overlapping), degraded at L increasing levels of one synthetic
distortion, encoded by Swin + projection head into the CLIP text space, and trained so that
similarity to the frozen positive prompt falls and similarity to the negative prompt rises
with degradation, while both crops of one level agree (DESIGN.md §3).

    python pretrain_qualiclip.py --data_root /path/to/koniq-10k --model_size base \
        --epochs 10 --batch_size 8 --lr 5e-5
"""
import argparse
import os
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from iqa import runtime
from iqa.datasets import DEFAULT_SPLIT_SEED, PROTOCOLS, read_index, select_split
from iqa.metrics import all_metrics
from iqa.evaluation import EvalOptions, evaluate, make_eval_set
from iqa.patches import DEFAULT_RESIZE, decode_threads, verify_images
from iqa.plots import plot_scatter, plot_training_curves
from iqa.runtime import UserError
from models.clip_text import PROMPT_SETS, compute_text_features, load_text_features
from models.quality_encoder import QualityEncoder
from models.swin_backbone import MODEL_SIZES
from qualiclip_pretrain.degradation_generator import (
    DISTORTION_TYPES,
    degrade_batch,
    parse_distortion_types,
    select_levels,
)
from qualiclip_pretrain.diagnostics import choose_images, collapse_warning, feature_spread, level_ranking_accuracy
from qualiclip_pretrain.pretrain_dataset import PretrainDataset, list_image_dir
from qualiclip_pretrain.qualiclip_loss import build_loss

STATE_FORMAT = "qualiclip-pretrain-state/1"  # last.pt (resume state), as opposed to the encoder .pkl


def get_args_parser():
    p = argparse.ArgumentParser("QualiCLIP-style Stage-1 pretraining of a Swin encoder", add_help=True)
    data = p.add_argument_group("data")
    data.add_argument("--data_root", default=None,
                      help="KonIQ-10k root; its training split provides the clean images and its validation "
                           "split the zero-shot SRCC/PLCC after each epoch (default: ./koniq-10k)")
    data.add_argument("--image_dir", default=None,
                      help="use every image under this folder instead of KonIQ-10k's training split")
    data.add_argument("--split_file", default=None, help="KonIQ split override (JSON or CSV, see README)")
    data.add_argument("--split_seed", type=int, default=DEFAULT_SPLIT_SEED,
                      help="seed of the dataset split where no official one exists (train_swin.py has the same "
                           "flag and default, so both stages see one split); independent of --seed")
    data.add_argument("--protocol", choices=PROTOCOLS, default="ours",
                      help="split of --data_root as train_swin.py --protocol draws it: hyperiqa = the training part of "
                           "the 80/20 split of --split_seed (its validation part is held out)")
    data.add_argument("--heldout_fraction", type=float, default=0.05,
                      help="with --image_dir: fraction of the images held out of training (seeded by --split_seed) "
                           "for the label-free validation")
    data.add_argument("--resize", type=int, default=DEFAULT_RESIZE,
                      help="shorter side of the clean images before cropping, aspect kept, as in Stage 2 "
                           "(0 = native size)")
    data.add_argument("--crop_size", type=int, default=224, help="crop side (a multiple of 32)")
    data.add_argument("--num_levels", type=int, default=5, help="degradation levels per type, 1..5 (evenly spaced)")
    data.add_argument("--distortion_types", nargs="+", default=list(DISTORTION_TYPES),
                      help=f"subset of {', '.join(DISTORTION_TYPES)} (space or comma separated)")
    data.add_argument("--degrade_on", choices=("device", "worker"), default="device",
                      help="device: blur/noise/brightness batched on the training device (fast); "
                           "worker: everything with PIL in the data workers")
    data.add_argument("--eval_resize", type=int, default=None,
                      help="shorter side of images for zero-shot eval (default: --resize)")
    data.add_argument("--eval_patch_num", type=int, default=5, help="grid crops averaged per image in zero-shot eval")
    data.add_argument("--no_eval", action="store_true", help="skip the per-epoch zero-shot evaluation")
    data.add_argument("--level_eval_images", type=int, default=100,
                      help="held-out clean images (a seeded choice) for the per-epoch level-ranking accuracy "
                           "(0: skip it)")

    model = p.add_argument_group("model")
    model.add_argument("--model_size", choices=MODEL_SIZES, default="base")
    model.add_argument("--backbone_weights", default=None, help="local timm Swin state dict (.pth/.safetensors)")
    model.add_argument("--no_imagenet_pretrained", action="store_true", help="random-init Swin")
    model.add_argument("--drop_path_rate", type=float, default=0.1)
    model.add_argument("--proj_hidden", type=int, default=None, help="projection MLP width (default: Swin width)")

    text = p.add_argument_group("text anchors")
    text.add_argument("--prompt_set", choices=tuple(PROMPT_SETS), default="seed")
    text.add_argument("--clip_model", default="RN50", help="open_clip model name of the frozen text tower")
    text.add_argument("--clip_weights", default=None, help="local CLIP weights (OpenAI RN50.pt or a state dict)")
    text.add_argument("--text_features", default=None,
                      help="(2, D) tensor file or an earlier Stage-1 .pkl; skips CLIP entirely")

    loss = p.add_argument_group("loss")
    loss.add_argument("--loss_type", choices=("simplified", "full"), default="simplified")
    loss.add_argument("--margin_rank", type=float, default=0.05)
    loss.add_argument("--margin_cons", type=float, default=0.0)
    loss.add_argument("--lambda_cons", type=float, default=1.0)
    loss.add_argument("--lambda_pos", type=float, default=1.0)
    loss.add_argument("--lambda_neg", type=float, default=1.0)

    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10)
    optim.add_argument("--batch_size", type=int, default=8, help="images per GPU (x 2 crops x L levels)")
    optim.add_argument("--lr", type=float, default=5e-5)
    optim.add_argument("--min_lr", type=float, default=1e-7, help="cosine schedule end")
    optim.add_argument("--warmup_epochs", type=float, default=0.0)
    optim.add_argument("--weight_decay", type=float, default=1e-4)
    optim.add_argument("--grad_accum", type=int, default=1, help="optimizer step every N batches")
    optim.add_argument("--clip_grad", type=float, default=None, help="max gradient norm (off by default)")

    run = p.add_argument_group("run")
    run.add_argument("--save_dir", default=None,
                     help="run directory (default checkpoints/qualiclip_pretrain_<timestamp>)")
    run.add_argument("--save_freq", type=int, default=0, help="also keep an encoder .pkl every N epochs (0: final only)")
    run.add_argument("--resume", default=None, help="run directory or its last.pt to continue")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--deterministic", action="store_true", help="deterministic algorithms (CPU reproducibility)")
    run.add_argument("--num_workers", type=int, default=4)
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    run.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="auto: bf16 on CUDA")
    run.add_argument("--channels_last", action="store_true")
    run.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    return p


# ----------------------------------------------------------------------------- set-up

def validate_args(args):
    args.distortion_types = parse_distortion_types(args.distortion_types)
    select_levels(args.num_levels)
    for flag in ("epochs", "batch_size", "crop_size", "grad_accum", "eval_patch_num"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    if args.num_workers < 0 or args.save_freq < 0:
        raise UserError("--num_workers and --save_freq must be >= 0")
    if not 0 <= args.heldout_fraction < 1:
        raise UserError(f"--heldout_fraction must be in [0, 1) (got {args.heldout_fraction})")
    if args.eval_resize is None:
        args.eval_resize = args.resize
    for flag in ("resize", "eval_resize"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be 0 (native size) or a side length (got {getattr(args, flag)})")
    if not 0 < args.min_lr <= args.lr:
        raise UserError(f"--min_lr ({args.min_lr}) must be in (0, --lr={args.lr}]")
    if args.data_root is None and args.image_dir is None:
        args.data_root = "koniq-10k"


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


def load_anchors(args):
    """(2, D) text anchors: from --text_features, or from the frozen CLIP text tower once."""
    if args.text_features:
        return load_text_features(args.text_features), [["<from --text_features>", args.text_features]]
    return compute_text_features(args.prompt_set, args.clip_model, args.clip_weights)


def default_save_dir():
    return os.path.join("checkpoints", f"qualiclip_pretrain_{runtime.timestamp()}")


def encoder_pkl_path(save_dir, args, epoch=None):
    suffix = "" if epoch is None else f"_epoch{epoch}"
    return os.path.join(save_dir, f"swin_{args.model_size}_qualiclip_pretrained{suffix}.pkl")


def make_loader(dataset, args, dist_info):
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=True, seed=args.seed, drop_last=True) if dist_info.enabled else None
    return DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, shuffle=False if sampler else True,
        num_workers=args.num_workers, pin_memory=dist_info.device.type == "cuda", drop_last=len(dataset) > args.batch_size,
        generator=torch.Generator(), persistent_workers=False,
    )


# ----------------------------------------------------------------------------- one epoch

def prepare_batch(batch, levels, args, device, generator):
    """Worker output -> normalised model input (B*2*L, 3, S, S), degraded in pixel space first."""
    crops = batch["crops"].to(device, non_blocking=True)
    b, two, num_levels = crops.shape[:3]
    images = crops.flatten(0, 2)
    if args.degrade_on == "device":
        # types stay on the host: degrade_batch then runs each type on its own rows only
        dist_types = batch["dist_type"].repeat_interleave(two * num_levels)
        level_ids = torch.as_tensor(levels).repeat(b * two)
        # Rows run (image, crop, level): the levels of a crop share one noise field, as in the workers.
        images = degrade_batch(images, dist_types, level_ids, generator=generator, noise_group_size=num_levels)
    return runtime.to_model_input(images, device, args.channels_last), (b, two, num_levels)


def kept_checkpoint(epoch, save_dir):
    """What a run stopped during ``epoch`` (0-based) leaves to --resume from."""
    return f"last.pt (epoch {epoch}) in {save_dir} is kept" if epoch else "no checkpoint was written yet"


def train_one_epoch(model, loader, loss_fn, text_features, optimizer, scheduler, scaler, epoch, args, state):
    device, dtype = state["device"], state["amp_dtype"]
    model.train()
    loader.dataset.set_epoch(epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    else:
        loader.generator.manual_seed(args.seed * 1000 + epoch)
    generator = torch.Generator(device=device)
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    steps = 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{args.epochs}", disable=not state["is_main"], dynamic_ncols=True)
    for it, batch in enumerate(bar):
        generator.manual_seed(args.seed * 1_000_003 + epoch * 100_003 + it)
        images, shape = prepare_batch(batch, state["levels"], args, device, generator)
        with runtime.autocast(device, dtype):
            features = model(images)
        parts = loss_fn(features.float().view(*shape, -1), text_features)
        if not torch.isfinite(parts["loss"]).all():
            raise UserError(
                f"loss became non-finite at epoch {epoch + 1}, step {it + 1}; stopped, "
                f"{kept_checkpoint(epoch, state['save_dir'])}; try a smaller --lr or --amp off"
            )
        scaler.scale(parts["loss"] / args.grad_accum).backward()
        if (it + 1) % args.grad_accum == 0 or it + 1 == len(loader):
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        spread = feature_spread(features).double()
        totals += torch.stack([*(parts[k].detach().double() for k in ("loss", "cons", "pos", "neg")), spread])
        steps += 1
        if state["is_main"] and (it % 20 == 0 or it + 1 == len(loader)):
            bar.set_postfix(loss=f"{totals[0].item() / steps:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    means = (totals / max(1, steps)).tolist()
    stats = dict(zip(("loss", "cons", "pos", "neg", "spread"), means))
    return runtime.all_reduce_mean(stats, state["dist"])


def zero_shot_eval(encoder, eval_set, text_features, args, state):
    """SRCC/PLCC of the encoder's zero-shot score against MOS on the validation split, in eval mode
    (stochastic depth off: the score of an image must not depend on the call)."""
    opts = EvalOptions(args.eval_patch_num, args.crop_size, max(8, args.batch_size * 4), state["amp_dtype"],
                       args.channels_last, seed=args.seed)
    was_training = encoder.training
    encoder.eval()
    try:
        metrics, pred = evaluate(lambda x: encoder.score(x, text_features), eval_set, state["dist"], opts)
    finally:
        encoder.train(was_training)
    return pred, metrics


def format_epoch(record, epochs):
    text = (f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f} (cons {record['train_cons']:.4f}, "
            f"pos {record['train_pos']:.4f}, neg {record['train_neg']:.4f}), "
            f"feature spread {record['feature_spread']:.4f}")
    if "level_ranking_accuracy" in record:
        ranking = record["level_ranking_accuracy"]
        text += f", level ranking {ranking['overall']:.3f} (" + ", ".join(
            f"{name} {value:.3f}" for name, value in ranking.items() if name != "overall") + ")"
    if "val" in record:
        text += f", zero-shot val SRCC {record['val']['srcc']:.4f} PLCC {record['val']['plcc']:.4f}"
    return text


# ----------------------------------------------------------------------------- checkpoints

def save_training_state(path, model, optimizer, scheduler, scaler, epoch, args, history):
    runtime.atomic_torch_save({
        "format": STATE_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "epoch": epoch, "args": vars(args), "rng": runtime.rng_state(),
        "history": history,
    }, path)


def resolve_resume(path):
    checkpoint = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    if not os.path.isfile(checkpoint):
        raise UserError(f"--resume '{path}': no last.pt there; pass a Stage-1 run directory or its last.pt")
    state = runtime.safe_load(checkpoint, "--resume checkpoint")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"--resume '{checkpoint}' is not a Stage-1 training checkpoint; pass a pretrain_qualiclip.py "
                        f"run directory or its last.pt")
    return os.path.dirname(os.path.abspath(checkpoint)), state


# ----------------------------------------------------------------------------- main

def main(args):
    validate_args(args)
    dist_info = runtime.init_distributed(args.device)
    resume_state = None
    if args.resume:
        save_dir, resume_state = resolve_resume(args.resume)
        args = runtime.restore_args(args, resume_state["args"])
        args.save_dir = save_dir
    resuming = resume_state is not None
    # Every rank must agree on the timestamped default directory.
    args.save_dir = runtime.broadcast_object(args.save_dir or default_save_dir(), dist_info)
    # Everything the user supplied is checked (and every image decoded once) before the run
    # directory is written: a mistake leaves no half-made run behind.
    runtime.check_output_dir(args.save_dir, resume=resuming, flag="--save_dir")
    runtime.seed_everything(args.seed + dist_info.rank, args.deterministic)

    train_images, heldout_paths, val_samples = load_images(args)
    text_features, prompts = load_anchors(args)
    device = dist_info.device
    state = {
        "device": device, "dist": dist_info, "is_main": dist_info.is_main, "save_dir": args.save_dir,
        "amp_dtype": runtime.amp_dtype(args.amp, device), "levels": select_levels(args.num_levels),
    }
    encoder = QualityEncoder(
        args.model_size, text_dim=text_features.shape[1], imagenet_pretrained=not args.no_imagenet_pretrained,
        backbone_weights=args.backbone_weights, proj_hidden=args.proj_hidden, drop_path_rate=args.drop_path_rate,
        img_size=args.crop_size,
    ).to(device)
    if args.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    # The level ranking depends on the split only (--split_seed), never on the training seed.
    level_paths = (choose_images(heldout_paths, args.level_eval_images, args.split_seed)
                   if args.level_eval_images else [])
    # Workers decode lazily, so a bad file would otherwise only show up mid-epoch.
    verify_images(train_images + [(path, None) for path in level_paths], threads=decode_threads(dist_info.world_size),
                  progress=dist_info.is_main)
    dataset = PretrainDataset([path for path, _ in train_images], args.crop_size, args.distortion_types,
                              args.num_levels, args.degrade_on, args.seed, resize=args.resize)
    if len(dataset) < args.batch_size * dist_info.world_size and dist_info.enabled:
        raise UserError(f"{len(dataset)} training images cannot fill one batch per GPU; lower --batch_size")
    loader = make_loader(dataset, args, dist_info)
    val_set = make_eval_set("koniq-10k val", val_samples, args.eval_resize, args.crop_size, dist_info) \
        if val_samples else None

    model = DistributedDataParallel(encoder, device_ids=[device] if device.type == "cuda" else None) \
        if dist_info.enabled else encoder
    forward = torch.compile(model) if args.compile else model
    loss_fn = build_loss(args.loss_type, margin_rank=args.margin_rank, margin_cons=args.margin_cons,
                         lambda_cons=args.lambda_cons, lambda_pos=args.lambda_pos, lambda_neg=args.lambda_neg)
    optimizer = runtime.make_adamw(encoder.parameters(), device, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(loader) // args.grad_accum)
    scheduler = runtime.cosine_schedule(optimizer, steps_per_epoch * args.epochs, args.min_lr / args.lr,
                                        warmup_steps=int(args.warmup_epochs * steps_per_epoch))
    scaler = runtime.make_grad_scaler(device, state["amp_dtype"])

    start_epoch, history = 0, []
    if resuming:
        encoder.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        runtime.set_rng_state(resume_state["rng"])
        start_epoch, history = resume_state["epoch"] + 1, list(resume_state["history"])

    log_path = os.path.join(args.save_dir, "log.jsonl")
    if dist_info.is_main:
        runtime.prepare_output_dir(args.save_dir, resume=resuming, flag="--save_dir")
        if resuming:
            runtime.write_jsonl(log_path, history)  # the log holds exactly the checkpoint's epochs
            print(f"resumed after epoch {start_epoch} of {args.epochs}", flush=True)
        else:
            runtime.save_args(args.save_dir, args)
        print(f"run directory: {args.save_dir}\ntraining images: {len(dataset)}", flush=True)
    runtime.barrier(dist_info)

    text_device = text_features.to(device)
    trained_on = image_names([path for path, _ in train_images], args)
    ckpt = lambda: encoder.checkpoint_dict(text_features, prompts, vars(args), trained_on)  # noqa: E731
    val_pred = None
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        stats = train_one_epoch(forward, loader, loss_fn, text_device, optimizer, scheduler, scaler, epoch, args, state)
        bad = runtime.first_nonfinite_parameter(encoder)
        if bad is not None:
            raise UserError(f"weights became non-finite ({bad}) in epoch {epoch + 1}; stopped, "
                            f"{kept_checkpoint(epoch, args.save_dir)}; try a smaller --lr or --amp off")
        spread = stats.pop("spread")
        record = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()}, "feature_spread": spread,
                  "lr": {"encoder": optimizer.param_groups[0]["lr"]}, "time_s": time.time() - t0}
        if val_set is not None:
            val_pred, record["val"] = zero_shot_eval(encoder, val_set, text_device, args, state)
        if level_paths:
            record["level_ranking_accuracy"] = level_ranking_accuracy(
                encoder, text_device, level_paths, args.distortion_types, crop_size=args.crop_size,
                resize=args.resize, batch_size=max(8, args.batch_size * 4), device=device,
                amp_dtype=state["amp_dtype"], channels_last=args.channels_last, seed=args.split_seed,
                progress=dist_info.is_main)
        history.append(record)
        if dist_info.is_main:
            # Checkpoint first, then the log line; a resume rewrites the log from the checkpoint.
            save_training_state(os.path.join(args.save_dir, "last.pt"), encoder, optimizer, scheduler, scaler,
                                epoch, args, history)
            runtime.append_jsonl(log_path, record)
            print(format_epoch(record, args.epochs), flush=True)
            warning = collapse_warning(spread)
            if warning:
                print(warning, flush=True)
            if args.save_freq and (epoch + 1) % args.save_freq == 0 and epoch + 1 < args.epochs:
                runtime.atomic_torch_save(ckpt(), encoder_pkl_path(args.save_dir, args, epoch + 1))
        runtime.barrier(dist_info)

    if val_set is not None and val_pred is None:  # resumed after the last epoch: evaluate once more
        val_pred, _ = zero_shot_eval(encoder, val_set, text_device, args, state)
    if dist_info.is_main:
        finish(ckpt(), val_set, val_pred, history, args)
    runtime.cleanup_distributed()


def finish(encoder_ckpt, val_set, val_pred, history, args):
    """Write the encoder .pkl, results.json and plots (rank 0)."""
    pkl_path = encoder_pkl_path(args.save_dir, args)
    runtime.atomic_torch_save(encoder_ckpt, pkl_path)
    results = {"model_size": args.model_size, "epochs": args.epochs, "encoder": pkl_path,
               "final_train": {k: v for k, v in history[-1].items() if k.startswith("train_")} if history else {}}
    for key in ("feature_spread", "level_ranking_accuracy"):
        if history and key in history[-1]:
            results[key] = history[-1][key]
    if history:
        plot_training_curves(history, os.path.join(args.save_dir, "curves.png"),
                             title=f"Stage-1 QualiCLIP pretraining (Swin-{args.model_size})")
    if val_set is not None:
        mos = [s.mos for s in val_set.samples]
        results["zero_shot_val"] = all_metrics(val_pred, mos)
        plot_scatter(val_pred, mos, os.path.join(args.save_dir, "scatter_zero_shot_val.png"),
                     title="zero-shot score, KonIQ-10k validation", metrics=results["zero_shot_val"])
    runtime.atomic_write_json(os.path.join(args.save_dir, "results.json"), results)
    print(f"encoder saved to {pkl_path}\nrun directory: {args.save_dir}", flush=True)


if __name__ == "__main__":
    runtime.run_cli(main, get_args_parser().parse_args())
