"""Stage 2: fine-tune Swin-HyperIQA on MOS-labelled data (docs/method.md).

The original recipe's commands run as written, e.g.

    python train_swin.py --dataset koniq-10k --model_size base --epochs 50 --use_multiscale --attention_fusion
    python train_swin.py --dataset koniq-10k --model_size base --epochs 50 --use_multiscale --attention_fusion \\
        --pretrained_encoder checkpoints/qualiclip_pretrain_*/swin_base_qualiclip_pretrained.pkl \\
        --lr_encoder_pretrained 1e-6

``--protocol hyperiqa`` evaluates as HyperIQA's published code does (25 random train and test crops,
its resize and label per dataset, 80/20 splits over 10 rounds, the median reported), except that
the epoch is selected on a validation part of the training 80%.

Multi-GPU: ``torchrun --nproc_per_node=N train_swin.py ...`` (same flags; ``--batch_size`` is per GPU).
A run directory holds args.json, split.json, log.jsonl, last.pt, best.pt, results.json, the
predictions CSVs and PNG plots; ``--resume RUN_DIR`` continues a killed run.
"""
import argparse
import json
import os

import numpy as np

from HyperIQASolver_swin import LOSSES, PATCH_SIZE, SCHEDULERS, HyperIQASolver, protocol_record
from iqa.datasets import DATASET_NAMES, DEFAULT_SPLIT_SEED, HYPERIQA_RESIZE, PROTOCOLS, read_index, select_split
from iqa.distributed import barrier, broadcast_object, distributed_session
from iqa.evaluation import DEFAULT_TEST_PATCH_NUM, make_eval_set, parse_dataset_specs
from iqa.patches import DEFAULT_RESIZE
from iqa.runtime import (
    UserError, atomic_write_json, check_output_dir, prepare_output_dir, run_cli, safe_load, save_args, timestamp,
)
from iqa.scoring import other_dataset_resize
from iqa.training_run import resolve_resume, tensorboard_writer_class
from models.hyperiqa_swin import CHECKPOINT_FORMAT
from models.quality_encoder import ENCODER_FORMAT
from models.swin_backbone import MODEL_SIZES

ROUND_DIR = r"round_\d+"
# Defaults that depend on --protocol (a flag given on the command line always wins).  hyperiqa:
# the defaults of HyperIQA's train_test_IQA.py; its lr / batch size / optimizer were tuned for
# ResNet-50 and are not taken over (ours: see the README's Protocols section).
PROTOCOL_DEFAULTS = {
    "ours": {"epochs": 50, "train_patch_num": 5, "test_patch_num": DEFAULT_TEST_PATCH_NUM, "test_random_crop": False,
             "train_test_num": 1},
    "hyperiqa": {"epochs": 16, "train_patch_num": 25, "test_patch_num": 25, "test_random_crop": True,
                 "train_test_num": 10},
}


def parse_resize(text):
    """``--resize``: a shorter side ("384"; "0" = native) or a fixed size "WIDTHxHEIGHT" ("384x512")."""
    width, sep, height = text.lower().partition("x")
    try:
        return [int(width), int(height)] if sep else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a side length (e.g. 384) nor WIDTHxHEIGHT "
                                         f"(e.g. 384x512)") from None


def protocol_resize(dataset, protocol):
    """The default ``--resize`` of a dataset under a protocol."""
    return HYPERIQA_RESIZE.get(dataset, DEFAULT_RESIZE) if protocol == "hyperiqa" else DEFAULT_RESIZE


def get_args_parser():
    parser = argparse.ArgumentParser("Swin-HyperIQA fine-tuning (Stage 2)", add_help=True)
    data = parser.add_argument_group("data")
    data.add_argument("--protocol", default="ours", choices=PROTOCOLS,
                      help="ours: 5 train / 10 grid test crops, shorter side 384, official or 70/10/20 split, MOS "
                           "rescaled to [0, 1], 1 round; hyperiqa: HyperIQA's 25 + 25 random crops, resize and label, "
                           "80/20 splits (validation carved from the 80%%) over 10 rounds, median reported")
    data.add_argument("--dataset", default="koniq-10k", choices=DATASET_NAMES)
    data.add_argument("--data_root", default=None, help="dataset folder (default ./koniq-10k for koniq-10k); "
                      "for --dataset csv the CSV file")
    data.add_argument("--split_file", default=None, help="JSON {train,val,test: [names]} or CSV with a set column; "
                      "overrides the dataset's split (a run's split.json can be passed back)")
    data.add_argument("--split_seed", type=int, default=DEFAULT_SPLIT_SEED,
                      help="seed of the dataset split where no official one exists (round k of --train_test_num "
                           "uses split_seed + k); pretrain_qualiclip.py has the same flag and default")
    data.add_argument("--image_col", default=None, help="image column of --dataset csv")
    data.add_argument("--score_col", default=None, help="score column of --dataset csv (higher = better)")
    data.add_argument("--resize", type=parse_resize, default=None,
                      help="shorter image side before cropping, aspect kept (0 = native size), or a fixed WIDTHxHEIGHT "
                           f"(default {DEFAULT_RESIZE}; hyperiqa: HyperIQA's per dataset, e.g. 384x512 for KonIQ-10k)")
    data.add_argument("--patch_size", type=int, default=PATCH_SIZE, choices=(PATCH_SIZE,),
                      help=f"crop side; the Swin-HyperIQA head is built for {PATCH_SIZE}x{PATCH_SIZE} inputs, so "
                           f"{PATCH_SIZE} is the only value (set the image scale with --resize)")
    data.add_argument("--train_patch_num", type=int, default=None,
                      help="random crops per training image per epoch (default 5, hyperiqa 25; a 224 crop covers "
                           "~1/4 of a 512x384 image)")
    data.add_argument("--test_patch_num", type=int, default=None,
                      help=f"crops per val/test image, scores averaged (default {DEFAULT_TEST_PATCH_NUM}, hyperiqa 25)")
    data.add_argument("--test_random_crop", action="store_true", default=None,
                      help="seeded random test crops instead of the grid (default under hyperiqa)")
    data.add_argument("--cross_datasets", nargs="*", default=[], metavar="NAME=ROOT",
                      help="datasets evaluated whole with the selected weights at the end, e.g. spaq=/data/spaq")
    data.add_argument("--cache_on_device", action="store_true", help="keep the decoded images on the GPU")
    data.add_argument("--num_workers", type=int, default=4)

    model = parser.add_argument_group("model")
    model.add_argument("--model_size", default="base", choices=MODEL_SIZES)
    model.add_argument("--use_multiscale", action="store_true", default=True,
                       help="hyper network input from all four stages (default on)")
    model.add_argument("--no_multiscale", dest="use_multiscale", action="store_false",
                       help="hyper network input from the last stage only")
    model.add_argument("--attention_fusion", action="store_true", help="per-image attention weights over the stages")
    model.add_argument("--drop_path_rate", type=float, default=0.0)
    model.add_argument("--dropout_rate", type=float, default=0.0)
    model.add_argument("--backbone_weights", default=None, help="timm Swin state dict (offline ImageNet weights)")
    model.add_argument("--no_imagenet_pretrained", dest="imagenet_pretrained", action="store_false",
                       help="random-init backbone")
    model.add_argument("--pretrained_encoder", nargs="+", default=None, metavar="PKL",
                       help="Stage-1 encoder .pkl (several matches of a glob: the newest is used)")
    model.add_argument("--allow_pretrain_overlap", action="store_true",
                       help="start even if the Stage-1 encoder was trained on some of the validation/test images "
                            "(the results are then not a clean evaluation)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=None, help="default 50, hyperiqa 16")
    optim.add_argument("--batch_size", type=int, default=32, help="patches per step per GPU")
    optim.add_argument("--lr", type=float, default=5e-6, help="encoder learning rate (baseline)")
    optim.add_argument("--lr_ratio", type=float, default=10.0, help="head learning rate = --lr x --lr_ratio")
    optim.add_argument("--lr_encoder_pretrained", type=float, default=1e-6,
                       help="encoder learning rate with --pretrained_encoder")
    optim.add_argument("--match_pretrained_lr", action="store_true",
                       help="use --lr_encoder_pretrained as the encoder LR without a pretrained encoder (head LR "
                            "unchanged): the baseline that differs from a --pretrained_encoder run only in its init")
    optim.add_argument("--weight_decay", type=float, default=5e-4)
    optim.add_argument("--lr_scheduler", default="cosine", choices=SCHEDULERS,
                       help="per step: cosine to 1%% of each group's LR, constant, or x0.1 every --lr_step_epochs")
    optim.add_argument("--lr_step_epochs", type=int, default=10)
    optim.add_argument("--loss_type", default="l1", choices=tuple(LOSSES))
    optim.add_argument("--grad_accum", type=int, default=1, help="optimizer step every N batches")
    optim.add_argument("--patience", type=int, default=10, help="epochs without val SRCC gain before stopping")
    optim.add_argument("--no_early_stopping", action="store_true")

    run = parser.add_argument_group("run")
    run.add_argument("--train_test_num", type=int, default=None,
                     help="rounds k = 0..N-1 with seed + k and split seed + k (median reported; default 1, "
                          "hyperiqa 10)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output_dir", default=None, help="default runs/train_swin_<dataset>_<size>_<timestamp>/")
    run.add_argument("--resume", default=None, metavar="RUN_DIR_OR_CHECKPOINT",
                     help="continue a run from its last.pt (settings come from its args.json, except "
                          "--device and --num_workers)")
    run.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    run.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                     help="mixed precision (auto = bf16 on CUDA, off on CPU)")
    run.add_argument("--channels_last", action="store_true")
    run.add_argument("--compile", action="store_true", help="torch.compile the training model")
    run.add_argument("--deterministic", action="store_true", help="deterministic algorithms (reproducible on CPU)")
    run.add_argument("--log_every", type=int, default=50, help="steps between loss read-backs / NaN checks")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write TensorBoard scalars to <output_dir>/tensorboard/ (each round's own with "
                          "--train_test_num)")
    return parser


# ----------------------------------------------------------------------------- flags

def apply_protocol_defaults(args):
    """Fill the flags left unset with their ``--protocol`` defaults (in place)."""
    for flag, value in PROTOCOL_DEFAULTS[args.protocol].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.resize is None:
        args.resize = protocol_resize(args.dataset, args.protocol)


def check_args(args):
    """Validate and complete the flags of a new run (in place)."""
    apply_protocol_defaults(args)
    for flag in ("epochs", "batch_size", "train_patch_num", "test_patch_num", "grad_accum", "train_test_num",
                 "patience", "log_every", "lr_step_epochs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    for flag in ("lr", "lr_ratio", "lr_encoder_pretrained"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag} must be positive (got {getattr(args, flag)})")
    for flag in ("weight_decay", "drop_path_rate", "dropout_rate", "num_workers"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must not be negative (got {getattr(args, flag)})")
    if isinstance(args.resize, list):
        if min(args.resize) < args.patch_size:
            raise UserError(f"--resize {args.resize[0]}x{args.resize[1]} is smaller than --patch_size "
                            f"{args.patch_size} on one side; use sides >= {args.patch_size}")
    elif args.resize < 0:
        raise UserError(f"--resize must be 0 (native) or a side length >= {args.patch_size}")
    elif args.resize and args.resize < args.patch_size:
        raise UserError(f"--resize {args.resize} is smaller than --patch_size {args.patch_size}; use --resize >= "
                        f"{args.patch_size} (or 0 to keep native sizes)")
    if args.data_root is None:
        if args.dataset != "koniq-10k":
            raise UserError(f"--data_root is required for --dataset {args.dataset}")
        args.data_root = "./koniq-10k"
    args.pretrained_encoder = resolve_pretrained_encoder(args.pretrained_encoder)
    parse_dataset_specs(args.cross_datasets, "--cross_datasets")
    if args.tensorboard:
        tensorboard_writer_class()


def resolve_pretrained_encoder(paths):
    """One .pkl from ``--pretrained_encoder`` (a shell glob may pass several: take the newest)."""
    if not paths:
        return None
    for path in paths:
        if not os.path.isfile(path):
            hint = " (a pattern that matched no file)" if any(c in path for c in "*?[") else ""
            raise UserError(f"--pretrained_encoder '{path}' does not exist{hint}; run Step 1 (pretrain_qualiclip.py) "
                            f"first or pass the .pkl it wrote")
    newest = max(paths, key=os.path.getmtime)
    if len(paths) > 1:
        print(f"note: --pretrained_encoder matched {len(paths)} files; using the newest, {newest}")
    return newest


def split_seed_of_old_runs(stored):
    """Runs from before --split_seed split by --seed."""
    return {"split_seed": stored.get("seed", DEFAULT_SPLIT_SEED), **stored}


# ----------------------------------------------------------------------------- rounds

def round_checkpoint(round_dir, explicit):
    """The checkpoint a resumed round continues from: the one given if it is in this round, else last.pt."""
    if explicit and os.path.dirname(os.path.abspath(explicit)) == os.path.abspath(round_dir):
        return explicit
    last = os.path.join(round_dir, "last.pt")
    return last if os.path.isfile(last) else None


def round_solver(args, round_dir, dist_info, splits, cross_sets, explicit_ckpt):
    """The round's solver (images decoded, model built, checkpoint loaded; nothing written yet),
    or None when the round already finished."""
    if os.path.isfile(os.path.join(round_dir, "results.json")):
        return None
    ckpt = round_checkpoint(round_dir, explicit_ckpt) if args.resume else None
    _, train_set, val_set, test_set = splits
    return HyperIQASolver(args, train_set, val_set, test_set, dist_info, round_dir, cross_sets=cross_sets,
                          resume_from=ckpt)


def round_results(solver, round_dir, dist_info):
    if solver is not None:
        return solver.train()
    if dist_info.is_main:
        print(f"{round_dir} already finished; reading its results.json")
    with open(os.path.join(round_dir, "results.json")) as f:
        return json.load(f)


def summarize(rounds):
    """{block: {metric: {median, mean, std}}} over rounds (std: the sample standard deviation, ddof 1), for
    val/test/test_last and each cross dataset (every metric the blocks hold: cross-dataset blocks have no raw
    rmse)."""
    def stats(blocks):
        return {m: {"median": float(np.median([b[m] for b in blocks])), "mean": float(np.mean([b[m] for b in blocks])),
                    "std": float(np.std([b[m] for b in blocks], ddof=1))} for m in blocks[0] if m != "n"}

    summary = {key: stats([r[key] for r in rounds]) for key in ("val", "test", "test_last")}
    summary["cross_dataset"] = {name: stats([r["cross_dataset"][name] for r in rounds])
                                for name in rounds[0]["cross_dataset"]}
    return summary


def split_dataset(samples, dataset):
    """(all samples, train, val, test); an empty split is a UserError."""
    return (samples, *(select_split(samples, split, dataset) for split in ("train", "val", "test")))


def read_dataset(args, split_seed):
    return read_index(args.dataset, args.data_root, seed=split_seed, split_file=args.split_file,
                      image_col=args.image_col, score_col=args.score_col, protocol=args.protocol)


def pretrained_images(path):
    """(names the Stage-1 encoder trained on, its args) from its .pkl; (None, {}) when it does not say."""
    ckpt = safe_load(path, "--pretrained_encoder")
    if isinstance(ckpt, dict) and ckpt.get("format") == ENCODER_FORMAT and "train_images" in ckpt:
        return list(ckpt["train_images"]), ckpt.get("args", {})
    return None, {}


def check_pretrain_overlap(args, round_splits):
    """Refuse a fine-tune whose validation or test images the Stage-1 encoder was trained on.

    Images are matched by file name, so the same image is found under another root or resolution
    folder (KonIQ's 1024x768/ and 512x384/).  ``round_splits``: the (samples, train, val, test)
    of every round.
    """
    if not args.pretrained_encoder:
        return
    trained, stage1_args = pretrained_images(args.pretrained_encoder)
    if trained is None:
        print(f"note: --pretrained_encoder '{args.pretrained_encoder}' does not list the images it was trained on; "
              f"the overlap with the validation/test images cannot be checked")
        return
    trained = {os.path.basename(name) for name in trained}
    held_out = {s.path: s for _, _, val, test in round_splits for s in (*val, *test)}
    overlap = sorted(path for path in held_out if os.path.basename(path) in trained)
    if not overlap:
        return
    message = (f"--pretrained_encoder '{args.pretrained_encoder}' was trained on {len(overlap)} of the "
               f"{len(held_out)} validation/test images of {args.dataset} (e.g. {os.path.basename(overlap[0])})")
    if args.allow_pretrain_overlap:
        print(f"warning: {message}; continuing because of --allow_pretrain_overlap: the validation and test "
              f"numbers of this run are not a clean evaluation")
        return
    same_seed, same_protocol = stage1_args.get("split_seed"), stage1_args.get("protocol", "ours")
    if same_protocol != args.protocol:
        advice = f"use Stage 1's protocol (--protocol {same_protocol}) and split seed"
    elif same_seed is not None and same_seed != args.split_seed:
        advice = f"use Stage 1's split (--split_seed {same_seed})"
    else:
        advice = "use the split Stage 1 used"
    raise UserError(f"{message}; {advice}, a --split_file or the official koniq10k_distributions_sets.csv "
                    f"that keeps them apart, pretrain on other images, or pass --allow_pretrain_overlap to "
                    f"accept it knowingly")


def train(args, dist_info):
    if args.resume:
        resume = resolve_resume(args, get_args_parser(), "train_swin.py", CHECKPOINT_FORMAT, subrun=ROUND_DIR,
                                upgrade=split_seed_of_old_runs)
        args, run_dir, explicit_ckpt = resume.args, resume.run_dir, resume.checkpoint
    else:
        check_args(args)
        default_dir = os.path.join("runs", f"train_swin_{args.dataset}_{args.model_size}_{timestamp()}")
        run_dir, explicit_ckpt = broadcast_object(args.output_dir or default_dir, dist_info), None
        check_output_dir(run_dir)
    # Nothing is written before the annotations, the splits, every image (decoded into the
    # caches) and the model / checkpoint files have been checked: a mistake leaves no half-made run.
    round_args = [argparse.Namespace(**{**vars(args), "seed": args.seed + k, "split_seed": args.split_seed + k})
                  for k in range(args.train_test_num)]
    round_splits = [split_dataset(read_dataset(args, r.split_seed), args.dataset) for r in round_args]
    check_pretrain_overlap(args, round_splits)
    cross_samples = {name: read_index(name, root)
                     for name, root in parse_dataset_specs(args.cross_datasets, "--cross_datasets").items()}
    cross_sets = {name: make_eval_set(name, samples, other_dataset_resize(args.resize), args.patch_size, dist_info,
                                      on_device=args.cache_on_device)
                  for name, samples in cross_samples.items()}
    rounds = []
    for k, (this_round, splits) in enumerate(zip(round_args, round_splits)):
        round_dir = run_dir if args.train_test_num == 1 else os.path.join(run_dir, f"round_{k + 1}")
        solver = round_solver(this_round, round_dir, dist_info, splits, cross_sets, explicit_ckpt)
        if dist_info.is_main:
            if k == 0:
                prepare_output_dir(run_dir, resume=bool(args.resume))
                if not args.resume:
                    save_args(run_dir, args)
                print(f"run directory: {run_dir}")
                print(f"protocol {args.protocol}: {json.dumps(protocol_record(args))}")
            if args.train_test_num > 1:
                prepare_output_dir(round_dir, resume=bool(args.resume))
                if not os.path.isfile(os.path.join(round_dir, "args.json")):
                    save_args(round_dir, this_round)
        barrier(dist_info)
        results = round_results(solver, round_dir, dist_info)
        rounds.append({"round": k + 1, "seed": this_round.seed, "split_seed": this_round.split_seed, "dir": round_dir,
                       **results})

    if args.train_test_num > 1:
        summary = summarize(rounds)
        if dist_info.is_main:
            atomic_write_json(os.path.join(run_dir, "results.json"), {
                "dataset": args.dataset, "model_size": args.model_size, "train_test_num": args.train_test_num,
                "protocol": protocol_record(args), "rounds": rounds, "summary": summary,
            })
            test = summary["test"]
            print(f"test over {args.train_test_num} rounds (protocol {args.protocol}): "
                  + ", ".join(f"{m.upper()} median {test[m]['median']:.4f} (mean {test[m]['mean']:.4f} ± sample std "
                              f"{test[m]['std']:.4f})" for m in ("srcc", "plcc")))
    if dist_info.is_main:
        print(f"run directory: {run_dir}")
    return rounds


def main(args):
    with distributed_session(args.device) as dist_info:
        return train(args, dist_info)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
