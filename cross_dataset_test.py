"""Evaluate checkpoints on whole datasets: a table of SRCC/PLCC, a JSON of all metrics, scatter plots.

    python cross_dataset_test.py --checkpoint runs/train_swin_koniq-10k_base_*/best.pt \\
        --datasets spaq=/data/spaq kadid-10k=/data/kadid10k agiqa-3k=/data/AGIQA-3K

Each checkpoint is loaded by ``iqa.scoring.load_scorer`` (a ``train_swin.py`` best.pt/last.pt, or a
Stage-1 ``.pkl`` scored zero-shot) and every image of every dataset (all splits) is scored with
the same evaluation code as training (``iqa.evaluation.evaluate``).  Output JSON:
``{checkpoint: {dataset: {srcc, plcc, plcc_logistic, krcc, rmse_logistic, n}}}``; works under
torchrun.  The RMSE is taken after the 4-parameter logistic mapping onto each dataset's MOS (the
checkpoint's scores are on another scale, so there is no raw RMSE), and the scatter plots show
the checkpoint's own scores.
"""
import argparse
import os

from iqa.evaluation import evaluate, make_eval_set, parse_dataset_specs
from iqa import plots
from iqa.datasets import read_index
from iqa.distributed import broadcast_object, cleanup_distributed, init_distributed
from iqa.runtime import UserError, amp_dtype, atomic_write_json, run_cli, timestamp
from iqa.scoring import add_scoring_arguments, check_new_output, check_scoring_arguments, load_scorer


def get_args_parser():
    parser = argparse.ArgumentParser("Cross-dataset evaluation of Swin-HyperIQA checkpoints", add_help=True)
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH",
                        help="train_swin.py best.pt / last.pt, or a Stage-1 .pkl (zero-shot)")
    parser.add_argument("--datasets", nargs="+", required=True, metavar="NAME=ROOT",
                        help="datasets to score whole, e.g. spaq=/data/spaq kadid-10k=/data/kadid10k")
    parser.add_argument("--resize", type=int, default=None,
                        help="shorter side before cropping (default: the checkpoint's)")
    add_scoring_arguments(parser)
    parser.add_argument("--output", default=None,
                        help="JSON path (default: cross_dataset_<timestamp>.json beside the first checkpoint)")
    return parser


def checkpoint_label(path):
    """``runs/x/best.pt`` -> ``x_best`` (file names of the scatter plots)."""
    path = os.path.abspath(path)
    return f"{os.path.basename(os.path.dirname(path))}_{os.path.splitext(os.path.basename(path))[0]}"


def print_table(results, names):
    width = max(len(c) for c in results)
    print(f"{'checkpoint':<{width}}  " + "  ".join(f"{n + ' SRCC/PLCC':>24}" for n in names))
    for ckpt, row in results.items():
        print(f"{ckpt:<{width}}  " + "  ".join(f"{row[n]['srcc']:>11.4f} / {row[n]['plcc']:<10.4f}" for n in names))


def run(args, dist_info):
    check_scoring_arguments(args)
    specs = parse_dataset_specs(args.datasets, "--datasets")
    output = broadcast_object(args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint[0])),
                                                          f"cross_dataset_{timestamp()}.json"), dist_info)
    check_new_output(output)
    samples = {name: read_index(name, root) for name, root in specs.items()}  # every annotation checked first
    amp = amp_dtype(args.amp, dist_info.device)
    eval_sets, results, plots_to_write = {}, {}, []
    for ckpt in args.checkpoint:
        scorer = load_scorer(ckpt, dist_info.device)
        scorer.resize = scorer.resize if args.resize is None else args.resize
        scorer.test_patch_num = args.test_patch_num or scorer.test_patch_num
        if scorer.resize and scorer.resize < scorer.patch_size:
            raise UserError(f"--resize {scorer.resize} is smaller than the checkpoint's patch size {scorer.patch_size}")
        opts = scorer.options(args.batch_size, amp, args.num_workers)
        results[ckpt] = {}
        for name in specs:
            key = (name, scorer.resize, scorer.patch_size)
            if key not in eval_sets:  # decoded once, shared by checkpoints with the same settings
                eval_sets[key] = make_eval_set(name, samples[name], scorer.resize, scorer.patch_size, dist_info)
            metrics, pred = evaluate(scorer.score, eval_sets[key], dist_info, opts)
            results[ckpt][name] = metrics
            plots_to_write.append((ckpt, name, pred))
    if dist_info.is_main:  # all outputs at the end: a bad later checkpoint leaves nothing half-written
        for ckpt, name, pred in plots_to_write:
            png = f"{os.path.splitext(output)[0]}_{checkpoint_label(ckpt)}_{name}.png"
            plots.plot_scatter(pred, [s.mos for s in samples[name]], png, title=f"{ckpt} on {name}",
                               metrics=results[ckpt][name])
        print_table(results, list(specs))
        atomic_write_json(output, results)
        print(f"wrote {output}")
    return results


def main(args):
    dist_info = init_distributed(args.device)
    try:
        return run(args, dist_info)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
