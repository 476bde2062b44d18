"""predict.py at scale: unreadable images, chunked writes, --resume, the mos column; the shared
folder listing and CSV writer."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from iqa.datasets import IMAGE_EXTENSIONS, Sample, list_image_files
from iqa.evaluation import csv_text, write_predictions
from iqa.runtime import UserError
from iqa.scoring import load_scorer
from qualiclip_pretrain.pretrain_dataset import list_image_dir
from tests.helpers import ROOT, assert_user_error, run_cli
from tests.scoring_files import make_image, write_stage1_pkl, write_stage2_checkpoint, write_truncated_jpeg

CPU = ("--device", "cpu", "--num_workers", "0")
GOOD = ("a.png", "b.jpg", os.path.join("sub", "c.PNG"), os.path.join("sub", "d.jpeg"), "e.png")
BAD = "broken.jpg"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    stage2, other, stage1 = folder / "best.pt", folder / "other.pt", folder / "encoder.pkl"
    # resize 0 (native size) and 2 crops keep the nano model quick on CPU.
    write_stage2_checkpoint(stage2, mos_bounds=(20.0, 90.0), resize=0, test_patch_num=2)
    write_stage2_checkpoint(other, resize=0, test_patch_num=2, seed=1)
    write_stage1_pkl(stage1, eval_resize=0)
    photos = folder / "photos"
    (photos / "sub").mkdir(parents=True)
    for k, name in enumerate(GOOD):
        make_image(224 + 16 * k, 224, seed=k).save(photos / name, format="JPEG" if "jp" in name.lower() else "PNG")
    write_truncated_jpeg(photos / BAD)
    (photos / "notes.txt").write_text("not an image")
    return {"stage2": stage2, "other": other, "stage1": stage1, "photos": photos}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def predict(files, output, *args, checkpoint="stage2"):
    return run_cli("predict.py", "--checkpoint", files[checkpoint], "--input", files["photos"], "--output", output,
                   *CPU, *args, timeout=300)


def test_list_image_files_is_recursive_sorted_and_case_blind(tmp_path):
    for name in ("b.JPG", "a.png", "z/c.webp", "z/y/d.TIFF", "notes.txt", "z/e.gif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    expected = ["a.png", "b.JPG", os.path.join("z", "c.webp"), os.path.join("z", "y", "d.TIFF")]
    assert list_image_files(str(tmp_path), "--input") == expected
    assert list_image_dir(str(tmp_path)) == [os.path.join(str(tmp_path), name) for name in expected]
    assert ".gif" not in IMAGE_EXTENSIONS
    with pytest.raises(UserError, match="--image_dir '.*nowhere' does not exist"):
        list_image_dir(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="--input '.*notes.txt' is not a folder"):
        list_image_files(str(tmp_path / "notes.txt"), "--input")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        list_image_files(str(tmp_path / "empty"), "--input")


def test_csv_text_and_write_predictions(tmp_path):
    assert list(csv.reader(csv_text([["image", "score"], ["x, y.png", 0.1234567], ["z.png", 1.0]]).splitlines())) == [
        ["image", "score"], ["x, y.png", "0.123457"], ["z.png", "1.000000"]]
    path = tmp_path / "predictions.csv"
    write_predictions(path, [Sample("a.png", 3.25, "test", "t:2"), Sample("b.png", 61.123456789, "test", "t:3")],
                      [0.5, 2 / 3], "score")
    assert read_csv(path) == [["image", "mos", "score"], ["a.png", "3.25", "0.500000"],
                              ["b.png", "61.123456789", "0.666667"]]


@pytest.mark.slow
def test_unreadable_images_are_listed_and_the_rest_scored(files, tmp_path):
    output = tmp_path / "scores.csv"
    proc = predict(files, output, "--chunk_size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(output)
    assert rows[0] == ["image", "score", "mos"]
    assert [r[0] for r in rows[1:]] == sorted(GOOD)
    scorer = load_scorer(files["stage2"])
    expected = scorer.score_paths([files["photos"] / name for name in sorted(GOOD)])
    for (_, score, mos), want in zip(rows[1:], expected.tolist()):
        assert float(score) == pytest.approx(want, abs=1e-6)
        assert float(mos) == pytest.approx(20.0 + want * 70.0, abs=1e-5)  # the checkpoint's MOS range

    unreadable = read_csv(tmp_path / "scores_unreadable.csv")
    assert unreadable[0] == ["image", "reason"] and [r[0] for r in unreadable[1:]] == [BAD]
    assert "cannot decode" in unreadable[1][1] and "truncated" in unreadable[1][1]
    assert f"scored {len(GOOD)} image(s)" in proc.stdout and "1 unreadable image(s) skipped" in proc.stdout
    settings = json.loads((tmp_path / "scores.csv.json").read_text())
    assert settings["checkpoint"] == str(files["stage2"]) and settings["test_patch_num"] == 2

    strict = predict(files, tmp_path / "strict.csv", "--strict", "--chunk_size", "2")
    assert_user_error(strict, "cannot decode image", BAD)


@pytest.mark.slow
def test_resume_scores_only_what_is_missing(files, tmp_path):
    full = tmp_path / "full.csv"
    assert predict(files, full, "--chunk_size", "2").returncode == 0
    full_rows = read_csv(full)

    # A run killed while writing its second chunk: settings, header, two rows and half a row.
    partial = tmp_path / "partial.csv"
    (tmp_path / "partial.csv.json").write_text((tmp_path / "full.csv.json").read_text())
    text = full.read_text()
    lines = text.splitlines(keepends=True)
    partial.write_text("".join(lines[:3]) + lines[3][:5])
    assert_user_error(predict(files, partial), "already exists", "--resume")
    assert_user_error(predict(files, partial, "--resume", checkpoint="other"), "was written with checkpoint")
    assert_user_error(predict(files, partial, "--resume", "--test_patch_num", "3"), "test_patch_num 2", "has 3")

    proc = predict(files, partial, "--resume", "--chunk_size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"scored {len(GOOD) - 2} image(s)" in proc.stdout and "2 already in it" in proc.stdout
    assert read_csv(partial) == full_rows  # nothing scored twice, nothing lost, same order
    assert [r[0] for r in read_csv(tmp_path / "partial_unreadable.csv")[1:]] == [BAD]  # tried again


def test_resume_refuses_scores_of_another_meaning(tmp_path):
    """A CSV begun when a checkpoint kind's scores meant something else (e.g. a Stage-1 Swin encoder's
    probability, before it was scored by its log-odds) is not continued with the new scale."""
    from predict import RESUME_CHECKED, scored_names, settings_path

    output = tmp_path / "scores.csv"
    header = ["image", "score"]
    settings = {key: 1 for key in RESUME_CHECKED} | {"score_meaning": "score: zero-shot log-odds"}
    output.write_text("image,score\na.png,0.5\n")
    with open(settings_path(output), "w") as f:
        json.dump(settings | {"score_meaning": "score: a probability in [0, 1]"}, f)
    with pytest.raises(UserError, match="score_meaning 'score: a probability"):
        scored_names(str(output), settings, header)
    with open(settings_path(output), "w") as f:
        json.dump(settings, f)
    assert scored_names(str(output), settings, header) == {"a.png"}


@pytest.mark.slow
def test_a_killed_run_keeps_its_chunks_and_resumes(files, tmp_path):
    output = tmp_path / "scores.csv"
    args = [sys.executable, os.path.join(ROOT, "predict.py"), "--checkpoint", files["stage2"], "--input",
            files["photos"], "--output", output, *CPU, "--chunk_size", "1", "--test_patch_num", "16"]
    proc = subprocess.Popen(list(map(str, args)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if output.exists() and len(read_csv(output)) >= 3:  # header and two chunks on disk
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    kept = read_csv(output)
    assert 3 <= len(kept) < len(GOOD) + 1 and all(len(row) == 3 for row in kept[1:])

    resumed = run_cli(*args[1:], "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_csv(output)
    assert [r[0] for r in rows[1:]] == sorted(GOOD)
    scorer = load_scorer(files["stage2"])
    scorer.test_patch_num = 16
    expected = scorer.score_paths([files["photos"] / name for name in sorted(GOOD)])
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.slow
def test_zero_shot_has_no_mos_column(files, tmp_path):
    output = tmp_path / "zero_shot.csv"
    proc = predict(files, output, checkpoint="stage1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(output)
    assert rows[0] == ["image", "score"] and len(rows) == len(GOOD) + 1
    # a Swin encoder's zero-shot score is its log-odds, and the run says so
    expected = load_scorer(files["stage1"]).score_paths([files["photos"] / name for name in sorted(GOOD)])
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
    assert "zero-shot log-odds" in proc.stdout
    with open(f"{output}.json") as f:
        assert json.load(f)["score_meaning"].startswith("score: zero-shot log-odds")
