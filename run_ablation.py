"""A resumable ablation grid over the Stage-1 settings: pretrain -> fine-tune -> evaluation per cell.

A grid file (JSON, or YAML when PyYAML is installed) names base flags for each script, the
factors (flags of ``pretrain_qualiclip.py`` or ``train_swin.py`` with their levels) and the seeds.
Every combination of factor levels is a cell; for each seed a cell runs Stage 1
(``pretrain_qualiclip.py --seed S``), fine-tunes from its encoder on KonIQ-10k
(``train_swin.py --pretrained_encoder ... --seed S``) and scores the selected weights on every
cross-dataset set (``cross_dataset_test.py``).  The controlled baselines (no pretraining,
fine-tuned at the pretrained runs' encoder LR, ``--match_pretrained_lr``) run once per distinct
Stage-2 setting and seed and are shared by the cells with that setting.

    python run_ablation.py --grid ablations/koniq_base.json --output results/ablation_koniq
    python run_ablation.py --demo            # a tiny grid on the demo data, CPU-friendly

Output directory::

    grid.json                       the grid as read; a rerun with another grid is refused
    baselines/<name>/seed_<s>/      finetune/ (train_swin.py run), cross_dataset.json, logs/
    stage1/<levels>/seed_<s>/       pretrain/, logs/: one Stage-1 run per Stage-1 setting and seed, shared
                                    by the cells that differ only in Stage-2 factors
    cells/<name>/seed_<s>/          finetune/, cross_dataset.json, logs/
    {baselines,cells}/<name>/results.json   the seeds' numbers, copied from the runs' own files
    ablation.md / .csv / .json      one table: mean ± sample std (ddof 1) over seeds, and the
                                    seed-paired difference of each cell to its baseline
    main_effects.png                each factor's levels, averaged over the other factors' levels
    timings.tsv                     wall time of every step that ran

A rerun with the same ``--output`` skips every finished cell (its results.json complete) and every
finished step; a step killed midway resumes with the script's own ``--resume`` when it saved a
checkpoint, else its directory is removed and it starts again.
"""
import argparse
import csv
import io
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from iqa import cross_dataset_args, finetune_args  # noqa: E402
from iqa.evaluation import parse_dataset_specs  # noqa: E402
from iqa.runtime import UserError, atomic_write_binary, atomic_write_json, atomic_write_text, run_cli  # noqa: E402
from qualiclip_pretrain import args as pretrain_args  # noqa: E402
from tools.summarize_experiment import (  # noqa: E402
    CROSS_NAMES, DEMO_NOTE, cross_results, format_stat, metric_stats, paired_difference, read_json,
)

REPO = os.path.dirname(os.path.abspath(__file__))
DEMO_GRID = os.path.join(REPO, "ablations", "demo.json")
DEMO_DIR = "demo_data"
GRID_KEYS = ("description", "demo_data", "data_root", "cross_datasets", "seeds", "pretrain", "finetune",
             "cross_dataset", "factors")
# The grid's sections, the script each one's flags go to, and the flags the runner sets itself.
SCRIPTS = {
    "pretrain": ("pretrain_qualiclip.py", pretrain_args.get_args_parser,
                 ("data_root", "save_dir", "resume", "seed")),
    "finetune": ("train_swin.py", finetune_args.get_args_parser,
                 ("data_root", "dataset", "output_dir", "resume", "seed", "pretrained_encoder",
                  "match_pretrained_lr")),
    "cross_dataset": ("cross_dataset_test.py", cross_dataset_args.get_args_parser,
                      ("checkpoint", "datasets", "output")),
}
FACTOR_STAGES = ("pretrain", "finetune")
LABEL = re.compile(r"[A-Za-z0-9._+-]{1,40}")
KONIQ_METRICS = (("koniq_srcc", "KonIQ-10k test SRCC"), ("koniq_plcc", "KonIQ-10k test PLCC"))
ENCODER_PLACEHOLDER = "<Stage-1 encoder .pkl>"


# ----------------------------------------------------------------------------- grid

def load_grid(path):
    """The grid file as a dict (JSON; YAML for .yaml/.yml when PyYAML is installed)."""
    if not os.path.isfile(path):
        raise UserError(f"--grid '{path}' does not exist; pass a JSON or YAML grid file (see ablations/)")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise UserError(f"--grid '{path}' is YAML but PyYAML is not installed; pip install pyyaml or "
                            f"write the grid as JSON") from None
        try:
            grid = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"--grid '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    else:
        try:
            grid = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--grid '{path}' is not valid JSON: {err}") from None
    if not isinstance(grid, dict):
        raise UserError(f"--grid '{path}' must hold one object with the keys {', '.join(GRID_KEYS)}")
    return grid


def level_label(value):
    """A level's name in cell names and tables: lists joined with '+', numbers as written by %g."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(level_label(v) for v in value)
    return str(value)


def parse_levels(where, levels):
    """A factor's levels -> {label: value}: a list (labels made from the values) or an object {label: value}."""
    if isinstance(levels, list):
        labelled = {}
        for value in levels:
            labelled.setdefault(level_label(value), value)
        if len(labelled) != len(levels):
            raise UserError(f"{where} lists a level twice; give each level once")
    elif isinstance(levels, dict):
        labelled = dict(levels)
    else:
        raise UserError(f"{where} must be a list of levels or an object {{label: value}}")
    if not labelled:
        raise UserError(f"{where} has no levels; give at least one")
    for label in labelled:
        if not LABEL.fullmatch(label):
            raise UserError(f"{where}: level name '{label}' is not 1-40 of the characters A-Z a-z 0-9 . _ + -; "
                            f"name the levels with an object {{label: value}}")
    return labelled


def flag_argv(flags):
    """{flag: value} -> command-line words: true -> --flag, false/null -> left out, a list -> --flag a b."""
    argv = []
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(f"--{flag}")
        if value is True:
            continue
        argv += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return argv


def check_section(grid_path, section, flags, reserved):
    if not isinstance(flags, dict):
        raise UserError(f"grid '{grid_path}': '{section}' must be an object {{flag: value}}")
    taken = sorted(set(flags) & set(reserved))
    if taken:
        raise UserError(f"grid '{grid_path}': '{section}' sets --{taken[0]}, which run_ablation.py sets itself "
                        f"({', '.join('--' + r for r in reserved)}); remove it")


def parse_grid(grid, grid_path):
    """Check a grid dict -> {data_root, cross_datasets, seeds, base: {section: flags}, factors: [...], ...}.

    ``factors``: [{"name": flag, "stage": pretrain|finetune, "levels": {label: value}}] in grid order."""
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise UserError(f"grid '{grid_path}': unknown key '{unknown[0]}'; the keys are {', '.join(GRID_KEYS)}")
    if not isinstance(grid.get("data_root"), str):
        raise UserError(f"grid '{grid_path}' needs \"data_root\": the KonIQ-10k folder both stages read")
    cross = grid.get("cross_datasets", {})
    if not isinstance(cross, dict):
        raise UserError(f"grid '{grid_path}': 'cross_datasets' must be an object {{name: root}}")
    parse_dataset_specs([f"{name}={root}" for name, root in cross.items()], f"grid '{grid_path}' cross_datasets")
    seeds = grid.get("seeds")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise UserError(f"grid '{grid_path}': 'seeds' must be a list of distinct whole numbers >= 0, e.g. [0, 1, 2]")
    base = {}
    for section, (_, _, reserved) in SCRIPTS.items():
        base[section] = grid.get(section, {})
        check_section(grid_path, section, base[section], reserved)
    factor_sections = grid.get("factors")
    if not isinstance(factor_sections, dict) or set(factor_sections) - set(FACTOR_STAGES):
        raise UserError(f"grid '{grid_path}': 'factors' must be an object with 'pretrain' and/or 'finetune', "
                        f"each {{flag: levels}}")
    factors = []
    for stage in FACTOR_STAGES:
        section = factor_sections.get(stage, {})
        check_section(grid_path, f"factors.{stage}", section, SCRIPTS[stage][2])
        for flag, levels in section.items():
            if flag in base[stage]:
                raise UserError(f"grid '{grid_path}': --{flag} is both a base flag of '{stage}' and a factor; "
                                f"keep it in one place")
            if any(f["name"] == flag for f in factors):
                raise UserError(f"grid '{grid_path}': --{flag} is a factor of both stages; a factor belongs to one "
                                f"script (put a shared setting in both base sections)")
            factors.append({"name": flag, "stage": stage,
                            "levels": parse_levels(f"grid '{grid_path}' factors.{stage}.{flag}", levels)})
    if not factors:
        raise UserError(f"grid '{grid_path}': 'factors' names no flag; give at least one factor with its levels")
    return {"path": grid_path, "data_root": grid["data_root"], "cross_datasets": dict(cross), "seeds": seeds,
            "base": base, "factors": factors, "demo_data": bool(grid.get("demo_data")),
            "description": grid.get("description", "")}


# ----------------------------------------------------------------------------- cells and baselines

def unit_name(prefix, factors, labels):
    return "__".join([*([prefix] if prefix else []), *(f"{f['name']}-{labels[f['name']]}" for f in factors)])


def expand(spec):
    """Every cell (a combination of factor levels) and the baselines they share (one per Stage-2 setting).

    Cells that differ only in Stage-2 factors share their Stage-1 runs (``stage1``: the Stage-1 levels)."""
    finetune_factors = [f for f in spec["factors"] if f["stage"] == "finetune"]
    pretrain_factors = [f for f in spec["factors"] if f["stage"] == "pretrain"]
    cells, baselines = [], {}
    for combo in itertools.product(*(list(f["levels"]) for f in spec["factors"])):
        labels = dict(zip((f["name"] for f in spec["factors"]), combo))
        values = {stage: {f["name"]: f["levels"][labels[f["name"]]] for f in spec["factors"] if f["stage"] == stage}
                  for stage in FACTOR_STAGES}
        baseline = unit_name("baseline", finetune_factors, labels)
        baselines.setdefault(baseline, {"name": baseline, "kind": "baseline", "labels":
                                        {f["name"]: labels[f["name"]] for f in finetune_factors},
                                        "values": {"pretrain": {}, "finetune": values["finetune"]}})
        cells.append({"name": unit_name("", spec["factors"], labels), "kind": "cell", "labels": labels,
                      "values": values, "baseline": baseline,
                      "stage1": unit_name("", pretrain_factors, labels) or "default"})
    return cells, list(baselines.values())


def unit_dir(output, unit):
    return os.path.join(output, "cells" if unit["kind"] == "cell" else "baselines", unit["name"])


def stage1_dir(output, unit, seed):
    """Where a cell's Stage-1 run of ``seed`` lives: shared by every cell with the same Stage-1 levels."""
    return os.path.join(output, "stage1", unit["stage1"], f"seed_{seed}")


def steps(spec, unit, output, seed):
    """The (name, script, argv, run directory or None, file that marks it finished, log) of one seed of a unit.

    A cell's fine-tune names its encoder by ``ENCODER_PLACEHOLDER``: the .pkl is known once Stage 1 finished."""
    base = spec["base"]
    out = []
    seed_dir = os.path.join(unit_dir(output, unit), f"seed_{seed}")
    finetune_dir = os.path.join(seed_dir, "finetune")
    finetune = [*flag_argv(base["finetune"]), *flag_argv(unit["values"]["finetune"]), "--dataset", "koniq-10k",
                "--data_root", spec["data_root"], "--seed", str(seed), "--output_dir", finetune_dir]
    if unit["kind"] == "cell":
        pretrain_dir = os.path.join(stage1_dir(output, unit, seed), "pretrain")
        out.append(("pretrain", "pretrain_qualiclip.py",
                    [*flag_argv(base["pretrain"]), *flag_argv(unit["values"]["pretrain"]), "--data_root",
                     spec["data_root"], "--seed", str(seed), "--save_dir", pretrain_dir],
                    pretrain_dir, os.path.join(pretrain_dir, "results.json"),
                    os.path.join(stage1_dir(output, unit, seed), "logs", "pretrain.log")))
        finetune += ["--pretrained_encoder", ENCODER_PLACEHOLDER]
    else:
        finetune.append("--match_pretrained_lr")
    out.append(("finetune", "train_swin.py", finetune, finetune_dir, os.path.join(finetune_dir, "results.json"),
                os.path.join(seed_dir, "logs", "finetune.log")))
    if spec["cross_datasets"]:
        cross_json = os.path.join(seed_dir, "cross_dataset.json")
        out.append(("cross_dataset", "cross_dataset_test.py",
                    [*flag_argv(base["cross_dataset"]), "--checkpoint", os.path.join(finetune_dir, "best.pt"),
                     "--datasets", *(f"{n}={r}" for n, r in spec["cross_datasets"].items()), "--output", cross_json],
                    None, cross_json, os.path.join(seed_dir, "logs", "cross_dataset.log")))
    return out


def parse_checked(section, argv, grid_path):
    """Parse ``argv`` with the script's own parser; its complaint becomes a one-line UserError."""
    script, get_parser, _ = SCRIPTS[section]
    parser = get_parser()

    def error(message):
        raise UserError(f"grid '{grid_path}': {script} rejects its flags ({message}); fix '{section}' or its factors")

    parser.error = error
    return parser.parse_args(argv)


def check_commands(spec, units, output):
    """Every command of the grid parses with its script's parser (run before anything runs, and by --dry_run)."""
    for unit in units:
        for name, _, argv, _, _, _ in steps(spec, unit, output, 0):
            args = parse_checked(name, argv, spec["path"])
            if name == "finetune":
                finetune_args.apply_protocol_defaults(args)
                if args.train_test_num != 1:
                    raise UserError(f"grid '{spec['path']}': the fine-tunes would run {args.train_test_num} rounds "
                                    f"(--train_test_num); an ablation cell reads one KonIQ test result per seed, so "
                                    f"set \"train_test_num\": 1 in 'finetune' (the seeds are the repetitions)")


def check_data(spec):
    for root in [spec["data_root"], *spec["cross_datasets"].values()]:
        if not os.path.isdir(root):
            raise UserError(f"grid '{spec['path']}': dataset folder '{root}' does not exist (paths are relative to "
                            f"the directory run_ablation.py is run from)")


# ----------------------------------------------------------------------------- running

def run_step(python, script, argv, log_path, what):
    """Run one script (output shown live and appended to its log); a failure names the log."""
    command = [python, os.path.join(REPO, script), *argv]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"==> [{what}] {shlex.join(command)}", flush=True)
    with open(log_path, "a") as log:
        log.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in process.stdout:
            log.write(line)
            sys.stdout.write(line)
        status = process.wait()
    if status != 0:
        raise UserError(f"step '{what}' failed (exit status {status}); see {log_path}")


def run_seed(spec, unit, output, seed, python):
    """One seed of a unit: its steps in order, each skipped when finished earlier.

    A step that runs makes every later step of this seed stale (it read the earlier output), so their
    outputs are removed first.  A step directory with a checkpoint (last.pt) resumes; one without is
    removed and started again.  A Stage-1 run shared with an earlier cell is found finished."""
    stale = False
    for name, script, argv, run_dir, done, log_path in steps(spec, unit, output, seed):
        what = f"{os.path.relpath(os.path.dirname(os.path.dirname(log_path)), output)}/{name}"
        if not stale and os.path.isfile(done):
            print(f"==> [{what}] finished earlier; skipped", flush=True)
            continue
        if ENCODER_PLACEHOLDER in argv:
            encoder = read_json(os.path.join(stage1_dir(output, unit, seed), "pretrain", "results.json"))["encoder"]
            argv = [encoder if word == ENCODER_PLACEHOLDER else word for word in argv]
        if run_dir is not None and os.path.isdir(run_dir):
            if not stale and os.path.isfile(os.path.join(run_dir, "last.pt")):
                argv = [*argv, "--resume", run_dir]
            else:
                shutil.rmtree(run_dir)
        elif run_dir is None and os.path.isfile(done):
            os.unlink(done)
        start = time.time()
        run_step(python, script, argv, log_path, what)
        with open(os.path.join(output, "timings.tsv"), "a") as f:
            f.write(f"{what}\t{time.time() - start:.1f}\n")
        stale = True
    return seed_record(spec, unit, output, seed)


def seed_record(spec, unit, output, seed):
    """The numbers of one seed, read from the runs' own results.json / cross_dataset.json."""
    seed_dir = os.path.join(unit_dir(output, unit), f"seed_{seed}")
    finetune_dir = os.path.join(seed_dir, "finetune")
    results = read_json(os.path.join(finetune_dir, "results.json"))
    cross = read_json(os.path.join(seed_dir, "cross_dataset.json")) if spec["cross_datasets"] else {}
    record = {"seed": seed, "koniq_test": results["test"], "cross_dataset": cross_results(cross, finetune_dir)}
    if unit["kind"] == "cell":
        pretrain = read_json(os.path.join(stage1_dir(output, unit, seed), "pretrain", "results.json"))
        record["pretrain"] = {k: pretrain[k] for k in ("zero_shot_val", "level_ranking_accuracy") if k in pretrain}
    return record


def is_complete(spec, results):
    """A unit's results.json holds every seed of the grid, each with its KonIQ test and cross-dataset numbers."""
    if not isinstance(results, dict) or [r.get("seed") for r in results.get("runs", [])] != spec["seeds"]:
        return False
    return all("srcc" in r.get("koniq_test", {}) and set(r.get("cross_dataset", {})) == set(spec["cross_datasets"])
               for r in results["runs"])


def run_unit(spec, unit, output, python):
    path = os.path.join(unit_dir(output, unit), "results.json")
    results = read_json(path, required=False)
    if is_complete(spec, results):
        print(f"==> [{unit['name']}] finished earlier ({path}); skipped", flush=True)
        return results
    results = {"name": unit["name"], "kind": unit["kind"], "levels": unit["labels"], "values": unit["values"],
               "baseline": unit.get("baseline"), "seeds": spec["seeds"],
               "runs": [run_seed(spec, unit, output, seed, python) for seed in spec["seeds"]]}
    atomic_write_json(path, results)
    return results


# ----------------------------------------------------------------------------- table

def metric_keys(spec):
    """(key, column title) of every number in the table: KonIQ test SRCC/PLCC, then each cross-dataset SRCC."""
    names = dict(CROSS_NAMES)
    return [*KONIQ_METRICS, *((f"{n}_srcc", f"{names.get(n, n)} SRCC") for n in spec["cross_datasets"])]


def seed_blocks(results):
    """Per seed {metric key: value} of a unit's results.json."""
    return [{"koniq_srcc": r["koniq_test"]["srcc"], "koniq_plcc": r["koniq_test"]["plcc"],
             **{f"{n}_srcc": block["srcc"] for n, block in r["cross_dataset"].items()}} for r in results["runs"]]


def build_table(spec, cells, baselines):
    """One row per cell, then per baseline: mean ± sample std over seeds, and each cell's paired difference."""
    keys = [k for k, _ in metric_keys(spec)]
    by_name = {b["name"]: b for b in baselines}
    rows = []
    for results in [*cells, *baselines]:
        blocks = seed_blocks(results)
        row = {"name": results["name"], "kind": results["kind"], "baseline": results["baseline"],
               "levels": results["levels"], "seeds": [r["seed"] for r in results["runs"]],
               "stats": metric_stats(blocks, keys), "difference": None}
        if results["kind"] == "cell":
            row["difference"] = paired_difference(blocks, seed_blocks(by_name[results["baseline"]]), keys)
        rows.append(row)
    return rows


def main_effects(spec, rows):
    """{factor: {level: {metric: mean over the cells at that level of their seed means}}}; ``delta_<metric>``
    the same for the cells' differences to their baselines."""
    keys = [k for k, _ in metric_keys(spec)]
    cells = [r for r in rows if r["kind"] == "cell"]
    effects = {}
    for factor in spec["factors"]:
        effects[factor["name"]] = {}
        for label in factor["levels"]:
            at_level = [r for r in cells if r["levels"][factor["name"]] == label]
            effects[factor["name"]][label] = {
                **{k: float(np.mean([r["stats"][k]["mean"] for r in at_level])) for k in keys},
                **{f"delta_{k}": float(np.mean([r["difference"][k]["mean"] for r in at_level])) for k in keys},
            }
    return effects


def render_markdown(spec, rows):
    titles = metric_keys(spec)
    factors = [f["name"] for f in spec["factors"]]
    lines = ["# Ablation over the Stage-1 settings", ""]
    if spec["demo_data"]:
        lines += [DEMO_NOTE, ""]
    if spec["description"]:
        lines += [spec["description"], ""]
    seeds = spec["seeds"]
    spread = ("mean ± sample standard deviation (ddof 1) over the seeds" if len(seeds) > 1 else
              "one seed, so no spread is available")
    lines += [f"Grid `{spec['path']}`; seeds {', '.join(map(str, seeds))}: every number is the {spread}. "
              f"Δ is a cell minus its controlled baseline (no pretraining, fine-tuned at the same encoder LR with "
              f"`--match_pretrained_lr`), paired by seed. KonIQ-10k: test split; the other datasets are scored "
              f"whole (cross-dataset). Baselines show — for the Stage-1 factors (no pretraining).", "",
              "| cell | " + " | ".join([*factors, *(t for _, t in titles), *(f"Δ {t}" for _, t in titles)]) + " |",
              "|---|" + "---|" * (len(factors) + 2 * len(titles))]
    for row in rows:
        levels = [row["levels"].get(f, "—") for f in factors]
        stats = [format_stat(row["stats"][k]) for k, _ in titles]
        diffs = [format_stat(row["difference"][k], signed=True) if row["difference"] else "—" for k, _ in titles]
        lines.append(f"| {row['name']} | " + " | ".join([*levels, *stats, *diffs]) + " |")
    lines += ["", "Main effect of each factor (mean over the other factors' levels): `main_effects.png`; "
              "the numbers in `ablation.json`.", ""]
    return "\n".join(lines)


def render_csv(spec, rows):
    keys = [k for k, _ in metric_keys(spec)]
    factors = [f["name"] for f in spec["factors"]]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["cell", "kind", "baseline", *factors, "seeds",
                     *(f"{p}{k}_{s}" for p in ("", "delta_") for k in keys for s in ("mean", "std"))])
    for row in rows:
        numbers = []
        for block in (row["stats"], row["difference"]):
            for k in keys:
                stat = (block or {}).get(k)
                numbers += ["" if stat is None else stat["mean"], "" if stat is None or stat["std"] is None
                            else stat["std"]]
        writer.writerow([row["name"], row["kind"], row["baseline"] or "", *(row["levels"].get(f, "") for f in factors),
                         " ".join(map(str, row["seeds"])), *numbers])
    return out.getvalue()


def plot_main_effects(spec, effects, path):
    """Top row: each metric's mean per level of each factor; bottom row: the same for Δ to the baseline."""
    titles = metric_keys(spec)
    factors = spec["factors"]
    fig, axes = plt.subplots(2, len(factors), figsize=(4.5 * len(factors), 7), squeeze=False)
    for column, factor in enumerate(factors):
        labels = list(factor["levels"])
        x = np.arange(len(labels))
        for row, prefix in enumerate(("", "delta_")):
            ax = axes[row][column]
            for key, title in titles:
                ax.plot(x, [effects[factor["name"]][label][prefix + key] for label in labels], marker="o", label=title)
            if prefix:
                ax.axhline(0.0, color="gray", linewidth=0.8)
            ax.set_xticks(x, labels, rotation=20, ha="right")
            ax.set(xlabel=f"{factor['stage']} --{factor['name']}",
                   ylabel="Δ to the controlled baseline" if prefix else "mean over the other factors",
                   title=f"{'Δ ' if prefix else ''}main effect of --{factor['name']}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    atomic_write_binary(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def write_outputs(spec, grid, output, cells, baselines):
    rows = build_table(spec, cells, baselines)
    effects = main_effects(spec, rows)
    markdown = render_markdown(spec, rows)
    atomic_write_text(os.path.join(output, "ablation.md"), markdown)
    atomic_write_text(os.path.join(output, "ablation.csv"), render_csv(spec, rows))
    atomic_write_json(os.path.join(output, "ablation.json"), {
        "grid": grid, "metrics": dict(metric_keys(spec)), "rows": rows, "main_effects": effects})
    plot_main_effects(spec, effects, os.path.join(output, "main_effects.png"))
    return rows, markdown


# ----------------------------------------------------------------------------- main

def check_same_grid(output, grid, grid_path):
    """Refuse an ``output`` whose grid.json is another grid (writes nothing)."""
    stored_path = os.path.join(output, "grid.json")
    stored = read_json(stored_path, required=False)
    if stored is not None and stored != json.loads(json.dumps(grid)):
        raise UserError(f"--output '{output}' holds the runs of another grid ({stored_path} differs from "
                        f"'{grid_path}'); pass a new --output, or the grid that directory was made with")


def make_demo_data(python, output):
    """The demo datasets and random text anchors the demo grid reads (kept when they exist)."""
    logs = os.path.join(output, "logs")
    run_step(python, os.path.join("tools", "make_demo_data.py"), ["--out", DEMO_DIR],
             os.path.join(logs, "make_demo_data.log"), "make_demo_data")
    run_step(python, os.path.join("tools", "make_text_features.py"),
             ["--out", os.path.join(DEMO_DIR, "text_features.pt"), "--fallback_random", "1024"],
             os.path.join(logs, "make_text_features.log"), "make_text_features")


def main(args):
    if args.demo == bool(args.grid):
        raise UserError("pass either --grid FILE or --demo")
    grid_path = DEMO_GRID if args.demo else args.grid
    grid = load_grid(grid_path)
    spec = parse_grid(grid, grid_path)
    output = args.output or os.path.join("results", f"ablation_{time.strftime('%Y%m%d_%H%M%S')}")
    cells, baselines = expand(spec)
    print(f"grid {grid_path}: {len(cells)} cells x {len(spec['seeds'])} seeds, {len(baselines)} shared "
          f"baseline(s); output {output}", flush=True)
    check_commands(spec, [*baselines, *cells], output)
    if args.dry_run:
        listed = set()  # a shared Stage-1 run is listed once
        for unit in [*baselines, *cells]:
            for name, script, argv, _, done, _ in steps(spec, unit, output, "<s>"):
                if done not in listed:
                    print(f"{unit['name']} {name}: {shlex.join([args.python, script, *argv])}")
                listed.add(done)
        return None
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"--output '{output}' is a file; pass a directory")
    check_same_grid(output, grid, grid_path)
    if args.demo:
        make_demo_data(args.python, output)
    check_data(spec)
    atomic_write_json(os.path.join(output, "grid.json"), grid)
    baseline_results = [run_unit(spec, unit, output, args.python) for unit in baselines]
    cell_results = [run_unit(spec, unit, output, args.python) for unit in cells]
    rows, markdown = write_outputs(spec, grid, output, cell_results, baseline_results)
    print(markdown)
    print(f"results directory: {output} (the same --output resumes it)")
    return rows


def get_args_parser():
    parser = argparse.ArgumentParser("Resumable ablation grid over the Stage-1 settings", add_help=True)
    parser.add_argument("--grid", default=None, help="grid file, JSON or YAML (see ablations/ and the README)")
    parser.add_argument("--demo", action="store_true",
                        help=f"the tiny grid ablations/demo.json on the demo data (built in ./{DEMO_DIR} if missing)")
    parser.add_argument("--output", default=None,
                        help="results directory (default results/ablation_<timestamp>); pass it again to resume")
    parser.add_argument("--python", default=sys.executable, help="interpreter of every step (default: this one)")
    parser.add_argument("--dry_run", action="store_true", help="print the cells and their commands; run nothing")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
