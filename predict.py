"""Score one image or a folder of images -> CSV ``image, score[, mos]`` (higher = better).

    python predict.py --checkpoint runs/train_swin_koniq-10k_base_*/best.pt --input photos/ --output scores.csv
    python predict.py --checkpoint checkpoints/qualiclip_pretrain_*/swin_base_qualiclip_pretrained.pkl \\
        --input photo.jpg --output zero_shot.csv

A ``train_swin.py`` checkpoint gives ``score``, the model's output on its [0, 1] training scale,
and ``mos``, that score mapped onto the training dataset's MOS range.  A Stage-1 Swin ``.pkl``
gives the zero-shot log-odds ``100 x (cos_pos - cos_neg)`` as ``score`` (unbounded; the
probability of the positive prompt saturates at 1.0 for a trained encoder) and no ``mos``; a CLIP
encoder ``.pkl`` and QualiCLIP's released ``qualiclip.pth`` give QualiCLIP's probability in
[0, 1].  The run prints which, and ``<output>.json`` records it as ``score_meaning``.  Each
image is scored by ``iqa.scoring`` exactly as evaluation scores it (mean over grid crops; CLIP
image encoders, the release included: the whole image at full resolution, as QualiCLIP's
inference).

For large folders (searched recursively): images are decoded and scored ``--chunk_size`` at a
time and each chunk's rows are appended to ``--output`` (flushed to disk) as soon as it is done,
so a stopped run keeps what it scored and ``--resume`` finishes it, skipping the images already
in the CSV.  The settings are kept in ``<output>.json`` and a resume with another checkpoint,
crop count or score meaning is refused.  An image that does not decode (truncated, empty, not an image) is
skipped and listed with the reason in ``<output stem>_unreadable.csv``; ``--strict`` stops at
the first one instead.
"""
import argparse
import csv
import json
import os

from iqa.datasets import list_image_files
from iqa.evaluation import csv_text
from iqa.runtime import UserError, amp_dtype, append_text, atomic_write_json, resolve_device, run_cli
from iqa.scoring import CHUNK_SIZE, add_scoring_arguments, check_new_output, check_scoring_arguments, load_scorer

# Settings a resumed run must share; score_meaning too, so that scores of two scales never share a CSV.
RESUME_CHECKED = ("checkpoint", "resize", "patch_size", "test_patch_num", "score_meaning")


def get_args_parser():
    parser = argparse.ArgumentParser("Score images with a Stage-2 checkpoint or a Stage-1 encoder", add_help=True)
    parser.add_argument("--checkpoint", required=True,
                        help="train_swin.py best.pt / last.pt, a Stage-1 .pkl or QualiCLIP's qualiclip.pth")
    parser.add_argument("--input", required=True, help="an image file or a folder (searched recursively)")
    parser.add_argument("--output", required=True,
                        help="CSV to write (image, score[, mos]); must not exist yet unless --resume")
    add_scoring_arguments(parser)
    parser.add_argument("--chunk_size", type=int, default=CHUNK_SIZE,
                        help="images decoded and scored at a time; results are written after each chunk")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: skip the images already in --output")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first image that does not decode (default: skip it and list it)")
    return parser


def list_inputs(path):
    """``[(path, name for the CSV)]``: the file itself, or a folder's images sorted."""
    if os.path.isfile(path):
        return [(path, path)]
    if not os.path.exists(path):
        raise UserError(f"--input '{path}' does not exist; pass an image file or a folder of images")
    return [(os.path.join(path, name), name) for name in list_image_files(path, "--input")]


def settings_path(output):
    return f"{output}.json"


def unreadable_path(output):
    return f"{os.path.splitext(output)[0]}_unreadable.csv"


def drop_partial_last_line(path):
    """Cut a row a kill left half-written (no final newline), so its image is scored again."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def scored_names(output, settings, header):
    """The images an interrupted run already wrote to ``output``, after checking it is the same run."""
    try:
        with open(settings_path(output)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"--resume: '{settings_path(output)}' (the settings of '{output}') is missing or "
                        f"unreadable, so the CSV cannot be checked; choose a new --output") from None
    for key in RESUME_CHECKED:
        if saved.get(key) != settings[key]:
            raise UserError(f"--resume: '{output}' was written with {key} {saved.get(key)!r}, this run has "
                            f"{settings[key]!r}; pass the same settings or choose a new --output")
    drop_partial_last_line(output)
    with open(output, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != header:
        raise UserError(f"--resume: '{output}' does not start with the header {','.join(header)}; "
                        f"choose a new --output")
    return {row[0] for row in rows[1:] if row}


def main(args):
    check_scoring_arguments(args)
    if args.chunk_size < 1:
        raise UserError("--chunk_size must be at least 1")
    resuming = args.resume and os.path.exists(args.output)
    if not resuming:
        check_new_output(args.output, advice="choose a new path, or pass --resume to finish it")
    files = list_inputs(args.input)
    device = resolve_device(args.device)
    scorer = load_scorer(args.checkpoint, device)
    if scorer.patch_size is not None:  # whole-image scorers have no crops
        scorer.test_patch_num = args.test_patch_num or scorer.test_patch_num
    header = ["image", "score"] + (["mos"] if scorer.mos_bounds else [])
    settings = {"checkpoint": os.path.abspath(args.checkpoint), "kind": scorer.kind, "resize": scorer.resize,
                "patch_size": scorer.patch_size, "test_patch_num": scorer.test_patch_num,
                "mos_bounds": scorer.mos_bounds, "columns": header, "score_meaning": scorer.score_meaning}

    done = scored_names(args.output, settings, header) if resuming else set()
    if not resuming:
        atomic_write_json(settings_path(args.output), settings)
        append_text(args.output, csv_text([header]))
    bad_list = unreadable_path(args.output)
    if os.path.exists(bad_list):  # from an earlier try: its images are tried again below
        os.remove(bad_list)
    todo = [(path, name) for path, name in files if name not in done]
    names = dict(todo)
    opts = scorer.options(args.batch_size, amp_dtype(args.amp, device), args.num_workers)
    scored, unreadable = [], []
    for chunk in scorer.score_chunks([path for path, _ in todo], opts, chunk_size=args.chunk_size,
                                     skip_unreadable=not args.strict, progress=True):
        rows = [[names[path], score] + ([float(scorer.to_mos(score))] if scorer.mos_bounds else [])
                for path, score in chunk if not isinstance(score, UserError)]
        failed = [[names[path], str(err)] for path, err in chunk if isinstance(err, UserError)]
        append_text(args.output, csv_text(rows))
        if failed:
            append_text(bad_list, csv_text(([] if unreadable else [["image", "reason"]]) + failed))
        scored += [score for _, score, *_ in rows]
        unreadable += failed

    skipped = f", {len(done)} already in it" if done else ""
    print(f"scored {len(scored)} image(s) -> {args.output}{skipped}")
    print(scorer.score_meaning)
    if unreadable:
        print(f"{len(unreadable)} unreadable image(s) skipped, listed in {bad_list} (first: {unreadable[0][0]})")
    if scorer.mos_bounds:
        lo, hi = scorer.mos_bounds
        print(f"score is on the checkpoint's [0, 1] training scale; mos = {lo:g} + score x {hi - lo:g}")
    return scored


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
