"""The standard IQA analysis figures of existing checkpoints: PNGs, their numbers as JSON, report.md.

    python tools/analyze.py --checkpoint results/X/baseline/seed_0/best.pt results/X/pretrained/seed_0/best.pt \\
        results/X/pretrain/swin_nano_qualiclip_pretrained.pkl --labels baseline pretrained stage1 \\
        --datasets koniq-10k=demo_data/koniq-10k kadid-10k=demo_data/kadid-10k --split test \\
        --output_dir results/analysis_demo

Figures (``--figures``, default every one the inputs allow; see ``iqa.analysis``): ``levels``
(quality vs. degradation level, ``--arniqa`` adds ARNIQA's 24 distortions), ``attention``
(stage-attention weights of attention-fusion Stage-2 checkpoints), ``feature_map`` (PCA or
``--embedding tsne`` of encoder features), ``pred_vs_mos`` (checkpoints × datasets).  Level curves
and the synthetic feature map use ``--num_images`` clean images of ``--image_dir``, else of the
first dataset; the other figures need ``--datasets``.  ``--output_dir`` must not hold an earlier
analysis (its args.json).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iqa import analysis  # noqa: E402
from iqa.datasets import SPLITS, list_image_files  # noqa: E402
from iqa.evaluation import parse_dataset_specs  # noqa: E402
from iqa.runtime import (UserError, amp_dtype, atomic_write_text, check_output_dir,  # noqa: E402
                         prepare_output_dir, resolve_device, run_cli, save_args, seed_everything, timestamp)
from iqa.scoring import add_scoring_arguments, check_scoring_arguments  # noqa: E402

NEED_DATASETS = ("attention", "pred_vs_mos")


def get_args_parser():
    parser = argparse.ArgumentParser("Analysis figures of Stage-1 / Stage-2 checkpoints", add_help=True)
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH",
                        help="train_swin.py best.pt / last.pt, a Stage-1 .pkl, or any kind iqa.scoring loads")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per checkpoint (default: from the paths)")
    parser.add_argument("--datasets", nargs="+", default=[], metavar="NAME=ROOT",
                        help="labelled datasets, e.g. koniq-10k=demo_data/koniq-10k kadid-10k=demo_data/kadid-10k")
    parser.add_argument("--split", default="all", choices=(*SPLITS, "all"),
                        help="the split of every dataset to use (a Stage-2 checkpoint's own dataset: pass test)")
    parser.add_argument("--max_images", type=int, default=0,
                        help="at most this many images per dataset, a seeded subset (0 = all)")
    parser.add_argument("--image_dir", default=None,
                        help="clean images for the level curves and the synthetic feature map (default: the first "
                             "dataset's)")
    parser.add_argument("--num_images", type=int, default=16, help="clean images per level curve (seeded subset)")
    parser.add_argument("--degrade_resize", type=int, default=analysis.DEGRADE_RESIZE,
                        help="shorter side the clean images are resized to before they are degraded")
    parser.add_argument("--figures", nargs="+", choices=analysis.FIGURES, default=None,
                        help="figures to make (default: every one the inputs allow)")
    parser.add_argument("--arniqa", action="store_true", help="also level curves of ARNIQA's 24 distortions")
    parser.add_argument("--embedding", default="pca", choices=analysis.EMBEDDINGS, help="feature-map embedding")
    parser.add_argument("--seed", type=int, default=0, help="image subsets, noise of the degradations, t-SNE")
    parser.add_argument("--output_dir", default=None,
                        help="new folder for the figures (default: results/analysis_<timestamp>)")
    add_scoring_arguments(parser)
    return parser


def chosen_figures(args, checkpoints):
    """The figures to make: those asked for (refused when the inputs cannot give them), else every one
    the inputs allow."""
    with_attention = [c for c in checkpoints if analysis.has_stage_attention(c)]
    if args.figures is None:
        return [f for f in analysis.FIGURES
                if (args.datasets or f not in NEED_DATASETS) and (f != "attention" or with_attention)]
    for figure in set(args.figures) & set(NEED_DATASETS):
        if not args.datasets:
            raise UserError(f"--figures {figure} needs labelled images; pass --datasets NAME=ROOT")
    if "attention" in args.figures and not with_attention:
        raise UserError(f"--figures attention: none of {', '.join(args.checkpoint)} has stage attention "
                        f"(train_swin.py --attention_fusion); pass such a checkpoint or leave attention out")
    return list(dict.fromkeys(args.figures))


def check_args(args):
    check_scoring_arguments(args)
    if args.num_images < 2 or args.max_images < 0:
        raise UserError("--num_images must be at least 2 (the spread needs two images) and --max_images at least 0")
    if args.degrade_resize < analysis.MIN_DEGRADE_RESIZE:
        raise UserError(f"--degrade_resize {args.degrade_resize} is too small; pass at least "
                        f"{analysis.MIN_DEGRADE_RESIZE} (ARNIQA's patch distortions need that many pixels a side)")
    if not args.datasets and not args.image_dir:
        raise UserError("no images: pass --datasets NAME=ROOT and/or --image_dir DIR")
    args.output_dir = args.output_dir or os.path.join("results", f"analysis_{timestamp()}")
    check_output_dir(args.output_dir)


def main(args):
    check_args(args)
    specs = parse_dataset_specs(args.datasets, "--datasets")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    checkpoints = analysis.load_checkpoints(args.checkpoint, args.labels, device)
    for checkpoint in checkpoints:
        checkpoint.scorer.test_patch_num = args.test_patch_num or checkpoint.scorer.test_patch_num
    figures = chosen_figures(args, checkpoints)
    image_sets = analysis.dataset_sets(specs, args.split, args.max_images, args.seed)
    if args.image_dir:
        level_paths = [os.path.join(args.image_dir, n) for n in list_image_files(args.image_dir, "--image_dir")]
    else:
        level_paths = [s.path for s in image_sets[0].samples]
    level_paths = analysis.seeded_subset(level_paths, args.num_images, args.seed)
    prepare_output_dir(args.output_dir)
    save_args(args.output_dir, args)

    amp = amp_dtype(args.amp, device)

    def opts_of(scorer):
        return scorer.options(args.batch_size, amp, args.num_workers)

    decoded = analysis.DecodedImages()
    meanings = {c.label: c.scorer.score_meaning for c in checkpoints}
    sections, synthetic = [], None
    feature_fns = ({c.label: analysis.encoder_features(c) for c in checkpoints} if "feature_map" in figures
                   else None)
    if "levels" in figures or "feature_map" in figures:
        clean = analysis.clean_images(level_paths, args.degrade_resize)
        scores, synthetic = analysis.run_ladders(checkpoints, clean, analysis.FOUR_TYPES, opts_of, args.seed,
                                                 feature_fns)
        if "levels" in figures:
            data = analysis.level_curve_data(analysis.FOUR_TYPES, scores, level_paths, args.degrade_resize,
                                              meanings)
            png = analysis.plot_level_curves(data, args.output_dir, analysis.FOUR_TYPES.stem)
            sections.append(("Quality vs. degradation level", png, analysis.level_section(data)))
        if args.arniqa and "levels" in figures:
            scores, _ = analysis.run_ladders(checkpoints, clean, analysis.ARNIQA, opts_of, args.seed)
            data = analysis.level_curve_data(analysis.ARNIQA, scores, level_paths, args.degrade_resize,
                                              meanings)
            png = analysis.plot_level_curves(data, args.output_dir, analysis.ARNIQA.stem)
            sections.append(("Quality vs. degradation level: ARNIQA distortions", png, analysis.level_section(data)))
    if "attention" in figures:
        with_attention = [c for c in checkpoints if analysis.has_stage_attention(c)]
        skipped = [c.label for c in checkpoints if c not in with_attention]
        data = analysis.attention_data(with_attention, image_sets, decoded, opts_of)
        sections.append(("Stage-attention weights", analysis.plot_attention(data, args.output_dir),
                         analysis.attention_section(data, skipped)))
    if "feature_map" in figures:
        data = analysis.feature_map_data(checkpoints, image_sets, decoded, opts_of, synthetic, args.embedding,
                                         args.seed)
        sections.append(("Feature map", analysis.plot_feature_map(data, image_sets, args.output_dir),
                         analysis.feature_section(data)))
    if "pred_vs_mos" in figures:
        data = analysis.pred_vs_mos_data(checkpoints, image_sets, decoded, opts_of)
        sections.append(("Predicted vs. MOS", analysis.plot_pred_vs_mos(data, args.output_dir),
                         analysis.pred_section(data)))
    settings = {"seed": args.seed, "device": str(device), "split": args.split,
                "clean images for the level curves": f"{len(level_paths)} of {args.image_dir or image_sets[0].name}"}
    report = analysis.report_text(checkpoints, image_sets, settings, sections)
    atomic_write_text(os.path.join(args.output_dir, "report.md"), report)
    print(f"wrote {len(sections)} figure(s) and report.md to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
