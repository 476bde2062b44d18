"""run_ablation.py: grid parsing and expansion, the table and main effects against numpy, and end to end
with Swin-nano on generated images (numbers equal the runs' own files, skip on rerun, restart of killed
cells, another grid refused, a failing step named with its log)."""
import csv
import json
import os

import numpy as np
import pytest

import run_ablation
from iqa.runtime import UserError
from tests.helpers import ROOT, assert_user_error, run_cli, write_small_train_split

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def grid(**changes):
    base = {
        "data_root": "koniq-10k",
        "cross_datasets": {"spaq": "spaq"},
        "seeds": [0, 1],
        "pretrain": {"model_size": "nano", "epochs": 1},
        "finetune": {"model_size": "nano", "epochs": 1, "attention_fusion": True, "no_multiscale": True},
        "factors": {"pretrain": {"distortion_types": [["blur", "jpeg"], ["noise"]],
                                 "loss_type": {"simple": "simplified", "full": "full"}},
                    "finetune": {"lr_encoder_pretrained": [1e-6, 5e-6]}},
    }
    base.update(changes)
    return base


def parsed(**changes):
    return run_ablation.parse_grid(grid(**changes), "grid.json")


# ----------------------------------------------------------------------------- grid

def test_grid_expands_into_every_combination_with_one_baseline_per_stage2_setting(tmp_path):
    spec = parsed()
    cells, baselines = run_ablation.expand(spec)
    assert len(cells) == 2 * 2 * 2 and len(baselines) == 2
    assert cells[0]["name"] == "distortion_types-blur+jpeg__loss_type-simple__lr_encoder_pretrained-1e-06"
    assert cells[-1]["name"] == "distortion_types-noise__loss_type-full__lr_encoder_pretrained-5e-06"
    assert len({c["name"] for c in cells}) == 8
    assert [b["name"] for b in baselines] == ["baseline__lr_encoder_pretrained-1e-06",
                                              "baseline__lr_encoder_pretrained-5e-06"]
    for cell in cells:
        assert cell["baseline"] == f"baseline__lr_encoder_pretrained-{cell['labels']['lr_encoder_pretrained']}"
    cell = cells[5]  # noise, simple, 5e-6
    assert cell["values"] == {"pretrain": {"distortion_types": ["noise"], "loss_type": "simplified"},
                              "finetune": {"lr_encoder_pretrained": 5e-6}}
    assert cell["stage1"] == cells[4]["stage1"] == "distortion_types-noise__loss_type-simple" != cells[6]["stage1"]
    pretrain, finetune, cross = run_ablation.steps(spec, cell, str(tmp_path), 1)
    assert pretrain[0] == "pretrain" and pretrain[1] == "pretrain_qualiclip.py"
    args = run_ablation.parse_checked("pretrain", pretrain[2], "grid.json")
    assert (args.distortion_types, args.loss_type, args.seed, args.epochs, args.model_size) == \
        (["noise"], "simplified", 1, 1, "nano")
    assert args.save_dir == str(tmp_path / "stage1" / cell["stage1"] / "seed_1" / "pretrain")
    assert pretrain[5] == str(tmp_path / "stage1" / cell["stage1"] / "seed_1" / "logs" / "pretrain.log")
    args = run_ablation.parse_checked("finetune", finetune[2], "grid.json")
    assert args.lr_encoder_pretrained == 5e-6 and args.pretrained_encoder == [run_ablation.ENCODER_PLACEHOLDER]
    assert args.attention_fusion and not args.use_multiscale and not args.match_pretrained_lr and args.seed == 1
    args = run_ablation.parse_checked("cross_dataset", cross[2], "grid.json")
    assert args.checkpoint == [str(tmp_path / "cells" / cell["name"] / "seed_1" / "finetune" / "best.pt")]
    assert args.datasets == ["spaq=spaq"]
    baseline_steps = run_ablation.steps(spec, baselines[1], str(tmp_path), 0)
    assert [s[0] for s in baseline_steps] == ["finetune", "cross_dataset"]
    args = run_ablation.parse_checked("finetune", baseline_steps[0][2], "grid.json")
    assert args.match_pretrained_lr and args.pretrained_encoder is None and args.lr_encoder_pretrained == 5e-6
    run_ablation.check_commands(spec, [*baselines, *cells], str(tmp_path))


def test_flag_words_follow_the_value_types():
    assert run_ablation.flag_argv({"a": True, "b": False, "c": None, "d": [1, "x"], "e": 0.5, "f": "s"}) == \
        ["--a", "--d", "1", "x", "--e", "0.5", "--f", "s"]


@pytest.mark.parametrize("changes, fragment", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"seeds": [0, 0]}, "'seeds' must be a list of distinct"),
    ({"seeds": []}, "'seeds' must be a list of distinct"),
    ({"pretrain": {"seed": 3}}, "'pretrain' sets --seed"),
    ({"finetune": {"output_dir": "x"}}, "'finetune' sets --output_dir"),
    ({"factors": {"pretrain": {"lr": [1e-4]}, "finetune": {"lr": [1e-5]}}}, "a factor of both stages"),
    ({"factors": {"pretrain": {"lr": [1e-4, 1e-4]}}}, "lists a level twice"),
    ({"factors": {"pretrain": {"lr": []}}}, "has no levels"),
    ({"factors": {"pretrain": {"lr": {"a b": 1e-4}}}}, "level name 'a b'"),
    ({"factors": {}}, "names no flag"),
    ({"factors": {"stage3": {"lr": [1]}}}, "'factors' must be an object"),
    ({"factors": {"finetune": {"epochs": [1, 2]}}}, "both a base flag of 'finetune' and a factor"),
    ({"cross_datasets": {"nope": "x"}}, "dataset 'nope' is unknown"),
])
def test_bad_grids_are_refused_with_what_to_fix(changes, fragment):
    with pytest.raises(UserError) as err:
        parsed(**changes)
    assert fragment in str(err.value)


@pytest.mark.parametrize("changes, fragment", [
    ({"pretrain": {"no_such_flag": 1}}, "pretrain_qualiclip.py rejects its flags (unrecognized arguments: "
                                        "--no_such_flag 1)"),
    ({"factors": {"pretrain": {"loss_type": ["simplified", "hinge"]}}}, "invalid choice: 'hinge'"),
    ({"finetune": {"protocol": "hyperiqa"}}, "would run 10 rounds"),
])
def test_flags_the_scripts_reject_are_refused_before_anything_runs(tmp_path, changes, fragment):
    spec = parsed(**changes)
    cells, baselines = run_ablation.expand(spec)
    with pytest.raises(UserError) as err:
        run_ablation.check_commands(spec, [*baselines, *cells], str(tmp_path))
    assert fragment in str(err.value)


def test_yaml_grid_reads_like_the_json_one(tmp_path):
    yaml = pytest.importorskip("yaml")
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid()))
    (tmp_path / "g.json").write_text(json.dumps(grid()))
    assert run_ablation.load_grid(str(tmp_path / "g.yaml")) == run_ablation.load_grid(str(tmp_path / "g.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="is not valid JSON"):
        run_ablation.load_grid(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("name", ["demo.json", "koniq_base.json", "koniq_degradations.json"])
def test_shipped_grids_parse_and_their_commands_are_accepted(tmp_path, name):
    path = os.path.join(ROOT, "ablations", name)
    spec = run_ablation.parse_grid(run_ablation.load_grid(path), path)
    cells, baselines = run_ablation.expand(spec)
    run_ablation.check_commands(spec, [*baselines, *cells], str(tmp_path))
    assert cells and baselines


def test_dry_run_lists_every_command_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    args = run_ablation.get_args_parser().parse_args(["--demo", "--dry_run", "--output", str(out)])
    assert run_ablation.main(args) is None
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"2 cells x 2 seeds, 1 shared baseline(s); output {out}")
    assert [line.split(":")[0] for line in lines[1:]] == [
        "baseline finetune", "baseline cross_dataset",
        *(f"distortion_types-{c} {step}" for c in ("blur+jpeg+noise", "blur+noise")
          for step in ("pretrain", "finetune", "cross_dataset"))]
    assert "--distortion_types blur noise --data_root demo_data/koniq-10k" in lines[6]
    assert not out.exists()
    with pytest.raises(UserError, match="pass either --grid FILE or --demo"):
        run_ablation.main(run_ablation.get_args_parser().parse_args([]))


def test_dry_run_lists_a_shared_stage1_run_once(tmp_path, capsys):
    grid_path = os.path.join(ROOT, "ablations", "koniq_base.json")
    run_ablation.main(run_ablation.get_args_parser().parse_args(["--grid", grid_path, "--dry_run", "--output",
                                                                 str(tmp_path / "out")]))
    steps = [line.split(":")[0].rsplit(" ", 1)[1] for line in capsys.readouterr().out.splitlines()[1:]]
    # 3 distortion sets x 2 Stage-1 epochs = 6 Stage-1 settings; x 2 encoder LRs = 12 cells; 2 baselines
    assert (steps.count("pretrain"), steps.count("finetune"), steps.count("cross_dataset")) == (6, 14, 14)


# ----------------------------------------------------------------------------- table

def unit_results(name, kind, levels, baseline, values):
    """A unit's results.json with per-seed (koniq srcc, koniq plcc, spaq srcc) ``values``."""
    return {"name": name, "kind": kind, "levels": levels, "baseline": baseline,
            "runs": [{"seed": s, "koniq_test": {"srcc": a, "plcc": b}, "cross_dataset": {"spaq": {"srcc": c}}}
                     for s, (a, b, c) in enumerate(values)]}


def test_table_and_main_effects_against_numpy():
    spec = run_ablation.parse_grid(grid(pretrain={}, factors={"pretrain": {"epochs": [1, 2], "lr": [1e-4, 2e-4]}}),
                                   "g.json")
    rng = np.random.default_rng(0)
    numbers = {}
    cells = []
    for epochs in ("1", "2"):
        for lr in ("0.0001", "0.0002"):
            numbers[epochs, lr] = rng.uniform(0.3, 0.9, size=(2, 3))
            cells.append(unit_results(f"epochs-{epochs}__lr-{lr}", "cell", {"epochs": epochs, "lr": lr}, "baseline",
                                      numbers[epochs, lr]))
    base = rng.uniform(0.3, 0.9, size=(2, 3))
    rows = run_ablation.build_table(spec, cells, [unit_results("baseline", "baseline", {}, None, base)])
    keys = ["koniq_srcc", "koniq_plcc", "spaq_srcc"]
    for row, cell in zip(rows, cells):
        values = numbers[cell["levels"]["epochs"], cell["levels"]["lr"]]
        for k, key in enumerate(keys):
            assert row["stats"][key]["mean"] == pytest.approx(values[:, k].mean())
            assert row["stats"][key]["std"] == pytest.approx(values[:, k].std(ddof=1))
            assert row["difference"][key]["mean"] == pytest.approx((values[:, k] - base[:, k]).mean())
            assert row["difference"][key]["std"] == pytest.approx((values[:, k] - base[:, k]).std(ddof=1))
    assert rows[-1]["kind"] == "baseline" and rows[-1]["difference"] is None
    assert rows[-1]["stats"]["spaq_srcc"]["mean"] == pytest.approx(base[:, 2].mean())
    effects = run_ablation.main_effects(spec, rows)
    for epochs in ("1", "2"):
        expected = np.mean([numbers[epochs, lr][:, 0].mean() for lr in ("0.0001", "0.0002")])
        assert effects["epochs"][epochs]["koniq_srcc"] == pytest.approx(expected)
    expected = np.mean([(numbers[e, "0.0002"][:, 2] - base[:, 2]).mean() for e in ("1", "2")])
    assert effects["lr"]["0.0002"]["delta_spaq_srcc"] == pytest.approx(expected)
    table = list(csv.DictReader(run_ablation.render_csv(spec, rows).splitlines()))
    assert [r["cell"] for r in table] == [r["name"] for r in rows]
    assert float(table[1]["koniq_plcc_std"]) == pytest.approx(numbers["1", "0.0002"][:, 1].std(ddof=1))
    assert float(table[3]["delta_spaq_srcc_mean"]) == pytest.approx((numbers["2", "0.0002"][:, 2] - base[:, 2]).mean())
    assert table[4]["delta_koniq_srcc_mean"] == "" and table[4]["epochs"] == ""
    markdown = run_ablation.render_markdown(spec, rows)
    value = numbers["1", "0.0001"][:, 0]
    assert f"| epochs-1__lr-0.0001 | 1 | 0.0001 | {value.mean():.4f} ± {value.std(ddof=1):.4f} |" in markdown


# ----------------------------------------------------------------------------- end to end

def tiny_grid(demo_root, text_features_file, split_file=None, **changes):
    """One cell (Stage 1 on noise) and its baseline; with ``split_file`` both stages train on its images."""
    split = {"split_file": str(split_file)} if split_file else {}
    spec = {
        "data_root": str(demo_root / "koniq-10k"),
        "cross_datasets": {"spaq": str(demo_root / "spaq")},
        "seeds": [0],
        "pretrain": {"model_size": "nano", "no_imagenet_pretrained": True, "epochs": 1, "batch_size": 4,
                     "crop_size": 64, "num_levels": 2, "resize": 96, "num_workers": 0, "eval_patch_num": 1,
                     "level_eval_images": 4, "text_features": str(text_features_file), **split},
        "finetune": {"model_size": "nano", "no_imagenet_pretrained": True, "epochs": 1, "batch_size": 8,
                     "train_patch_num": 1, "test_patch_num": 1, "num_workers": 0, "lr_encoder_pretrained": 1e-5,
                     **split},
        "cross_dataset": {"test_patch_num": 1, "num_workers": 0},
        "factors": {"pretrain": {"distortion_types": [["noise"]]}},
    }
    spec.update(changes)
    return spec


def write_grid(path, spec):
    path.write_text(json.dumps(spec))
    return path


def run_files(out):
    """{path: mtime} of every file of the runs (not the table written at the end)."""
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for folder in ("stage1", "cells", "baselines") for d, _, files in os.walk(out / folder) for f in files}


def check_table_against_runs(out, cells):
    """ablation.json's numbers recomputed from each run's results.json and cross_dataset.json."""
    table = json.loads((out / "ablation.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert set(rows) == {*cells, "baseline"}

    def own_numbers(unit):
        seed_dir = out / unit / "seed_0"
        test = json.loads((seed_dir / "finetune" / "results.json").read_text())["test"]
        cross = json.loads((seed_dir / "cross_dataset.json").read_text())
        (spaq,) = [per_dataset["spaq"] for ckpt, per_dataset in cross.items()
                   if os.path.samefile(ckpt, seed_dir / "finetune" / "best.pt")]
        return np.array([test["srcc"], test["plcc"], spaq["srcc"]])

    base = own_numbers("baselines/baseline")
    for name in cells:
        own = own_numbers(f"cells/{name}")
        row = rows[name]
        assert [row["stats"][k]["mean"] for k in ("koniq_srcc", "koniq_plcc", "spaq_srcc")] == pytest.approx(own)
        assert row["stats"]["koniq_srcc"]["std"] is None  # one seed
        assert [row["difference"][k]["mean"] for k in ("koniq_srcc", "koniq_plcc", "spaq_srcc")] == \
            pytest.approx(own - base)
    assert table["main_effects"]["distortion_types"]["noise"]["koniq_srcc"] == pytest.approx(
        own_numbers("cells/distortion_types-noise")[0])
    markdown = (out / "ablation.md").read_text()
    for name in cells:
        own = own_numbers(f"cells/{name}")
        assert f"| {name} | {name.split('-', 1)[1]} | {own[0]:.4f} | {own[1]:.4f} | {own[2]:.4f} | " \
               f"{own[0] - base[0]:+.4f} |" in markdown
    with open(out / "ablation.csv", newline="") as f:
        csv_rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["baseline"]["spaq_srcc_mean"]) == pytest.approx(base[2])
    assert (out / "main_effects.png").read_bytes()[:8] == PNG_MAGIC


def log_commands(path):
    return [line for line in path.read_text().splitlines() if line.startswith("==> ")]


@pytest.mark.slow
def test_ablation_end_to_end_skips_finished_cells_restarts_killed_ones_and_refuses_another_grid(
        tmp_path, demo_root, text_features_file):
    # Four training images (one step per run of either stage): the runs' own numbers are what is checked.
    split_file = tmp_path / "split.json"
    write_small_train_split(demo_root / "koniq-10k", split_file, n_train=4)
    name = "distortion_types-noise"
    grid_path = write_grid(tmp_path / "grid.json", tiny_grid(demo_root, text_features_file, split_file))
    out = tmp_path / "ablation"
    first = run_cli("run_ablation.py", "--grid", grid_path, "--output", out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert json.loads((out / "grid.json").read_text()) == json.loads(grid_path.read_text())
    cell, seed_dir, stage1_dir = out / "cells" / name, out / "cells" / name / "seed_0", out / "stage1" / name / "seed_0"
    assert set(os.listdir(seed_dir / "logs")) == {"finetune.log", "cross_dataset.log"}
    assert os.listdir(stage1_dir / "logs") == ["pretrain.log"]
    finetune_args = json.loads((seed_dir / "finetune" / "args.json").read_text())
    assert os.path.samefile(finetune_args["pretrained_encoder"],
                            stage1_dir / "pretrain" / "swin_nano_qualiclip_pretrained.pkl")
    pretrain_args = json.loads((stage1_dir / "pretrain" / "args.json").read_text())
    assert pretrain_args["distortion_types"] == ["noise"] and pretrain_args["seed"] == 0
    baseline_args = json.loads((out / "baselines" / "baseline" / "seed_0" / "finetune" / "args.json").read_text())
    assert baseline_args["match_pretrained_lr"] and baseline_args["pretrained_encoder"] is None
    check_table_against_runs(out, [name])
    steps_run = len((out / "timings.tsv").read_text().splitlines())
    assert steps_run == 3 + 2

    # A rerun runs nothing: every unit is finished.
    before = run_files(out)
    second = run_cli("run_ablation.py", "--grid", grid_path, "--output", out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("finished earlier") == 2 and "==> [baselines/baseline/seed_0/finetune] " not in \
        second.stdout
    assert run_files(out) == before
    assert len((out / "timings.tsv").read_text().splitlines()) == steps_run

    # Killed during its fine-tune (checkpoint saved, no results): the fine-tune resumes, Stage 1 is kept.
    for path in (cell / "results.json", seed_dir / "finetune" / "results.json", seed_dir / "cross_dataset.json"):
        path.unlink()
    untouched = {p: t for p, t in run_files(out).items()
                 if p.startswith(str(out / "baselines")) or p.startswith(str(out / "stage1"))}
    third = run_cli("run_ablation.py", "--grid", grid_path, "--output", out)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert {p: os.path.getmtime(p) for p in untouched} == untouched
    assert untouched
    commands = log_commands(seed_dir / "logs" / "finetune.log")
    assert len(commands) == 2 and commands[1].endswith(f"--resume {seed_dir / 'finetune'}")
    assert len((out / "timings.tsv").read_text().splitlines()) == steps_run + 2
    check_table_against_runs(out, [name])

    # Killed during Stage 1 (run directory without a checkpoint): Stage 1 starts again, and the fine-tune
    # and the cross-dataset test, which read its output, run again from scratch.
    (cell / "results.json").unlink()
    pretrain_dir = stage1_dir / "pretrain"
    for file in os.listdir(pretrain_dir):
        if file != "args.json":
            os.unlink(pretrain_dir / file)
    (pretrain_dir / "half_written").write_text("left by a kill")
    untouched = {p: t for p, t in run_files(out).items() if p.startswith(str(out / "baselines"))}
    fourth = run_cli("run_ablation.py", "--grid", grid_path, "--output", out)
    assert fourth.returncode == 0, fourth.stdout[-3000:] + fourth.stderr[-3000:]
    assert {p: os.path.getmtime(p) for p in untouched} == untouched
    assert untouched
    assert not (pretrain_dir / "half_written").exists() and (pretrain_dir / "results.json").is_file()
    commands = log_commands(stage1_dir / "logs" / "pretrain.log")
    assert len(commands) == 2 and "--resume" not in commands[1]
    commands = log_commands(seed_dir / "logs" / "finetune.log")
    assert len(commands) == 3 and "--resume" not in commands[2]
    assert len((out / "timings.tsv").read_text().splitlines()) == steps_run + 2 + 3
    check_table_against_runs(out, [name])

    # Another grid into the same directory is refused before anything runs.
    before = run_files(out)
    other = write_grid(tmp_path / "other.json", tiny_grid(demo_root, text_features_file, split_file, seeds=[0, 1]))
    result = run_cli("run_ablation.py", "--grid", other, "--output", out)
    assert_user_error(result, "holds the runs of another grid", str(other))
    assert run_files(out) == before and json.loads((out / "grid.json").read_text()) == json.loads(grid_path.read_text())


@pytest.mark.slow
def test_a_failing_step_stops_the_grid_and_names_its_log(tmp_path, demo_root, text_features_file):
    empty = tmp_path / "not_koniq"
    empty.mkdir()
    grid_path = write_grid(tmp_path / "grid.json", tiny_grid(demo_root, text_features_file, data_root=str(empty)))
    result = run_cli("run_ablation.py", "--grid", grid_path, "--output", tmp_path / "out")
    log = tmp_path / "out" / "baselines" / "baseline" / "seed_0" / "logs" / "finetune.log"
    assert_user_error(result, "step 'baselines/baseline/seed_0/finetune' failed", str(log))
    assert "error:" in log.read_text()
    assert not (tmp_path / "out" / "cells").exists() and not (tmp_path / "out" / "ablation.md").exists()
