"""Collect one run of run_qualiclip_experiments.sh into summary.md, summary.json and plots.

Reads ``<results>/pretrain/results.json`` (and ``args.json``, to tell whether Stage 1 used the
offline demo's random text anchors), ``<results>/{baseline,pretrained}/results.json`` and
``log.jsonl``, ``<results>/cross_dataset.json`` and the step timings written by the pipeline,
and fills in the two tables of QUALICLIP_PRETRAIN_GUIDE.md.

    python tools/summarize_experiment.py results/20261127_101500 [--demo]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from iqa import runtime  # noqa: E402
from iqa.runtime import UserError  # noqa: E402

MODELS = (("baseline", "Baseline (No Pretrain)"), ("pretrained", "QualiCLIP Pretrain"))
CROSS_NAMES = (("spaq", "SPAQ"), ("kadid-10k", "KADID-10K"), ("agiqa-3k", "AGIQA-3K"), ("livec", "LIVE-C"))
RANDOM_ANCHORS_NOTE = ("Stage 1 trained against fixed random text anchors (no CLIP weights were available "
                       "offline), not against CLIP's prompt features.")
DEMO_NOTE = ("> **Demo data.** These numbers come from the built-in demo datasets: scikit-image photographs "
             "with synthetic degradations whose MOS follows the degradation strength. They check that the "
             "pipeline works; they say nothing about KonIQ-10k or any real IQA benchmark.")


def read_json(path, required=True):
    if not os.path.isfile(path):
        if required:
            raise UserError(f"'{path}' is missing; did that pipeline step finish?")
        return None
    with open(path) as f:
        return json.load(f)


def read_timings(path):
    timings = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                name, seconds = line.split("\t")
                timings[name] = float(seconds)
    return timings


def format_duration(seconds):
    if seconds is None:
        return "n/a"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.1f}min"
    return f"{seconds:.0f}s"


def pair(metrics):
    return "n/a" if not metrics else f"{metrics['srcc']:.4f} / {metrics['plcc']:.4f}"


def checkpoint_results(cross, model_dir):
    """Entry of cross_dataset.json belonging to ``<model_dir>/best.pt`` (keys are checkpoint paths)."""
    for checkpoint, per_dataset in (cross or {}).items():
        if os.path.basename(os.path.dirname(os.path.normpath(checkpoint))) == model_dir:
            return per_dataset
    return {}


def used_random_anchors(results_dir):
    """True when Stage 1's --text_features file is tools/make_text_features.py's random stand-in."""
    args = read_json(os.path.join(results_dir, "pretrain", "args.json"), required=False) or {}
    path = args.get("text_features")
    if not path or not os.path.isfile(path):
        return False
    anchors = runtime.safe_load(path, "--text_features")
    return isinstance(anchors, dict) and bool(anchors.get("random"))


def collect(results_dir):
    timings = read_timings(os.path.join(results_dir, "timings.tsv"))
    pretrain = read_json(os.path.join(results_dir, "pretrain", "results.json"))
    cross = read_json(os.path.join(results_dir, "cross_dataset.json"), required=False)
    summary = {"pretrain": {"zero_shot_val": pretrain.get("zero_shot_val"), "time_s": timings.get("pretrain"),
                            "random_anchors": used_random_anchors(results_dir)},
               "models": {}}
    for key, _ in MODELS:
        run = read_json(os.path.join(results_dir, key, "results.json"))
        time_s = timings.get(key)
        if key == "pretrained" and time_s is not None and timings.get("pretrain") is not None:
            time_s += timings["pretrain"]
        summary["models"][key] = {
            "koniq_test": run["test"], "koniq_test_last": run.get("test_last"), "val": run.get("val"),
            "best_epoch": run.get("best_epoch"), "time_s": time_s, "finetune_time_s": timings.get(key),
            "cross_dataset": checkpoint_results(cross, key),
        }
    return summary


def render_markdown(summary, demo):
    lines = ["# QualiCLIP pretraining experiment", ""]
    if demo:
        lines += [DEMO_NOTE, ""]
    if summary["pretrain"]["random_anchors"]:
        lines += [RANDOM_ANCHORS_NOTE, ""]
    zero_shot = summary["pretrain"]["zero_shot_val"]
    if zero_shot:
        lines += [f"Stage 1 ({format_duration(summary['pretrain']['time_s'])}): zero-shot SRCC/PLCC of the encoder "
                  f"on the KonIQ-10k validation split: {pair(zero_shot)}", ""]
    lines += ["## Performance comparison", "",
              "| Model | KonIQ-10k test (SRCC/PLCC) | best epoch (val) | Training time |",
              "|---|---|---|---|"]
    for key, label in MODELS:
        m = summary["models"][key]
        time_text = format_duration(m["time_s"])
        if key == "pretrained" and summary["pretrain"]["time_s"] is not None and m["finetune_time_s"] is not None:
            time_text = (f"{format_duration(summary['pretrain']['time_s'])} + "
                         f"{format_duration(m['finetune_time_s'])} = {time_text}")
        lines.append(f"| {label} | {pair(m['koniq_test'])} | {m['best_epoch']} | {time_text} |")
    present = [(k, label) for k, label in CROSS_NAMES
               if any(k in summary["models"][m]["cross_dataset"] for m, _ in MODELS)]
    lines += ["", "## Cross-dataset generalization (trained on KonIQ-10k; SRCC/PLCC)", ""]
    if present:
        lines += ["| Model | " + " | ".join(label for _, label in present) + " |",
                  "|---|" + "---|" * len(present)]
        for key, label in MODELS:
            cells = [pair(summary["models"][key]["cross_dataset"].get(k)) for k, _ in present]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    else:
        lines.append("No cross-dataset roots were found, so nothing was evaluated.")
    lines += ["", "Model selection used the KonIQ-10k validation split; the test split was never used to choose.",
              "Plots: `curves.png` (both fine-tunes), `scatter_koniq_test.png`.", ""]
    return "\n".join(lines)


def plot_curves(results_dir, path):
    fig, (ax_loss, ax_srcc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in MODELS:
        log_path = os.path.join(results_dir, key, "log.jsonl")
        if not os.path.isfile(log_path):
            continue
        records = runtime.read_jsonl(log_path)
        epochs = [r["epoch"] for r in records]
        ax_loss.plot(epochs, [r.get("train_loss") for r in records], marker="o", label=label)
        ax_srcc.plot(epochs, [r["val"]["srcc"] for r in records], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Fine-tuning loss")
    ax_srcc.set(xlabel="epoch", ylabel="SRCC", title="KonIQ-10k validation SRCC")
    for ax in (ax_loss, ax_srcc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_predictions(path):
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(r["pred"]) for r in rows], [float(r["mos"]) for r in rows]


def plot_test_scatter(results_dir, summary, path):
    fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], MODELS):
        pred, mos = read_predictions(os.path.join(results_dir, key, "predictions_test.csv"))
        ax.scatter(mos, pred, s=10, alpha=0.6)
        ax.set(xlabel="MOS", ylabel="prediction (on the MOS scale)",
               title=f"{label}\nKonIQ-10k test SRCC/PLCC {pair(summary['models'][key]['koniq_test'])}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    if not os.path.isdir(args.results_dir):
        raise UserError(f"'{args.results_dir}' is not a results directory of run_qualiclip_experiments.sh")
    summary = collect(args.results_dir)
    summary["demo_data"] = args.demo
    plot_curves(args.results_dir, os.path.join(args.results_dir, "curves.png"))
    plot_test_scatter(args.results_dir, summary, os.path.join(args.results_dir, "scatter_koniq_test.png"))
    runtime.atomic_write_json(os.path.join(args.results_dir, "summary.json"), summary)
    runtime.atomic_write_text(os.path.join(args.results_dir, "summary.md"), render_markdown(summary, args.demo))
    print(f"summary written to {os.path.join(args.results_dir, 'summary.md')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Summarise a run_qualiclip_experiments.sh results directory")
    parser.add_argument("results_dir")
    parser.add_argument("--demo", action="store_true", help="mark every table as made from synthetic demo data")
    runtime.run_cli(main, parser.parse_args())
