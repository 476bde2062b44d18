"""Robustness and safety of the four CLIs: bad input, interrupted runs, atomic writes, safe loading.

Every refusal must be one ``error:`` line naming the file / row / flag, a non-zero exit, no
traceback, and leave the disk exactly as it was (the whole test folder is hashed before and
after).  Refusals run the real scripts in this process (``runpy`` executes each script's own
``__main__`` block, so argument parsing and ``runtime.run_cli``'s error handling are the real
ones): a subprocess would spend ~6 s importing torch and open_clip per case.  Runs that are
killed are real subprocesses, killed with SIGKILL.
"""
import builtins
import contextlib
import csv
import hashlib
import io
import json
import os
import pickle
import runpy
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from iqa import runtime, training_run
from iqa.runtime import read_jsonl, safe_load
from models.swin_backbone import create_swin
from tests.helpers import ROOT, assert_user_error, run_cli

NANO = ("--model_size", "nano", "--no_imagenet_pretrained", "--device", "cpu", "--num_workers", "0")
STAGE1_FAST = (*NANO, "--batch_size", "2", "--crop_size", "64", "--num_levels", "3", "--eval_patch_num", "1",
               "--eval_resize", "64")
# a batch of 32 holds the demo KonIQ-10k's training split: one step per epoch
STAGE2_FAST = (*NANO, "--batch_size", "32", "--train_patch_num", "1", "--test_patch_num", "1", "--resize", "224")
METRICS = ("srcc", "plcc", "plcc_logistic", "krcc", "rmse", "n")
SCORES_CSV = "koniq10k_scores_and_distributions.csv"
SETS_CSV = "koniq10k_distributions_sets.csv"


# ----------------------------------------------------------------------------- helpers

def run_script(script, *args):
    """Run ``python <script> args`` in this process; a CompletedProcess like ``tests.helpers.run_cli``.

    Any exception other than SystemExit propagates, i.e. fails the test with its traceback.
    """
    argv = [script, *map(str, args)]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:  # --deterministic switches a process-wide mode on; keep it out of other tests
            torch.use_deterministic_algorithms(False)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def snapshot(folder):
    """{relative path: sha256 (None for folders)} of everything under ``folder``."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            state[os.path.relpath(os.path.join(dirpath, name), folder)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return state


def assert_refused_untouched(folder, script, *args, fragments):
    """The CLI stops with a one-line error containing ``fragments`` and writes nothing under ``folder``."""
    before = snapshot(folder)
    line = assert_user_error(run_script(script, *args), *map(str, fragments))
    assert snapshot(folder) == before, f"files changed although the run was refused: {line}"
    return line


def write_random_images(folder, count, size=(96, 80), seed=1):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def stage1_args(images, text_features, save_dir, epochs=2):
    return ("--image_dir", images, "--text_features", text_features, "--save_dir", save_dir, "--epochs", epochs,
            "--deterministic", *STAGE1_FAST)


def stage2_args(data_root, output_dir, epochs=2):
    return ("--dataset", "koniq-10k", "--data_root", data_root, "--output_dir", output_dir, "--epochs", epochs,
            "--deterministic", "--no_early_stopping", *STAGE2_FAST)


@pytest.fixture(scope="module")
def clean_images(tmp_path_factory):
    return write_random_images(tmp_path_factory.mktemp("clean"), count=4)


@pytest.fixture(scope="module")
def stage1_run(clean_images, text_features_file, tmp_path_factory):
    """An uninterrupted 2-epoch Stage-1 run (the reference for resume, a Stage-1 run directory)."""
    save_dir = tmp_path_factory.mktemp("stage1") / "run"
    result = run_script("pretrain_qualiclip.py", *stage1_args(clean_images, text_features_file, save_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return save_dir


@pytest.fixture(scope="module")
def stage2_run(demo_root, tmp_path_factory):
    """An uninterrupted 2-epoch Stage-2 run (the reference for resume, and checkpoints to evaluate)."""
    run_dir = tmp_path_factory.mktemp("stage2") / "run"
    result = run_script("train_swin.py", *stage2_args(demo_root / "koniq-10k", run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


# ----------------------------------------------------------------------------- 1. bad input

def first_training_image(root):
    """(file name, annotation row origin) of the first training image of a demo KonIQ copy."""
    with open(root / SETS_CSV, newline="") as f:
        name = next(row["image_name"] for row in csv.DictReader(f) if row["set"] == "training")
    with open(root / SCORES_CSV, newline="") as f:
        row_number = 2 + [row["image_name"] for row in csv.DictReader(f)].index(name)
    return name, f"{SCORES_CSV}:{row_number}"


def rewrite_scores(root, edit):
    """Apply ``edit(header, rows)`` to both KonIQ annotation files (the sets file carries MOS too)."""
    for table in (SCORES_CSV, SETS_CSV):
        with open(root / table, newline="") as f:
            rows = list(csv.reader(f))
        header, body = edit(rows[0], rows[1:])
        with open(root / table, "w", newline="") as f:
            csv.writer(f).writerows([header, *body])


def set_first_mos(value):
    def edit(header, rows):
        rows[0][header.index("MOS")] = value
        return header, rows
    return edit


def drop_mos_column(header, rows):
    k = header.index("MOS")
    return header[:k] + header[k + 1:], [row[:k] + row[k + 1:] for row in rows]


def corrupt_image(mode):
    def corrupt(root):
        name, origin = first_training_image(root)
        path = root / "512x384" / name
        if mode == "missing":
            path.unlink()
        elif mode == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif mode == "zero-byte":
            path.write_bytes(b"")
        else:  # a text file renamed .jpg
            path.write_text("image_name,MOS\nnot,an image\n")
        return [name, origin]
    return corrupt


def no_annotations(root):
    (root / SCORES_CSV).unlink()
    (root / SETS_CSV).unlink()
    return [SCORES_CSV, "not found"]


def bad_mos(value):
    def corrupt(root):
        rewrite_scores(root, set_first_mos(value))
        return [f"{SCORES_CSV}:2", "MOS", "not a finite number"]
    return corrupt


def missing_column(root):
    rewrite_scores(root, drop_mos_column)
    return [SCORES_CSV, "'MOS'"]


DATASET_MISTAKES = {
    "annotation file missing": no_annotations,
    "MOS column missing": missing_column,
    "listed image missing": corrupt_image("missing"),
    "truncated image": corrupt_image("truncated"),
    "zero-byte image": corrupt_image("zero-byte"),
    "text file named .jpg": corrupt_image("not an image"),
    "NaN MOS": bad_mos("nan"),
    "infinite MOS": bad_mos("inf"),
    "non-numeric MOS": bad_mos("good"),
}


def cli_for(script, data_root, out, stage2_run=None, text_features=None):
    """The command line of ``script`` on a KonIQ root, writing under ``out``."""
    if script == "pretrain_qualiclip.py":
        return ("--data_root", data_root, "--text_features", text_features, "--save_dir", out, *STAGE1_FAST)
    if script == "train_swin.py":
        return ("--data_root", data_root, "--output_dir", out, *STAGE2_FAST)
    return ("--checkpoint", stage2_run / "best.pt", "--datasets", f"koniq-10k={data_root}", "--output",
            out / "cross.json", "--device", "cpu", "--num_workers", "0")


@pytest.fixture
def koniq_copy(demo_root, tmp_path):
    return shutil.copytree(demo_root / "koniq-10k", tmp_path / "koniq-10k")


@pytest.mark.parametrize("script", ["pretrain_qualiclip.py", "train_swin.py", "cross_dataset_test.py"])
@pytest.mark.parametrize("mistake", DATASET_MISTAKES)
def test_dataset_mistakes_are_refused_before_anything_is_written(script, mistake, koniq_copy, tmp_path, request,
                                                                 text_features_file):
    fragments = DATASET_MISTAKES[mistake](koniq_copy)
    stage2 = request.getfixturevalue("stage2_run") if script == "cross_dataset_test.py" else None
    args = cli_for(script, koniq_copy, tmp_path / "out", stage2, text_features_file)
    assert_refused_untouched(tmp_path, script, *args, fragments=fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["pretrain_qualiclip.py", "train_swin.py", "cross_dataset_test.py"])
def test_missing_data_root(script, tmp_path, request, text_features_file):
    stage2 = request.getfixturevalue("stage2_run") if script == "cross_dataset_test.py" else None
    missing = tmp_path / "no-such-koniq"
    assert_refused_untouched(tmp_path, script, *cli_for(script, missing, tmp_path / "out", stage2, text_features_file),
                             fragments=[missing, "does not exist"])


@pytest.mark.parametrize("script", ["pretrain_qualiclip.py", "train_swin.py"])
def test_empty_training_split(script, koniq_copy, tmp_path, text_features_file):
    names = sorted(p.name for p in (koniq_copy / "512x384").iterdir())
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [], "val": names[:4], "test": names[4:]}))
    args = (*cli_for(script, koniq_copy, tmp_path / "out", text_features=text_features_file), "--split_file", split)
    assert_refused_untouched(tmp_path, script, *args, fragments=["'train' split", "empty", "--split_file"])


@pytest.mark.parametrize("flags, fragments", [
    (["--num_levels", "0"], ["--num_levels", "1 to 5", "0"]),
    (["--num_levels", "6"], ["--num_levels", "1 to 5", "6"]),
    (["--distortion_types", "blur,fog"], ["--distortion_types", "'fog'", "blur, jpeg, noise, brightness"]),
])
def test_stage1_bad_degradation_flags(flags, fragments, clean_images, tmp_path, text_features_file):
    assert_refused_untouched(tmp_path, "pretrain_qualiclip.py", "--image_dir", clean_images, "--text_features",
                             text_features_file, "--save_dir", tmp_path / "run", *STAGE1_FAST, *flags,
                             fragments=fragments)


@pytest.mark.parametrize("mode", ["truncated", "zero-byte", "not an image"])
def test_stage1_image_dir_is_decoded_before_training(mode, clean_images, tmp_path, text_features_file):
    """Stage-1 workers decode lazily; every file is checked up front so a bad one fails at start."""
    images = shutil.copytree(clean_images, tmp_path / "images")
    bad = images / "2.jpg"
    if mode == "truncated":
        bad.write_bytes(bad.read_bytes()[:300])
    elif mode == "zero-byte":
        bad.write_bytes(b"")
    else:
        bad.write_text("just text")
    assert_refused_untouched(tmp_path, "pretrain_qualiclip.py", *stage1_args(images, text_features_file,
                                                                             tmp_path / "run"),
                             fragments=[bad, "replace the file"])


def test_stage1_refuses_an_existing_run(stage1_run, clean_images, text_features_file):
    assert_refused_untouched(stage1_run, "pretrain_qualiclip.py",
                             *stage1_args(clean_images, text_features_file, stage1_run),
                             fragments=["--save_dir", "already holds a run", "--resume"])


def save_mixed_mode_images(folder):
    """Two images of each awkward kind, all smaller than the Stage-2 patch, the tiny ones than the Stage-1 crop."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    names = []
    for k in range(2):
        rgb = Image.fromarray(rng.integers(0, 255, (75, 100, 3), dtype=np.uint8))
        images = {
            f"gray_{k}.jpg": rgb.convert("L"),
            f"rgba_{k}.png": Image.merge("RGBA", (*rgb.split(), Image.new("L", rgb.size, 128))),
            f"palette_{k}.png": rgb.convert("P"),
            f"cmyk_{k}.jpg": rgb.convert("CMYK"),
            f"deep_{k}.png": Image.fromarray(rng.integers(0, 65535, (75, 100), dtype=np.uint16)),
            f"tiny_{k}.png": rgb.resize((40, 30)),
        }
        for name, image in images.items():
            image.save(folder / name)
            names.append(name)
    assert Image.open(folder / "deep_0.png").mode.startswith("I") and Image.open(folder / "cmyk_0.jpg").mode == "CMYK"
    return names


@pytest.mark.slow
def test_unusual_images_are_converted_and_used_by_both_stages(tmp_path, text_features_file):
    images = tmp_path / "images"
    names = save_mixed_mode_images(images)
    scores = tmp_path / "scores.csv"
    scores.write_text("image,mos\n" + "".join(f"images/{n},{1 + k % 5}\n" for k, n in enumerate(names)))
    split = tmp_path / "split.json"  # one of each kind for training, the others to val/test
    split.write_text(json.dumps({"train": names[:6], "val": names[6:9], "test": names[9:]}))

    result = run_script("train_swin.py", "--dataset", "csv", "--data_root", scores, "--split_file", split,
                        "--output_dir", tmp_path / "stage2", "--epochs", "1", *STAGE2_FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "stage2" / "results.json").read_text())
    assert results["val"]["n"] == 3 and results["test"]["n"] == 3
    with open(tmp_path / "stage2" / "predictions_test.csv") as f:
        predicted = {os.path.basename(r["image"]): float(r["pred"]) for r in csv.DictReader(f)}
    assert set(predicted) == set(names[9:]) and all(np.isfinite(list(predicted.values())))

    result = run_script("pretrain_qualiclip.py", *stage1_args(images, text_features_file, tmp_path / "stage1", 1),
                        "--heldout_fraction", "0")  # every kind of image trained on
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"training images: {len(names)}" in result.stdout
    (record,) = read_jsonl(tmp_path / "stage1" / "log.jsonl")
    assert np.isfinite(record["train_loss"])


# ----------------------------------------------------------------------------- checkpoints that are not ours

@pytest.fixture(scope="module")
def foreign_files(tmp_path_factory):
    """Files a user might pass by mistake: a random dict of tensors, a plain tensor, a Swin-nano state dict."""
    folder = tmp_path_factory.mktemp("foreign")
    torch.save({"weight": torch.randn(3, 3), "bias": torch.randn(3)}, folder / "random_dict.pt")
    torch.save(torch.randn(4), folder / "plain_tensor.pt")
    torch.save(create_swin("nano").state_dict(), folder / "swin_nano.pth")
    return folder


@pytest.mark.parametrize("kind", ["random_dict", "plain_tensor"])
@pytest.mark.parametrize("where", ["pretrained_encoder", "stage1_backbone_weights", "stage1_resume",
                                   "cross_checkpoint", "predict_checkpoint", "text_features"])
def test_files_that_are_not_our_checkpoints_are_refused(kind, where, foreign_files, demo_root, clean_images,
                                                        text_features_file, tmp_path):
    bad = foreign_files / f"{kind}.pt"
    koniq = demo_root / "koniq-10k"
    out = tmp_path / "out"
    stage1 = ("pretrain_qualiclip.py", "--image_dir", clean_images, "--save_dir", out, *STAGE1_FAST)
    commands = {
        "pretrained_encoder": ("train_swin.py", "--data_root", koniq, "--output_dir", out, *STAGE2_FAST,
                               "--pretrained_encoder", bad),
        "stage1_backbone_weights": (*stage1, "--text_features", text_features_file, "--backbone_weights", bad),
        "stage1_resume": ("pretrain_qualiclip.py", "--resume", bad, "--device", "cpu", "--num_workers", "0"),
        "cross_checkpoint": ("cross_dataset_test.py", "--checkpoint", bad, "--datasets", f"koniq-10k={koniq}",
                             "--output", out / "cross.json", "--device", "cpu", "--num_workers", "0"),
        "predict_checkpoint": ("predict.py", "--checkpoint", bad, "--input", clean_images, "--output",
                               out / "scores.csv", "--device", "cpu", "--num_workers", "0"),
        "text_features": (*stage1, "--text_features", bad),
    }
    script, *args = commands[where]
    assert_refused_untouched(tmp_path, script, *args, fragments=[bad])


def interrupted_copy(stage2_run, destination):
    """A copy of a Stage-2 run as if killed before the end (no results.json), to --resume."""
    run_dir = shutil.copytree(stage2_run, destination)
    (run_dir / "results.json").unlink()
    return run_dir


def test_stage2_resume_from_a_foreign_last_pt_leaves_the_run_untouched(stage2_run, foreign_files, tmp_path):
    run_dir = interrupted_copy(stage2_run, tmp_path / "run")
    for kind in ("random_dict", "plain_tensor"):
        shutil.copy(foreign_files / f"{kind}.pt", run_dir / "last.pt")
        assert_refused_untouched(tmp_path, "train_swin.py", "--resume", run_dir / "last.pt", "--device", "cpu",
                                 "--num_workers", "0", fragments=["last.pt", "not a train_swin.py checkpoint"])


def test_runs_of_the_other_stage_are_refused(stage1_run, stage2_run, tmp_path):
    checkout = tmp_path / "runs"
    stage1 = shutil.copytree(stage1_run, checkout / "stage1")
    stage2 = shutil.copytree(stage2_run, checkout / "stage2")
    assert_refused_untouched(tmp_path, "train_swin.py", "--resume", stage1, "--device", "cpu",
                             fragments=["args.json", "not written by train_swin.py"])
    assert_refused_untouched(tmp_path, "pretrain_qualiclip.py", "--resume", stage2, "--device", "cpu",
                             fragments=["args.json", "not written by pretrain_qualiclip.py"])
    assert_refused_untouched(tmp_path, "pretrain_qualiclip.py", "--resume", stage2 / "last.pt", "--device", "cpu",
                             fragments=["last.pt", "not a pretrain_qualiclip.py checkpoint"])
    assert_refused_untouched(tmp_path, "predict.py", "--checkpoint", stage1 / "last.pt", "--input",
                             stage1 / "curves.png", "--output", tmp_path / "scores.csv", "--device", "cpu",
                             fragments=["last.pt", "not a train_swin.py checkpoint"])


@pytest.mark.parametrize("script", ["pretrain_qualiclip.py", "train_swin.py"])
def test_backbone_weights_of_another_size_are_refused(script, foreign_files, demo_root, clean_images,
                                                      text_features_file, tmp_path):
    weights = foreign_files / "swin_nano.pth"
    if script == "pretrain_qualiclip.py":
        args = ("--image_dir", clean_images, "--text_features", text_features_file, "--save_dir", tmp_path / "run",
                *STAGE1_FAST)
    else:
        args = ("--data_root", demo_root / "koniq-10k", "--output_dir", tmp_path / "run", *STAGE2_FAST)
    assert_refused_untouched(tmp_path, script, *args, "--model_size", "tiny", "--backbone_weights", weights,
                             fragments=[weights, "Swin-tiny"])


# ----------------------------------------------------------------------------- unwritable output

@pytest.fixture
def unwritable(tmp_path):
    """A folder path that cannot be created: under a read-only folder where permissions apply,
    else (root ignores permissions) under a regular file."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").touch()
    except PermissionError:
        yield locked / "out"
    else:  # running as root
        (locked / "probe").unlink()
        blocker = tmp_path / "a_file"
        blocker.write_text("a file, not a folder")
        yield blocker / "out"
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("script", ["pretrain_qualiclip.py", "train_swin.py", "cross_dataset_test.py", "predict.py"])
def test_unwritable_output_is_refused_before_any_work(script, unwritable, demo_root, clean_images,
                                                      text_features_file, tmp_path, request):
    koniq = demo_root / "koniq-10k"
    if script == "predict.py":
        stage2 = request.getfixturevalue("stage2_run")
        args, flag = ("--checkpoint", stage2 / "best.pt", "--input", clean_images, "--output",
                      unwritable / "scores.csv", "--device", "cpu"), "--output"
    elif script == "cross_dataset_test.py":
        args, flag = cli_for(script, koniq, unwritable, request.getfixturevalue("stage2_run")), "--output"
    else:
        args = cli_for(script, koniq, unwritable, text_features=text_features_file)
        flag = "--save_dir" if script == "pretrain_qualiclip.py" else "--output_dir"
    assert_refused_untouched(tmp_path, script, *args, fragments=[flag, "cannot be created"])


# ----------------------------------------------------------------------------- 2. interrupted runs

def kill_at_first_checkpoint(script_args, checkpoint, log_path, timeout=300):
    """Start a CLI, SIGKILL it as soon as ``checkpoint`` exists (the end of its first epoch)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *map(str, script_args)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while not os.path.exists(checkpoint):
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_stage1_killed_run_resumes_to_the_same_result(stage1_run, clean_images, text_features_file, tmp_path):
    run_dir = tmp_path / "run"
    kill_at_first_checkpoint(["pretrain_qualiclip.py", *stage1_args(clean_images, text_features_file, run_dir)],
                             run_dir / "last.pt", tmp_path / "killed.log")
    assert safe_load(run_dir / "last.pt")["epoch"] == 1  # killed after epoch 1 of 2 (epochs count from 1)
    assert not (run_dir / "results.json").exists()
    # What a kill at other moments leaves: the log without the checkpointed epoch, a half-written temp file.
    (run_dir / "log.jsonl").write_text("")
    (run_dir / f"{runtime.TEMP_PREFIX}abc-last.pt").write_bytes(b"partial")

    result = run_cli("pretrain_qualiclip.py", "--resume", run_dir, "--device", "cpu", "--num_workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed after epoch 1 of 2" in result.stdout
    full, resumed = read_jsonl(stage1_run / "log.jsonl"), read_jsonl(run_dir / "log.jsonl")
    assert [r["epoch"] for r in resumed] == [1, 2]
    for key in ("train_loss", "train_cons", "train_pos", "train_neg"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full], abs=1e-6), key
    a = safe_load(stage1_run / "swin_nano_qualiclip_pretrained.pkl")
    b = safe_load(run_dir / "swin_nano_qualiclip_pretrained.pkl")
    for part in ("encoder", "projection"):
        assert max((a[part][k] - b[part][k]).abs().max().item() for k in a[part]) < 1e-6, part
    assert not [n for n in os.listdir(run_dir) if n.startswith(runtime.TEMP_PREFIX)]


@pytest.mark.slow
def test_stage1_run_saved_in_the_earlier_checkpoint_format_still_resumes(stage1_run, tmp_path):
    """A last.pt of format qualiclip-pretrain-state/1 (epochs counted from 0, rank 0's RNG state only) and an
    args.json with no_imagenet_pretrained, resumed after its last epoch: the same encoder and log."""
    run_dir = shutil.copytree(stage1_run, tmp_path / "old")
    pkl = "swin_nano_qualiclip_pretrained.pkl"
    for name in ("results.json", pkl):
        (run_dir / name).unlink()
    state = safe_load(run_dir / "last.pt")
    old_args = {k: v for k, v in state["args"].items() if k not in ("imagenet_pretrained", "log_every", "tensorboard")}
    old_args["no_imagenet_pretrained"] = not state["args"]["imagenet_pretrained"]
    torch.save({**state, "format": "qualiclip-pretrain-state/1", "epoch": state["epoch"] - 1, "rng": state["rng"][0],
                "args": old_args}, run_dir / "last.pt")
    (run_dir / "args.json").write_text(json.dumps(old_args))

    result = run_script("pretrain_qualiclip.py", "--resume", run_dir, "--device", "cpu", "--num_workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed after epoch 2 of 2" in result.stdout
    assert read_jsonl(run_dir / "log.jsonl") == read_jsonl(stage1_run / "log.jsonl")
    a, b = safe_load(stage1_run / pkl), safe_load(run_dir / pkl)
    for part in ("encoder", "projection"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.slow
def test_stage2_killed_run_resumes_to_the_same_result(stage2_run, demo_root, tmp_path):
    run_dir = tmp_path / "run"
    kill_at_first_checkpoint(["train_swin.py", *stage2_args(demo_root / "koniq-10k", run_dir)],
                             run_dir / "last.pt", tmp_path / "killed.log")
    assert safe_load(run_dir / "last.pt")["epoch"] == 1  # killed after epoch 1 of 2
    assert not (run_dir / "results.json").exists()
    # What a kill at other moments leaves: best.pt not yet written after last.pt (epoch 1 is the
    # best so far), a log ahead of the checkpoint and wrong.
    (run_dir / "best.pt").unlink(missing_ok=True)
    log = run_dir / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "train_loss": 99.0}) + "\n" for e in (1, 2)))

    result = run_cli("train_swin.py", "--resume", run_dir, "--device", "cpu", "--num_workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    full = json.loads((stage2_run / "results.json").read_text())
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["best_epoch"] == full["best_epoch"]
    for block in ("val", "test", "test_last"):
        for key in METRICS:
            assert resumed[block][key] == pytest.approx(full[block][key], abs=1e-6), (block, key)
    full_log, resumed_log = read_jsonl(stage2_run / "log.jsonl"), read_jsonl(log)
    assert [r["epoch"] for r in resumed_log] == [1, 2]
    assert [r["train_loss"] for r in resumed_log] == pytest.approx([r["train_loss"] for r in full_log], abs=1e-6)


# ----------------------------------------------------------------------------- 3. atomic writes, NaN stop

def test_crash_inside_an_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    runtime.atomic_torch_save({"epoch": 1, "weights": torch.arange(4.0)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left"):
        runtime.atomic_torch_save({"epoch": 2, "weights": torch.zeros(1000)}, path)
    assert path.read_bytes() == before and safe_load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    runtime.atomic_write_json(path, {"epoch": 1})
    code = ("import os, signal\nfrom iqa import runtime\n"
            "def die(f):\n    f.write(b'{\"epo'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            f"runtime.atomic_write_binary({str(path)!r}, die)\n")
    assert run_cli("-c", code).returncode == -signal.SIGKILL
    assert json.loads(path.read_text()) == {"epoch": 1}
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(runtime.TEMP_PREFIX)]
    assert len(leftovers) == 1  # what a resume removes (see the kill/resume tests)
    runtime.prepare_output_dir(tmp_path, resume=True)
    assert os.listdir(tmp_path) == ["results.json"]


@pytest.mark.slow
def test_stage1_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(clean_images, text_features_file,
                                                                         tmp_path):
    save_dir = tmp_path / "run"
    # One step per epoch: lr 1e30 leaves finite but huge weights after epoch 1, the loss of epoch 2 overflows.
    result = run_script("pretrain_qualiclip.py", "--image_dir", clean_images, "--text_features", text_features_file,
                        "--save_dir", save_dir, *STAGE1_FAST, "--batch_size", "4", "--epochs", "3", "--lr", "1e30")
    assert_user_error(result, "non-finite", "epoch 2", "last.pt (epoch 1)", "--lr")
    state = safe_load(save_dir / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in read_jsonl(save_dir / "log.jsonl")] == [1]
    assert not (save_dir / "swin_nano_qualiclip_pretrained.pkl").exists()


def test_non_finite_weights_are_found_before_a_checkpoint_is_saved():
    """Both stages check the weights after each epoch: its last update can blow them up unseen by any loss."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    assert training_run.first_nonfinite_parameter(model) is None
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    assert training_run.first_nonfinite_parameter(model) == "1.bias"


# ----------------------------------------------------------------------------- 4. loading never unpickles code

class _MaliciousPayload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def save_malicious_checkpoint(path, marker):
    """A torch.save file shaped like our checkpoints whose unpickling would write ``marker``."""
    torch.save({"format": "swin-hyperiqa/1", "model": _MaliciousPayload(marker), "text_features": torch.zeros(2, 4)},
               path)
    return path


def test_the_malicious_payload_is_live(tmp_path):
    """Control: a plain unpickler would run it (so the marker checks below can fail)."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_MaliciousPayload(marker)))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("where", ["text_features", "clip_weights", "stage1_backbone_weights", "stage1_resume",
                                   "pretrained_encoder", "stage2_backbone_weights", "stage2_resume",
                                   "cross_checkpoint", "predict_checkpoint"])
def test_files_needing_arbitrary_unpickling_are_refused_and_never_run(where, stage2_run, clean_images, demo_root,
                                                                     text_features_file, tmp_path):
    marker = tmp_path / "marker"
    evil = save_malicious_checkpoint(tmp_path / "evil.pt", marker)
    koniq, out = demo_root / "koniq-10k", tmp_path / "out"
    stage1 = ("pretrain_qualiclip.py", "--image_dir", clean_images, "--save_dir", out, *STAGE1_FAST)
    stage2 = ("train_swin.py", "--data_root", koniq, "--output_dir", out, *STAGE2_FAST)
    if where == "stage2_resume":
        shutil.copy(evil, interrupted_copy(stage2_run, tmp_path / "run") / "last.pt")
    commands = {
        "text_features": (*stage1, "--text_features", evil),
        "clip_weights": (*stage1, "--clip_weights", evil),
        "stage1_backbone_weights": (*stage1, "--text_features", text_features_file, "--backbone_weights", evil),
        "stage1_resume": ("pretrain_qualiclip.py", "--resume", evil, "--device", "cpu"),
        "pretrained_encoder": (*stage2, "--pretrained_encoder", evil),
        "stage2_backbone_weights": (*stage2, "--backbone_weights", evil),
        "stage2_resume": ("train_swin.py", "--resume", tmp_path / "run", "--device", "cpu", "--num_workers", "0"),
        "cross_checkpoint": ("cross_dataset_test.py", "--checkpoint", evil, "--datasets", f"koniq-10k={koniq}",
                             "--output", out / "cross.json", "--device", "cpu", "--num_workers", "0"),
        "predict_checkpoint": ("predict.py", "--checkpoint", evil, "--input", clean_images, "--output",
                               out / "scores.csv", "--device", "cpu", "--num_workers", "0"),
    }
    script, *args = commands[where]
    line = assert_refused_untouched(tmp_path, script, *args, fragments=["refusing", "arbitrary unpickling"])
    assert not marker.exists()
    assert "\x1b" not in line  # torch's terminal colour codes are stripped
