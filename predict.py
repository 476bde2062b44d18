"""Score one image or a folder of images -> CSV ``image, score`` (higher = better).

    python predict.py --checkpoint runs/train_swin_koniq-10k_base_*/best.pt --input photos/ --output scores.csv
    python predict.py --checkpoint checkpoints/qualiclip_pretrain_*/swin_base_qualiclip_pretrained.pkl \\
        --input photo.jpg --output zero_shot.csv

A ``train_swin.py`` checkpoint gives the model's score on its [0, 1] training scale (MOS rescaled
by the training dataset's range; the mapping back to MOS is printed).  A Stage-1 ``.pkl`` gives
the zero-shot score in [0, 1] (probability of the positive prompt).  Each image is the mean over
``--test_patch_num`` grid crops, as in evaluation; a folder is searched recursively and scored
in batches of decoded images.
"""
import argparse
import csv
import io
import os

from HyperIQASolver_swin import load_scorer
from iqa.evaluation import EvalOptions, predict_images
from iqa.datasets import Sample
from iqa.patches import cache_images
from iqa.runtime import UserError, amp_dtype, atomic_write_text, check_writable_path, resolve_device, run_cli

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CHUNK = 256  # images decoded at a time, so a large folder never sits in memory at once


def get_args_parser():
    parser = argparse.ArgumentParser("Score images with a Stage-2 checkpoint or a Stage-1 encoder", add_help=True)
    parser.add_argument("--checkpoint", required=True, help="train_swin.py best.pt / last.pt, or a Stage-1 .pkl")
    parser.add_argument("--input", required=True, help="an image file or a folder (searched recursively)")
    parser.add_argument("--output", required=True, help="CSV to write (image, score); must not exist yet")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--test_patch_num", type=int, default=None, help="crops per image (default: the checkpoint's)")
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    return parser


def list_images(path):
    """``[(absolute path, name for the CSV)]``: the file itself, or a folder's images sorted."""
    if os.path.isfile(path):
        return [(path, path)]
    if not os.path.isdir(path):
        raise UserError(f"--input '{path}' does not exist; pass an image file or a folder of images")
    found = sorted(
        os.path.relpath(os.path.join(folder, name), path)
        for folder, _, names in os.walk(path) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not found:
        raise UserError(f"--input folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [(os.path.join(path, name), name) for name in found]


def main(args):
    if args.batch_size < 1 or (args.test_patch_num is not None and args.test_patch_num < 1):
        raise UserError("--batch_size and --test_patch_num must be at least 1")
    if os.path.exists(args.output):
        raise UserError(f"--output '{args.output}' already exists; choose a new path")
    check_writable_path(args.output, "--output")
    files = list_images(args.input)
    device = resolve_device(args.device)
    scorer = load_scorer(args.checkpoint, device)
    opts = EvalOptions(args.test_patch_num or scorer.test_patch_num, scorer.patch_size, args.batch_size,
                       amp_dtype(args.amp, device), num_workers=args.num_workers)
    scores = []
    for start in range(0, len(files), CHUNK):
        chunk = [Sample(path, float("nan"), None, None) for path, _ in files[start:start + CHUNK]]
        images = cache_images(chunk, scorer.resize, scorer.patch_size, desc="decode")
        scores += predict_images(scorer.score, images, device, opts, desc="score").tolist()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "score"])
    writer.writerows([name, f"{score:.6f}"] for (_, name), score in zip(files, scores))
    atomic_write_text(args.output, buffer.getvalue())
    if scorer.mos_bounds:
        lo, hi = scorer.mos_bounds
        print(f"scores are on the checkpoint's [0, 1] training scale: MOS = {lo:g} + score x {hi - lo:g}")
    print(f"scored {len(files)} image(s) -> {args.output}")
    return scores


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
