"""Collect one run of run_qualiclip_experiments.sh into summary.md, summary.json and plots.

Reads Stage 1's ``<results>/pretrain/results.json`` (``--protocol hyperiqa``: one Stage 1 per
round, ``<results>/pretrain/seed_<s>/results.json``) and ``args.json`` (to tell whether Stage 1
used the offline demo's random text anchors), every fine-tune ``<results>/<model>/seed_<s>/`` (its
``results.json``, ``args.json``, ``log.jsonl`` and test predictions) for the three models
(baseline; baseline at the pretrained run's encoder LR; from the Stage-1 encoder),
``<results>/cross_dataset.json`` and the step timings written by the pipeline.

Over seeds every number is the mean ± the sample standard deviation (ddof 1); under
``--protocol hyperiqa`` each seed is one HyperIQA round (its own 80/20 split) and the median over
rounds comes first, the mean ± std beside it.  Differences between models are paired by seed
(same split, same data order), so their spread is the standard deviation of the per-seed
differences.

    python tools/summarize_experiment.py results/20261127_101500 [--demo]
"""
import argparse
import csv
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from iqa import runtime  # noqa: E402
from iqa.runtime import UserError  # noqa: E402

MODELS = (
    ("baseline", "Baseline (No Pretrain)"),
    ("baseline_matched_lr", "Baseline at the pretrained encoder LR"),
    ("pretrained", "QualiCLIP Pretrain"),
)
LABELS = dict(MODELS)
# (minuend, subtrahend, what differs): the first isolates the effect of pretraining.
COMPARISONS = (
    ("pretrained", "baseline_matched_lr", "initialisation only: **the pretraining effect**"),
    ("baseline_matched_lr", "baseline", "encoder learning rate only"),
    ("pretrained", "baseline", "both (the original comparison)"),
)
CROSS_NAMES = (("spaq", "SPAQ"), ("kadid-10k", "KADID-10K"), ("agiqa-3k", "AGIQA-3K"), ("livec", "LIVE-C"))
SEED_DIR = re.compile(r"seed_(\d+)")
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


# ----------------------------------------------------------------------------- statistics over seeds

def seed_stats(values):
    """{mean, std (sample, ddof 1; None for one value), median, n, values} of per-seed numbers."""
    values = [float(v) for v in values]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "median": float(np.median(values)), "n": len(values),
            "values": values}


def format_stat(stat, signed=False, median=False):
    """'mean ± std'; with ``median`` (HyperIQA's protocol) 'median (mean ± std)'."""
    if stat is None:
        return "n/a"
    number = "{:+.4f}" if signed else "{:.4f}"
    text = number.format(stat["mean"])
    if stat["std"] is None:
        return text
    text = f"{text} ± {stat['std']:.4f}"
    return f"{number.format(stat['median'])} (mean {text})" if median else text


def pair(block, signed=False, median=False):
    """'SRCC / PLCC' of a {metric: stat} block."""
    if not block:
        return "n/a"
    return f"{format_stat(block['srcc'], signed, median)} / {format_stat(block['plcc'], signed, median)}"


def metric_stats(blocks, keys=("srcc", "plcc")):
    """Per-seed metric blocks -> {metric: seed_stats}; None when any seed lacks the block."""
    if not blocks or any(b is None for b in blocks):
        return None
    return {k: seed_stats([b[k] for b in blocks]) for k in keys}


def paired_difference(first, second, keys=("srcc", "plcc")):
    """Per-seed differences first - second of two lists of metric blocks -> {metric: seed_stats}."""
    if not first or not second or any(b is None for b in (*first, *second)):
        return None
    return {k: seed_stats([a[k] - b[k] for a, b in zip(first, second)]) for k in keys}


# ----------------------------------------------------------------------------- collecting runs

def model_seeds(results_dir, model):
    folder = os.path.join(results_dir, model)
    seeds = sorted(int(m.group(1)) for m in map(SEED_DIR.fullmatch, os.listdir(folder) if os.path.isdir(folder) else [])
                   if m)
    if not seeds:
        raise UserError(f"'{folder}' holds no seed_<n>/ fine-tune; did that pipeline step finish?")
    return seeds


def cross_results(cross, run_dir):
    """Entry of cross_dataset.json belonging to ``<run_dir>/best.pt`` (keys are checkpoint paths)."""
    target = os.path.realpath(os.path.join(run_dir, "best.pt"))
    for checkpoint, per_dataset in (cross or {}).items():
        if os.path.realpath(checkpoint) == target:
            return per_dataset
    return {}


def encoder_lr(args):
    """The encoder learning rate a train_swin.py run used (as its param_groups chose it)."""
    matched = args.get("pretrained_encoder") or args.get("match_pretrained_lr")
    return args.get("lr_encoder_pretrained") if matched else args.get("lr")


def used_random_anchors(pretrain_args):
    """True when Stage 1's --text_features file is tools/make_text_features.py's random stand-in."""
    path = pretrain_args.get("text_features")
    if not path or not os.path.isfile(path):
        return False
    anchors = runtime.safe_load(path, "--text_features")
    return isinstance(anchors, dict) and bool(anchors.get("random"))


def collect_model(results_dir, model, seeds, cross, timings):
    runs = []
    for seed in seeds:
        run_dir = os.path.join(results_dir, model, f"seed_{seed}")
        results = read_json(os.path.join(run_dir, "results.json"))
        args = read_json(os.path.join(run_dir, "args.json"), required=False) or {}
        runs.append({"seed": seed, "dir": run_dir, "results": results, "args": args,
                     "cross": cross_results(cross, run_dir), "time_s": timings.get(f"{model}_seed{seed}")})
    args = runs[0]["args"]
    times = [r["time_s"] for r in runs if r["time_s"] is not None]
    names = sorted({name for r in runs for name in r["cross"]})
    return {
        "seeds": seeds,
        "run_dirs": [r["dir"] for r in runs],
        "init": "Stage-1 encoder" if args.get("pretrained_encoder") else
                ("ImageNet" if args.get("imagenet_pretrained", True) else "random"),
        "encoder_lr": encoder_lr(args),
        "head_lr": args["lr"] * args["lr_ratio"] if "lr" in args and "lr_ratio" in args else None,
        "protocol": args.get("protocol", "ours"),
        "protocol_details": runs[0]["results"].get("protocol"),
        "split_seeds": [r["args"].get("split_seed") for r in runs],
        "koniq_test": metric_stats([r["results"]["test"] for r in runs], ("srcc", "plcc", "plcc_logistic", "krcc")),
        "koniq_test_last": metric_stats([r["results"].get("test_last") for r in runs]),
        "val": metric_stats([r["results"].get("val") for r in runs]),
        "best_epoch": [r["results"].get("best_epoch") for r in runs],
        "finetune_time_s": float(np.mean(times)) if times else None,
        "cross_dataset": {name: metric_stats([r["cross"].get(name) for r in runs]) for name in names},
        "per_seed": [{"seed": r["seed"], "koniq_test": r["results"]["test"], "cross_dataset": r["cross"]}
                     for r in runs],
    }


def collect_pretrain(results_dir, seeds, timings):
    """Stage 1: one run (``pretrain/``) or, under --protocol hyperiqa, one per round (``pretrain/seed_<s>/``).

    One run keeps its own blocks; several give {metric: seed_stats} and the mean level ranking and time."""
    folder = os.path.join(results_dir, "pretrain")
    if os.path.isfile(os.path.join(folder, "results.json")) or not os.path.isdir(os.path.join(folder, f"seed_{seeds[0]}")):
        results = read_json(os.path.join(folder, "results.json"))
        args = read_json(os.path.join(folder, "args.json"), required=False) or {}
        return {"zero_shot_val": results.get("zero_shot_val"),
                "level_ranking_accuracy": results.get("level_ranking_accuracy"),
                "time_s": timings.get("pretrain"), "random_anchors": used_random_anchors(args),
                "split_seed": args.get("split_seed")}
    runs = []
    for seed in seeds:
        run_dir = os.path.join(folder, f"seed_{seed}")
        runs.append({"seed": seed, "results": read_json(os.path.join(run_dir, "results.json")),
                     "args": read_json(os.path.join(run_dir, "args.json"), required=False) or {},
                     "time_s": timings.get(f"pretrain_seed{seed}")})
    rankings = [r["results"].get("level_ranking_accuracy") for r in runs]
    times = [r["time_s"] for r in runs if r["time_s"] is not None]
    return {
        "per_round": [{"seed": r["seed"], "split_seed": r["args"].get("split_seed"),
                       "zero_shot_val": r["results"].get("zero_shot_val"),
                       "level_ranking_accuracy": r["results"].get("level_ranking_accuracy"), "time_s": r["time_s"]}
                      for r in runs],
        "zero_shot_val": metric_stats([r["results"].get("zero_shot_val") for r in runs]),
        "level_ranking_accuracy": ({name: float(np.mean([r[name] for r in rankings])) for name in rankings[0]}
                                   if all(rankings) else None),
        "time_s": float(np.mean(times)) if times else None,
        "random_anchors": used_random_anchors(runs[0]["args"]),
        "split_seed": [r["args"].get("split_seed") for r in runs],
    }


def collect(results_dir):
    timings = read_timings(os.path.join(results_dir, "timings.tsv"))
    cross = read_json(os.path.join(results_dir, "cross_dataset.json"), required=False)
    seeds = {model: model_seeds(results_dir, model) for model, _ in MODELS}
    if len({tuple(s) for s in seeds.values()}) > 1:
        raise UserError(f"the models of '{results_dir}' were fine-tuned with different seeds ({seeds}); "
                        f"rerun the missing fine-tunes")
    models = {model: collect_model(results_dir, model, seeds[model], cross, timings) for model, _ in MODELS}
    protocols = {m["protocol"] for m in models.values()}
    if len(protocols) > 1:
        raise UserError(f"the models of '{results_dir}' were fine-tuned under different protocols "
                        f"({', '.join(sorted(protocols))}); their numbers are not comparable, rerun them under one")
    pretrain = collect_pretrain(results_dir, seeds["baseline"], timings)
    by_seed = {model: [{"test": r["koniq_test"], **r["cross_dataset"]} for r in models[model]["per_seed"]]
               for model in models}
    differences = {}
    for first, second, what in COMPARISONS:
        names = ["test", *sorted(set(models[first]["cross_dataset"]) & set(models[second]["cross_dataset"]))]
        differences[f"{first}-{second}"] = {
            "what": what,
            **{name: paired_difference([b.get(name) for b in by_seed[first]], [b.get(name) for b in by_seed[second]])
               for name in names},
        }
    return {
        "seeds": seeds["baseline"],
        "protocol": protocols.pop(),
        "split_seed": pretrain.pop("split_seed"),
        "pretrain": pretrain,
        "models": models,
        "differences": differences,
    }


# ----------------------------------------------------------------------------- report

def protocol_lines(summary):
    seeds = summary["seeds"]
    hyperiqa = summary["protocol"] == "hyperiqa"
    spread = ("mean ± sample standard deviation (ddof 1) over the seeds" if len(seeds) > 1
              else "one seed, so no spread is available: differences smaller than the seed-to-seed variation of "
                   "this setting cannot be told from noise (rerun with `--seeds N`)")
    if hyperiqa and len(seeds) > 1:
        spread = "median over the rounds, with (mean ± sample standard deviation, ddof 1) beside it"
    if not hyperiqa:
        return [f"Protocol: ours. KonIQ-10k split seed {summary['split_seed']}; the epoch was selected on the "
                f"validation split and the test split was never used to choose.",
                f"Fine-tune seeds: {', '.join(map(str, seeds))} ({len(seeds)}); every number is the {spread}.", ""]
    details = summary["models"]["baseline"]["protocol_details"] or {}
    crops = (f"{details['train_patch_num']} random training crops, {details['test_patch_num']} {details['test_crops']} "
             f"test crops averaged, resize {details['resize']}, label {details['label']} ({details['targets']}); "
             if details else "")
    split_seeds = summary["models"]["baseline"]["split_seeds"]
    return [f"Protocol: hyperiqa (HyperIQA's: {crops}each seed is one round with its own random 80/20 KonIQ-10k "
            f"split, split seeds {', '.join(map(str, split_seeds))}); the epoch was selected on a validation part "
            f"carved from each round's 80% and the test part was never used to choose.",
            f"Fine-tune seeds (rounds): {', '.join(map(str, seeds))} ({len(seeds)}); every number is the {spread}.",
            ""]


def stage1_lines(summary):
    """Stage 1's zero-shot and level-ranking lines; under hyperiqa Stage 1 ran once per round."""
    pretrain = summary["pretrain"]
    per_round = "per_round" in pretrain
    lines = []
    if pretrain["zero_shot_val"]:
        if per_round:
            lines.append(f"Stage 1 (one run per round on its training part, {format_duration(pretrain['time_s'])} "
                         f"each on average): zero-shot SRCC/PLCC of the encoder on each round's validation part: "
                         f"{pair(pretrain['zero_shot_val'], median=True)}")
        else:
            lines.append(f"Stage 1 ({format_duration(pretrain['time_s'])}): zero-shot SRCC/PLCC of the encoder "
                         f"on the KonIQ-10k validation split: {pretrain['zero_shot_val']['srcc']:.4f} / "
                         f"{pretrain['zero_shot_val']['plcc']:.4f}")
    ranking = pretrain["level_ranking_accuracy"]
    if ranking:
        cells = ", ".join(f"{name} {value:.3f}" for name, value in ranking.items() if name != "overall")
        what = ("mean over rounds (0.5 = chance)" if per_round else
                "(fraction of degradation-level pairs the zero-shot score orders correctly; 0.5 = chance)")
        separator = ", " if per_round else " "
        lines.append(f"Stage 1 level-ranking accuracy on held-out clean images{separator}{what}: "
                     f"overall {ranking['overall']:.3f} ({cells})")
    return lines + [""] if lines else []


def render_markdown(summary, demo):
    lines = ["# QualiCLIP pretraining experiment", ""]
    if demo:
        lines += [DEMO_NOTE, ""]
    if summary["pretrain"]["random_anchors"]:
        lines += [RANDOM_ANCHORS_NOTE, ""]
    lines += protocol_lines(summary) + stage1_lines(summary)
    median = summary["protocol"] == "hyperiqa"
    lines += ["## Performance comparison", "",
              "| Model | init | encoder / head LR | KonIQ-10k test (SRCC/PLCC) | best epoch (val) | Training time |",
              "|---|---|---|---|---|---|"]
    pretrain_time = summary["pretrain"]["time_s"]
    for key, label in MODELS:
        m = summary["models"][key]
        time_text = format_duration(m["finetune_time_s"])
        if key == "pretrained" and pretrain_time is not None and m["finetune_time_s"] is not None:
            time_text = (f"{format_duration(pretrain_time)} + {time_text} = "
                         f"{format_duration(pretrain_time + m['finetune_time_s'])}")
        lrs = f"{m['encoder_lr']:g} / {m['head_lr']:g}" if m["head_lr"] is not None else "n/a"
        epochs = ", ".join(str(e) for e in m["best_epoch"])
        lines.append(f"| {label} | {m['init']} | {lrs} | {pair(m['koniq_test'], median=median)} | {epochs} | "
                     f"{time_text} |")

    present = [(k, label) for k, label in CROSS_NAMES
               if any(k in summary["models"][m]["cross_dataset"] for m, _ in MODELS)]
    lines += ["", "## What pretraining changes (differences, paired by seed; SRCC/PLCC)", "",
              "| Comparison | what differs | " + " | ".join(["KonIQ-10k test", *(label for _, label in present)]) + " |",
              "|---|---|---|" + "---|" * len(present)]
    for first, second, what in COMPARISONS:
        diff = summary["differences"][f"{first}-{second}"]
        cells = [pair(diff.get(k), signed=True, median=median) for k in ("test", *(k for k, _ in present))]
        lines.append(f"| {LABELS[first]} − {LABELS[second]} | {what} | " + " | ".join(cells) + " |")

    lines += ["", "## Cross-dataset generalization (trained on KonIQ-10k; SRCC/PLCC)", ""]
    if present:
        lines += ["| Model | " + " | ".join(label for _, label in present) + " |",
                  "|---|" + "---|" * len(present)]
        for key, label in MODELS:
            cells = [pair(summary["models"][key]["cross_dataset"].get(k), median=median) for k, _ in present]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    else:
        lines.append("No cross-dataset roots were found, so nothing was evaluated.")
    lines += ["", "Plots: `curves.png` (every fine-tune), `scatter_koniq_test.png` (first seed).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def plot_curves(summary, path):
    fig, (ax_loss, ax_srcc) = plt.subplots(1, 2, figsize=(11, 4))
    for (key, label), colour in zip(MODELS, ("tab:blue", "tab:orange", "tab:green")):
        for k, run_dir in enumerate(summary["models"][key]["run_dirs"]):
            log_path = os.path.join(run_dir, "log.jsonl")
            if not os.path.isfile(log_path):
                continue
            records = runtime.read_jsonl(log_path)
            epochs = [r["epoch"] for r in records]
            name = label if k == 0 else None
            ax_loss.plot(epochs, [r.get("train_loss") for r in records], marker="o", color=colour, label=name)
            ax_srcc.plot(epochs, [r["val"]["srcc"] for r in records], marker="o", color=colour, label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Fine-tuning loss")
    ax_srcc.set(xlabel="epoch", ylabel="SRCC", title="KonIQ-10k validation SRCC")
    for ax in (ax_loss, ax_srcc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_predictions(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(r["pred"]) for r in rows], [float(r["mos"]) for r in rows]


def plot_test_scatter(summary, path):
    fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], MODELS):
        model = summary["models"][key]
        pred, mos = read_predictions(os.path.join(model["run_dirs"][0], "predictions_test.csv"))
        test = model["per_seed"][0]["koniq_test"]
        ax.scatter(mos, pred, s=10, alpha=0.6)
        ax.set(xlabel="MOS", ylabel="prediction (on the MOS scale)",
               title=f"{label}, seed {model['seeds'][0]}\nKonIQ-10k test SRCC/PLCC "
                     f"{test['srcc']:.4f} / {test['plcc']:.4f}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    if not os.path.isdir(args.results_dir):
        raise UserError(f"'{args.results_dir}' is not a results directory of run_qualiclip_experiments.sh")
    summary = collect(args.results_dir)
    summary["demo_data"] = args.demo
    plot_curves(summary, os.path.join(args.results_dir, "curves.png"))
    plot_test_scatter(summary, os.path.join(args.results_dir, "scatter_koniq_test.png"))
    runtime.atomic_write_json(os.path.join(args.results_dir, "summary.json"), summary)
    runtime.atomic_write_text(os.path.join(args.results_dir, "summary.md"), render_markdown(summary, args.demo))
    print(f"summary written to {os.path.join(args.results_dir, 'summary.md')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Summarise a run_qualiclip_experiments.sh results directory")
    parser.add_argument("results_dir")
    parser.add_argument("--demo", action="store_true", help="mark every table as made from synthetic demo data")
    runtime.run_cli(main, parser.parse_args())
