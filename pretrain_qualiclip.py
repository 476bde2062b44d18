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
checkpoint, ``--resume`` and the non-finite checks are shared with Stage 2 (``iqa.training_run``); the
flags and their checks are in ``qualiclip_pretrain.args``.
"""
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from iqa import runtime
from iqa.distributed import barrier, broadcast_object, check_on_main, distributed_session
from iqa.evaluation import make_eval_set
from iqa.metrics import all_metrics
from iqa.patches import decode_threads, verify_images
from iqa.plots import plot_scatter, plot_training_curves
from iqa.runtime import UserError, safe_load
from iqa.training_run import (
    ScalarLog, check_finite_weights, read_training_state, resolve_resume, restore_training_state, save_training_state,
    training_state,
)
from models.clip_image_encoder import ClipImageEncoder, is_release
from models.clip_text import PROMPT_SETS, compute_text_features, load_text_features
from models.quality_encoder import QualityEncoder
from qualiclip_pretrain.args import check_args, get_args_parser
from qualiclip_pretrain.degradation_generator import select_levels
from qualiclip_pretrain.diagnostics import choose_images, collapse_warning, level_ranking_accuracy
from qualiclip_pretrain.engine import (
    NON_FINITE_ADVICE, STATE_FORMAT, RunContext, image_names, load_images, make_train_loader, train_one_epoch,
    zero_shot_eval,
)
from qualiclip_pretrain.pretrain_dataset import PretrainDataset
from qualiclip_pretrain.qualiclip_loss import build_loss


# ----------------------------------------------------------------------------- set-up

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
    check_on_main(lambda: runtime.check_output_dir(args.save_dir, resume=resuming, flag="--save_dir"), dist_info)
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
