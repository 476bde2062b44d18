"""Stage 1: QualiCLIP-style self-supervised pretraining of a quality encoder (no MOS labels).

Clean images are cropped twice (overlapping), degraded at L increasing levels of one synthetic
distortion (or, with ``--degradations arniqa``, one composition of ARNIQA's), encoded by Swin +
projection head into the CLIP text space (``--encoder swin``) or by CLIP's own image tower
(``--encoder clip``, QualiCLIP proper), and trained so that similarity to the frozen positive
prompt falls and similarity to the negative prompt rises with degradation, while both crops of
one level agree (docs/method.md).

    python pretrain_qualiclip.py --data_root /path/to/koniq-10k --model_size base \
        --epochs 10 --batch_size 8 --lr 5e-5

The epoch, its data and the zero-shot evaluation are in ``qualiclip_pretrain.engine``; the
checkpoint, ``--resume`` and the non-finite checks are shared with Stage 2 (``iqa.training_run``).
"""
import argparse
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from iqa import runtime
from iqa.datasets import DEFAULT_SPLIT_SEED, PROTOCOLS
from iqa.distributed import barrier, broadcast_object, distributed_session
from iqa.evaluation import make_eval_set
from iqa.metrics import all_metrics
from iqa.patches import DEFAULT_RESIZE, decode_threads, verify_images
from iqa.plots import plot_scatter, plot_training_curves
from iqa.runtime import UserError, safe_load
from iqa.training_run import (
    ScalarLog, check_finite_weights, read_training_state, resolve_resume, restore_training_state, save_training_state,
    tensorboard_writer_class, training_state,
)
from models.clip_image_encoder import ClipImageEncoder, is_release
from models.clip_text import PROMPT_SETS, compute_text_features, load_text_features
from models.quality_encoder import QualityEncoder
from models.swin_backbone import MODEL_SIZES
from qualiclip_pretrain import arniqa
from qualiclip_pretrain.degradation_generator import DISTORTION_TYPES, parse_distortion_types, select_levels
from qualiclip_pretrain.diagnostics import choose_images, collapse_warning, level_ranking_accuracy
from qualiclip_pretrain.engine import (
    NON_FINITE_ADVICE, STATE_FORMAT, RunContext, image_names, load_images, make_train_loader, train_one_epoch,
    zero_shot_eval,
)
from qualiclip_pretrain.pretrain_dataset import DEGRADATIONS, DEGRADE_ON, JPEG_ON, PretrainDataset, resolve_degrade_on
from qualiclip_pretrain.qualiclip_loss import build_loss

ENCODERS = ("swin", "clip")


def get_args_parser():
    p = argparse.ArgumentParser("QualiCLIP-style Stage-1 pretraining of a Swin or CLIP image encoder", add_help=True)
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
    data.add_argument("--degradations", choices=(*DEGRADATIONS, "guide"), default="original",
                      help="original (also accepted as guide): one of --distortion_types per image; arniqa: "
                           "ARNIQA's degradation model, one composition of 1..--max_distortions distortions from "
                           "distinct groups per image (docs/degradations_arniqa.md)")
    data.add_argument("--distortion_types", nargs="+", default=list(DISTORTION_TYPES),
                      help=f"--degradations original: subset of {', '.join(DISTORTION_TYPES)} (space or comma "
                           f"separated)")
    data.add_argument("--arniqa_groups", nargs="+", default=None,
                      help=f"--degradations arniqa: the groups compositions draw from (default all: "
                           f"{', '.join(arniqa.DISTORTION_GROUPS)})")
    data.add_argument("--max_distortions", type=int, default=None,
                      help=f"--degradations arniqa: most distortions per composition (default ARNIQA's "
                           f"{arniqa.MAX_DISTORTIONS}, at most the number of groups)")
    data.add_argument("--degrade_on", choices=DEGRADE_ON, default="auto",
                      help="device: degradations batched on the training device (codecs in the workers); "
                           "worker: everything in the data workers; auto: device on CUDA, worker on the CPU")
    data.add_argument("--jpeg_on", choices=JPEG_ON, default="worker",
                      help="cuda: JPEG (not JPEG 2000) with nvjpeg on the GPU instead of libjpeg in the workers "
                           "(not pixel-identical to PIL; needs CUDA and --degrade_on device/auto)")
    data.add_argument("--curriculum_types", nargs="+", default=[],
                      help="--degradations original: distortion types drawn alone during the first "
                           "--curriculum_epochs epochs (space or comma separated, a subset of --distortion_types)")
    data.add_argument("--curriculum_epochs", type=int, default=0,
                      help="epochs that draw only --curriculum_types (0: every epoch draws all types)")
    data.add_argument("--all_types_per_image", action="store_true",
                      help="--degradations original: every image carries the ladders of all --distortion_types on "
                           "the same two crops, instead of one drawn type (T times the work per image)")
    data.add_argument("--eval_resize", type=int, default=None,
                      help="shorter side of images for zero-shot eval (default: --resize)")
    data.add_argument("--eval_patch_num", type=int, default=5, help="grid crops averaged per image in zero-shot eval")
    data.add_argument("--no_eval", action="store_true", help="skip the per-epoch zero-shot evaluation")
    data.add_argument("--level_eval_images", type=int, default=100,
                      help="held-out clean images (a seeded choice) for the per-epoch level-ranking accuracy "
                           "(0: skip it)")

    model = p.add_argument_group("model")
    model.add_argument("--encoder", choices=ENCODERS, default="swin",
                       help="swin: Swin + projection head into the CLIP text space; clip: fine-tune the image tower "
                            "of --clip_model (QualiCLIP)")
    model.add_argument("--model_size", choices=MODEL_SIZES, default="base", help="Swin size (--encoder swin)")
    model.add_argument("--backbone_weights", default=None, help="local timm Swin state dict (.pth/.safetensors)")
    model.add_argument("--init_from", default=None, metavar="FILE",
                       help="--encoder clip: start from this image tower, QualiCLIP's released qualiclip.pth (whose "
                            "prompt features are then the anchors of --prompt_set qualiclip) or a CLIP Stage-1 .pkl")
    model.add_argument("--no_imagenet_pretrained", dest="imagenet_pretrained", action="store_false",
                       help="random-init Swin, or with --encoder clip a random-init image tower")
    model.add_argument("--drop_path_rate", type=float, default=0.1)
    model.add_argument("--proj_hidden", type=int, default=None, help="projection MLP width (default: Swin width)")

    text = p.add_argument_group("text anchors")
    text.add_argument("--prompt_set", choices=tuple(PROMPT_SETS), default=None,
                      help="good_bad: 'Good photo.'/'Bad photo.' (alias: seed); qualiclip: QualiCLIP's 7 pairs "
                           "(default: good_bad with --encoder swin, qualiclip with --encoder clip)")
    text.add_argument("--clip_model", default="RN50",
                      help="open_clip model name of the frozen text tower (and with --encoder clip of the image "
                           "tower, a ResNet one)")
    text.add_argument("--clip_weights", default=None, help="local CLIP weights (OpenAI RN50.pt or a state dict)")
    text.add_argument("--text_features", default=None,
                      help="(2, D) or (P, 2, D) tensor file, an earlier Stage-1 .pkl or qualiclip.pth; skips CLIP "
                           "entirely")

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
    run.add_argument("--resume", default=None, metavar="RUN_DIR_OR_CHECKPOINT",
                     help="continue a run from its last.pt (settings come from its args.json, except "
                          "--device and --num_workers)")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--deterministic", action="store_true", help="deterministic algorithms (CPU reproducibility)")
    run.add_argument("--num_workers", type=int, default=4)
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    run.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="auto: bf16 on CUDA")
    run.add_argument("--channels_last", action="store_true")
    run.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    run.add_argument("--log_every", type=int, default=50, help="steps between loss read-backs / NaN checks")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write TensorBoard scalars to <save_dir>/tensorboard/")
    return p


# ----------------------------------------------------------------------------- set-up

def check_args(args):
    """Validate and complete the flags of a new run (in place)."""
    check_encoder_args(args)
    args.distortion_types = parse_distortion_types(args.distortion_types)
    args.curriculum_types = parse_distortion_types(args.curriculum_types) if args.curriculum_types else []
    select_levels(args.num_levels)
    if args.degradations == "guide":
        args.degradations = "original"
    if args.degradations == "arniqa":
        if args.distortion_types != list(DISTORTION_TYPES):
            raise UserError("--distortion_types selects the original model's types; with --degradations arniqa "
                            "choose groups with --arniqa_groups")
        args.arniqa_groups, args.max_distortions = arniqa.composition_settings(args.arniqa_groups,
                                                                               args.max_distortions, args.crop_size)
    elif args.arniqa_groups is not None or args.max_distortions is not None:
        raise UserError("--arniqa_groups and --max_distortions apply to --degradations arniqa only")
    # auto is resolved once, so that args.json records what the run used and a resume keeps it
    device = runtime.resolve_device(args.device)
    args.degrade_on = resolve_degrade_on(args.degrade_on, device)
    if args.jpeg_on == "cuda" and (device.type != "cuda" or args.degrade_on != "device"):
        raise UserError(f"--jpeg_on cuda needs a CUDA GPU and --degrade_on device (here: device {device.type}, "
                        f"--degrade_on {args.degrade_on}); use --jpeg_on worker")
    for flag in ("epochs", "batch_size", "crop_size", "grad_accum", "eval_patch_num", "log_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    if args.num_workers < 0 or args.save_freq < 0 or args.curriculum_epochs < 0:
        raise UserError("--num_workers, --save_freq and --curriculum_epochs must be >= 0")
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
    if args.tensorboard:
        tensorboard_writer_class()


def check_encoder_args(args):
    """The encoder flags of a new run: --prompt_set's default follows --encoder; what only one encoder takes."""
    if args.prompt_set is None:
        args.prompt_set = "qualiclip" if args.encoder == "clip" else "good_bad"
    if args.encoder == "swin" and args.init_from:
        raise UserError("--init_from starts a CLIP image tower; pass --encoder clip (a Swin starts from "
                        "--backbone_weights)")
    if args.encoder == "clip" and args.backbone_weights:
        raise UserError("--backbone_weights is a Swin state dict; with --encoder clip pass --clip_weights or --init_from")
    if args.init_from and not args.imagenet_pretrained:
        raise UserError("--init_from and --no_imagenet_pretrained contradict each other; pass one of them")


def load_anchors(args):
    """Text anchors: from --text_features; for --encoder clip --init_from QualiCLIP's release with
    --prompt_set qualiclip, the release's own prompt features; else from the frozen CLIP text tower,
    once: (2, D) per-polarity means for the Swin encoder, (P, 2, D) every pair for the CLIP one."""
    if args.text_features:
        return load_text_features(args.text_features), [["<from --text_features>", args.text_features]]
    if args.init_from and args.prompt_set == "qualiclip" and is_release(safe_load(args.init_from, "--init_from")):
        return load_text_features(args.init_from), PROMPT_SETS["qualiclip"]
    return compute_text_features(args.prompt_set, args.clip_model, args.clip_weights, per_pair=args.encoder == "clip")


def build_encoder(args, text_dim):
    """The encoder to train: Swin + projection head, or the CLIP image tower (whose features must have the
    text anchors' dimension, having no projection head)."""
    if args.encoder == "swin":
        return QualityEncoder(
            args.model_size, text_dim=text_dim, imagenet_pretrained=args.imagenet_pretrained,
            backbone_weights=args.backbone_weights, proj_hidden=args.proj_hidden, drop_path_rate=args.drop_path_rate,
            img_size=args.crop_size,
        )
    encoder = ClipImageEncoder.create(args.clip_model, args.clip_weights, args.imagenet_pretrained, args.init_from)
    if encoder.output_dim != text_dim:
        raise UserError(f"the {encoder.clip_model} image tower gives {encoder.output_dim}-d features but the text "
                        f"anchors are {text_dim}-d; pass anchors of the same CLIP model")
    return encoder


def encoder_name(args):
    return f"CLIP {args.clip_model}" if args.encoder == "clip" else f"Swin-{args.model_size}"


def default_save_dir():
    return os.path.join("checkpoints", f"qualiclip_pretrain_{runtime.timestamp()}")


def encoder_pkl_path(save_dir, args, epoch=None):
    suffix = "" if epoch is None else f"_epoch{epoch}"
    name = f"clip_{args.clip_model}" if args.encoder == "clip" else f"swin_{args.model_size}"
    return os.path.join(save_dir, f"{name}_qualiclip_pretrained{suffix}.pkl")


# ----------------------------------------------------------------------------- output

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


# ----------------------------------------------------------------------------- main

def main(args):
    with distributed_session(args.device) as dist_info:
        return train(args, dist_info)


def resumed_state(args):
    """(the run's own args, its last training state or None when it stopped before its first checkpoint)."""
    resume = resolve_resume(args, get_args_parser(), "pretrain_qualiclip.py", STATE_FORMAT)
    resume.args.save_dir = resume.run_dir
    last = os.path.join(resume.run_dir, "last.pt")
    if resume.state is None and os.path.isfile(last):
        return resume.args, read_training_state(last, STATE_FORMAT, "pretrain_qualiclip.py")
    return resume.args, resume.state


def train(args, dist_info):
    state = None
    if args.resume:
        args, state = resumed_state(args)
    else:
        check_args(args)
    resuming = bool(args.resume)
    # Every rank must agree on the timestamped default directory.
    args.save_dir = broadcast_object(args.save_dir or default_save_dir(), dist_info)
    # Everything the user supplied is checked (and every image decoded once) before the run
    # directory is written: a mistake leaves no half-made run behind.
    runtime.check_output_dir(args.save_dir, resume=resuming, flag="--save_dir")
    runtime.seed_everything(args.seed + dist_info.rank, args.deterministic)

    train_images, heldout_paths, val_samples = load_images(args)
    text_features, prompts = load_anchors(args)
    device = dist_info.device
    amp = runtime.amp_dtype(args.amp, device)
    encoder = build_encoder(args, text_features.shape[-1]).to(device)
    if args.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    # The level ranking depends on the split only (--split_seed), never on the training seed.
    level_paths = (choose_images(heldout_paths, args.level_eval_images, args.split_seed)
                   if args.level_eval_images else [])
    # Workers decode lazily, so a bad file would otherwise only show up mid-epoch.
    verify_images(train_images + [(path, None) for path in level_paths],
                  threads=decode_threads(dist_info.local_world_size), progress=dist_info.is_main)
    dataset = PretrainDataset([path for path, _ in train_images], args.crop_size, args.distortion_types,
                              args.num_levels, args.degrade_on, args.seed, resize=args.resize,
                              degradations=args.degradations, arniqa_groups=args.arniqa_groups,
                              max_distortions=args.max_distortions, jpeg_on=args.jpeg_on,
                              curriculum_types=args.curriculum_types, curriculum_epochs=args.curriculum_epochs,
                              all_types=args.all_types_per_image)
    if len(dataset) < args.batch_size * dist_info.world_size and dist_info.enabled:
        raise UserError(f"{len(dataset)} training images cannot fill one batch per GPU; lower --batch_size")
    loader = make_train_loader(dataset, args, dist_info)
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
    scaler = runtime.make_grad_scaler(device, amp)
    parts = dict(model=encoder, optimizer=optimizer, scheduler=scheduler, scaler=scaler)

    start_epoch, history = 0, []
    if state is not None:
        note = restore_training_state(state, dist_info, **parts)
        start_epoch, history = state["epoch"], list(state["history"])
        if note and dist_info.is_main:
            print(note, flush=True)

    log_path = os.path.join(args.save_dir, "log.jsonl")
    if dist_info.is_main:
        runtime.prepare_output_dir(args.save_dir, resume=resuming, flag="--save_dir")
        if resuming:
            runtime.write_jsonl(log_path, history)  # the log holds exactly the checkpoint's epochs
            print(f"resumed after epoch {start_epoch} of {args.epochs}", flush=True)
        else:
            runtime.save_args(args.save_dir, args)
        print(f"run directory: {args.save_dir}\ntraining images: {len(dataset)}", flush=True)
    barrier(dist_info)

    text_device = text_features.to(device)
    trained_on = image_names([path for path, _ in train_images], args)
    ckpt = lambda: encoder.checkpoint_dict(text_features, prompts, vars(args), trained_on)  # noqa: E731
    scalar_log = ScalarLog(args.save_dir, args.tensorboard and dist_info.is_main)
    run = RunContext(dist_info, amp, select_levels(args.num_levels), scalar_log)
    val_pred = None
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            t0 = time.time()
            stats = train_one_epoch(forward, loader, loss_fn, text_device, optimizer, scheduler, scaler, epoch, args,
                                    run)
            check_finite_weights(encoder, epoch, args.save_dir, NON_FINITE_ADVICE)
            spread = stats.pop("spread")
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}, "feature_spread": spread,
                      "lr": {"encoder": optimizer.param_groups[0]["lr"]}, "time_s": time.time() - t0}
            if val_set is not None:
                val_pred, record["val"] = zero_shot_eval(encoder, val_set, text_device, args, run)
            if level_paths:
                record["level_ranking_accuracy"] = level_ranking_accuracy(
                    encoder, text_device, level_paths,
                    args.arniqa_groups if args.degradations == "arniqa" else args.distortion_types,
                    crop_size=args.crop_size, resize=args.resize, batch_size=max(8, args.batch_size * 4),
                    device=device, amp_dtype=amp, channels_last=args.channels_last, seed=args.split_seed,
                    progress=dist_info.is_main, degradations=args.degradations)
            history.append(record)
            # Checkpoint first, then the log line; a resume rewrites the log from the checkpoint.
            state = training_state(STATE_FORMAT, **parts, epoch=epoch, args=args, history=history,
                                   dist_info=dist_info)
            save_training_state(state, [os.path.join(args.save_dir, "last.pt")], dist_info)
            if dist_info.is_main:
                runtime.append_jsonl(log_path, record)
                scalar_log.add_record(record)
                print(format_epoch(record, args.epochs), flush=True)
                warning = collapse_warning(spread)
                if warning:
                    print(warning, flush=True)
                if args.save_freq and epoch % args.save_freq == 0 and epoch < args.epochs:
                    runtime.atomic_torch_save(ckpt(), encoder_pkl_path(args.save_dir, args, epoch))
            barrier(dist_info)
    finally:
        scalar_log.close()

    if val_set is not None and val_pred is None:  # resumed after the last epoch: evaluate once more
        val_pred, _ = zero_shot_eval(encoder, val_set, text_device, args, run)
    if dist_info.is_main:
        finish(ckpt(), val_set, val_pred, history, args)


def finish(encoder_ckpt, val_set, val_pred, history, args):
    """Write the encoder .pkl, results.json and plots (rank 0)."""
    pkl_path = encoder_pkl_path(args.save_dir, args)
    runtime.atomic_torch_save(encoder_ckpt, pkl_path)
    results = {"model": encoder_name(args), "model_size": args.model_size if args.encoder == "swin" else None,
               "epochs": args.epochs, "encoder": pkl_path,
               "final_train": {k: v for k, v in history[-1].items() if k.startswith("train_")} if history else {}}
    for key in ("feature_spread", "level_ranking_accuracy"):
        if history and key in history[-1]:
            results[key] = history[-1][key]
    if history:
        plot_training_curves(history, os.path.join(args.save_dir, "curves.png"),
                             title=f"Stage-1 QualiCLIP pretraining ({encoder_name(args)})")
    if val_set is not None:
        mos = [s.mos for s in val_set.samples]
        results["zero_shot_val"] = all_metrics(val_pred, mos)
        plot_scatter(val_pred, mos, os.path.join(args.save_dir, "scatter_zero_shot_val.png"),
                     title="zero-shot score, KonIQ-10k validation", metrics=results["zero_shot_val"])
    runtime.atomic_write_json(os.path.join(args.save_dir, "results.json"), results)
    print(f"encoder saved to {pkl_path}\nrun directory: {args.save_dir}", flush=True)


if __name__ == "__main__":
    runtime.run_cli(main, get_args_parser().parse_args())
