"""Command line of Stage 1 (``pretrain_qualiclip.py``): its parser and the checks that complete a new run's flags.

Kept out of the entry script so that tools which build or validate Stage-1 commands (``run_ablation.py``)
use the script's own parser without importing the script.
"""
import argparse

from iqa import runtime
from iqa.datasets import DEFAULT_SPLIT_SEED, PROTOCOLS
from iqa.patches import DEFAULT_RESIZE
from iqa.runtime import UserError
from iqa.training_run import tensorboard_writer_class
from models.clip_text import PROMPT_SETS
from models.swin_backbone import MODEL_SIZES
from qualiclip_pretrain import arniqa
from qualiclip_pretrain.degradation_generator import DISTORTION_TYPES, parse_distortion_types, select_levels
from qualiclip_pretrain.pretrain_dataset import DEGRADATIONS, DEGRADE_ON, JPEG_ON, resolve_degrade_on

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
