"""Evaluate checkpoints on whole datasets: a table of SRCC/PLCC, a JSON of all metrics, scatter plots.

    python cross_dataset_test.py --checkpoint runs/train_swin_koniq-10k_base_*/best.pt \\
        --datasets spaq=/data/spaq kadid-10k=/data/kadid10k agiqa-3k=/data/AGIQA-3K

Each checkpoint is loaded by ``iqa.scoring.load_scorer`` (a ``train_swin.py`` best.pt/last.pt, a
Stage-1 ``.pkl`` scored zero-shot, or QualiCLIP's released ``qualiclip.pth``) and every image of
every dataset (all splits) is scored with the same evaluation code as training
(``iqa.evaluation.evaluate``); CLIP image encoders (the release, ``--encoder clip`` .pkl files) are
scored as QualiCLIP's inference, on the whole image at full resolution, in one process.  Output JSON:
``{checkpoint: {dataset: {srcc, plcc, plcc_logistic, krcc, rmse_logistic, n}}}``, and the printed
table as Markdown beside it (``.md``), whose "MOS training" column marks the opinion-unaware
checkpoints (Stage-1 encoders and the release: never trained on any MOS); works under torchrun.
The RMSE is taken after the 4-parameter logistic mapping onto each dataset's MOS (the
checkpoint's scores are on another scale, so there is no raw RMSE), and the scatter plots show
the checkpoint's own scores.
"""
import os

from iqa.evaluation import evaluate, make_eval_set, parse_dataset_specs
from iqa import plots
from iqa.cross_dataset_args import get_args_parser
from iqa.datasets import read_index
from iqa.distributed import broadcast_object, distributed_session
from iqa.runtime import UserError, amp_dtype, atomic_write_json, atomic_write_text, run_cli, timestamp
from iqa.scoring import check_new_output, check_scoring_arguments, load_scorer


def checkpoint_label(path):
    """``runs/x/best.pt`` -> ``x_best`` (file names of the scatter plots)."""
    path = os.path.abspath(path)
    return f"{os.path.basename(os.path.dirname(path))}_{os.path.splitext(os.path.basename(path))[0]}"


OPINION_UNAWARE = "none (opinion-unaware)"


def mos_training(scorer):
    """The table's "MOS training" cell: a Stage-2 model learnt MOS; a zero-shot scorer never saw any."""
    return "yes (Stage 2)" if scorer.mos_bounds is not None else OPINION_UNAWARE


def results_table(results, names, training):
    """SRCC / PLCC per checkpoint (rows) and dataset (columns), as Markdown lines."""
    lines = ["| checkpoint | MOS training | " + " | ".join(f"{n} SRCC/PLCC" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for ckpt, row in results.items():
        lines.append(f"| {ckpt} | {training[ckpt]} | "
                     + " | ".join(f"{row[n]['srcc']:.4f} / {row[n]['plcc']:.4f}" for n in names) + " |")
    if any(training[ckpt] == OPINION_UNAWARE for ckpt in results):
        lines += ["", "opinion-unaware: scored zero-shot against the checkpoint's prompts; no MOS of any dataset "
                      "was used to train it."]
    return lines


def main(args):
    with distributed_session(args.device) as dist_info:
        return run(args, dist_info)


def run(args, dist_info):
    check_scoring_arguments(args)
    specs = parse_dataset_specs(args.datasets, "--datasets")
    output = broadcast_object(args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint[0])),
                                                          f"cross_dataset_{timestamp()}.json"), dist_info)
    check_new_output(output)
    samples = {name: read_index(name, root) for name, root in specs.items()}  # every annotation checked first
    amp = amp_dtype(args.amp, dist_info.device)
    eval_sets, results, training, plots_to_write = {}, {}, {}, []
    for ckpt in args.checkpoint:
        scorer = load_scorer(ckpt, dist_info.device)
        scorer.resize = scorer.resize if args.resize is None else args.resize
        if scorer.patch_size is not None:  # whole-image scorers have no crops
            scorer.test_patch_num = args.test_patch_num or scorer.test_patch_num
        if scorer.resize and scorer.resize < scorer.min_side:
            raise UserError(f"--resize {scorer.resize} is smaller than the checkpoint's patch size {scorer.min_side}")
        opts = scorer.options(args.batch_size, amp, args.num_workers)
        results[ckpt], training[ckpt] = {}, mos_training(scorer)
        for name in specs:
            key = (name, scorer.resize, scorer.min_side)
            if key not in eval_sets:  # decoded once, shared by checkpoints with the same settings
                eval_sets[key] = make_eval_set(name, samples[name], scorer.resize, scorer.min_side, dist_info)
            metrics, pred = evaluate(scorer.score, eval_sets[key], dist_info, opts, predict=scorer.predict)
            results[ckpt][name] = metrics
            plots_to_write.append((ckpt, name, pred))
    if dist_info.is_main:  # all outputs at the end: a bad later checkpoint leaves nothing half-written
        for ckpt, name, pred in plots_to_write:
            png = f"{os.path.splitext(output)[0]}_{checkpoint_label(ckpt)}_{name}.png"
            plots.plot_scatter(pred, [s.mos for s in samples[name]], png, title=f"{ckpt} on {name}",
                               metrics=results[ckpt][name])
        table = "\n".join(results_table(results, list(specs), training)) + "\n"
        print(table, end="")
        atomic_write_json(output, results)
        atomic_write_text(f"{os.path.splitext(output)[0]}.md", table)
        print(f"wrote {output} and its table {os.path.splitext(output)[0]}.md")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
