"""Command line of Stage 2 (``train_swin.py``): its parser, the ``--protocol`` defaults and the checks that
complete a new run's flags.

Kept out of the entry script so that tools which build or validate fine-tuning commands (``run_ablation.py``)
use the script's own parser without importing the script.
"""
import argparse
import os

from HyperIQASolver_swin import LOSSES, PATCH_SIZE, SCHEDULERS
from iqa.datasets import DATASET_NAMES, DEFAULT_SPLIT_SEED, HYPERIQA_RESIZE, PROTOCOLS
from iqa.evaluation import DEFAULT_TEST_PATCH_NUM, parse_dataset_specs
from iqa.patches import DEFAULT_RESIZE
from iqa.runtime import UserError
from iqa.training_run import tensorboard_writer_class
from models.swin_backbone import MODEL_SIZES

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
