"""Stage-2 CLIs end to end on the demo datasets (subprocesses, CPU, nano models)."""
import csv
import json
import math
import os
import shutil

import pytest
import torch

from models.quality_encoder import QualityEncoder
from tests.helpers import ROOT, assert_user_error, run_cli
from tools.make_demo_data import build_demo

pytestmark = pytest.mark.slow  # every test here runs a CLI as a subprocess

METRICS = {"srcc", "plcc", "plcc_logistic", "krcc", "rmse", "rmse_logistic", "n"}  # in-domain: on the MOS scale
CROSS_METRICS = METRICS - {"rmse"}  # another dataset's MOS scale: RMSE only after the logistic mapping
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NANO = ("--model_size", "nano", "--no_imagenet_pretrained", "--device", "cpu", "--num_workers", "0")


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo") / "demo_data", n_koniq=40, n_others=12, seed=0)


@pytest.fixture(scope="module")
def trained_run(demo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "koniq_nano"
    # a batch of 32 holds the training split (70% of 40 images): one step per epoch
    proc = run_cli("train_swin.py", "--dataset", "koniq-10k", "--data_root", demo["koniq-10k"], *NANO,
                   "--epochs", "2", "--batch_size", "32", "--train_patch_num", "1", "--test_patch_num", "2",
                   "--use_multiscale", "--attention_fusion", "--output_dir", run_dir,
                   "--cross_datasets", f"spaq={demo['spaq']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(run_dir) in proc.stdout  # printed at start and end
    return run_dir


@pytest.fixture(scope="module")
def stage1_pkl(tmp_path_factory):
    encoder = QualityEncoder("nano", text_dim=16, imagenet_pretrained=False)
    path = tmp_path_factory.mktemp("stage1") / "swin_nano_qualiclip_pretrained.pkl"
    torch.save(encoder.checkpoint_dict(torch.randn(2, 16), [("Good photo.", "Bad photo.")], {"epochs": 1}), path)
    return path


def test_train_swin_writes_the_run_directory(trained_run, demo):
    for name in ("args.json", "split.json", "log.jsonl", "last.pt", "best.pt", "results.json",
                 "predictions_test.csv", "predictions_spaq.csv"):
        assert (trained_run / name).is_file(), name
    for name in ("curves.png", "scatter_test.png", "scatter_spaq.png"):
        assert is_png(trained_run / name), name

    args = json.loads((trained_run / "args.json").read_text())
    assert args["model_size"] == "nano" and args["use_multiscale"] and args["attention_fusion"]
    log = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert set(log[0]["lr"]) == {"encoder", "head"} and set(log[0]["val"]) == METRICS

    results = json.loads((trained_run / "results.json").read_text())
    assert set(results) == {"dataset", "model_size", "protocol", "best_epoch", "val", "test", "test_last",
                            "cross_dataset"}
    assert (results["dataset"], results["model_size"]) == ("koniq-10k", "nano")
    assert results["best_epoch"] in (1, 2)
    for block in (results["val"], results["test"], results["test_last"]):
        assert set(block) == METRICS
    assert set(results["cross_dataset"]["spaq"]) == CROSS_METRICS
    assert results["cross_dataset"]["spaq"]["n"] == 12

    split = json.loads((trained_run / "split.json").read_text())
    assert len(split["test"]) == results["test"]["n"] and len(split["val"]) == results["val"]["n"]
    assert not set(split["train"]) & set(split["test"])
    with open(trained_run / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == results["test"]["n"] and {os.path.basename(r["image"]) for r in rows} == set(split["test"])

    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "args", "rng", "best", "history"} <= set(ckpt)
    assert ckpt["epoch"] == results["best_epoch"] and ckpt["args"]["model_size"] == "nano"


def test_train_swin_refuses_an_existing_run(trained_run, demo):
    proc = run_cli("train_swin.py", "--data_root", demo["koniq-10k"], *NANO, "--epochs", "1",
                   "--output_dir", trained_run)
    assert_user_error(proc, "already holds a run", "--resume")


def test_pretrained_encoder_of_another_size_is_refused(stage1_pkl, demo, tmp_path):
    proc = run_cli("train_swin.py", "--data_root", demo["koniq-10k"], "--model_size", "tiny",
                   "--no_imagenet_pretrained", "--device", "cpu", "--epochs", "1", "--output_dir", tmp_path / "run",
                   "--pretrained_encoder", stage1_pkl)
    assert_user_error(proc, "Swin-nano", "tiny")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_unmatched_pretrained_glob_points_to_step_1(demo, tmp_path):
    pattern = "checkpoints/qualiclip_pretrain_*/swin_base_qualiclip_pretrained.pkl"  # the shell leaves it unexpanded
    proc = run_cli("train_swin.py", "--data_root", demo["koniq-10k"], *NANO, "--output_dir", tmp_path / "run",
                   "--pretrained_encoder", pattern, cwd=tmp_path)
    assert_user_error(proc, pattern, "Step 1")


def test_cross_dataset_test_writes_json_table_and_plots(trained_run, demo, tmp_path):
    output = tmp_path / "cross.json"
    best, last = trained_run / "best.pt", trained_run / "last.pt"
    proc = run_cli("cross_dataset_test.py", "--checkpoint", best, last, "--datasets", f"kadid-10k={demo['kadid-10k']}",
                   f"agiqa-3k={demo['agiqa-3k']}", "--device", "cpu", "--num_workers", "0", "--output", output)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results) == {str(best), str(last)}
    for per_dataset in results.values():
        assert set(per_dataset) == {"kadid-10k", "agiqa-3k"}
        assert all(set(m) == CROSS_METRICS and m["n"] == 12 for m in per_dataset.values())
    assert "kadid-10k SRCC/PLCC" in proc.stdout and str(best) in proc.stdout
    pngs = sorted(p.name for p in tmp_path.glob("cross_*.png"))
    assert len(pngs) == 4 and all(is_png(tmp_path / p) for p in pngs)


def test_cross_dataset_test_same_metrics_under_torchrun(trained_run, demo, tmp_path):
    """Two DDP ranks share the images; gathered predictions must give the single-process metrics."""
    single, ddp = tmp_path / "single.json", tmp_path / "ddp.json"
    common = ("--checkpoint", trained_run / "best.pt", "--datasets", f"livec={demo['livec']}",
              "--device", "cpu", "--num_workers", "0", "--amp", "off")
    assert run_cli("cross_dataset_test.py", *common, "--output", single).returncode == 0
    proc = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(ROOT, "cross_dataset_test.py"),
                   *common, "--output", ddp, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads(single.read_text())[str(trained_run / "best.pt")]["livec"]
    b = json.loads(ddp.read_text())[str(trained_run / "best.pt")]["livec"]
    assert a["n"] == b["n"] == 12
    for key in CROSS_METRICS - {"n"}:
        assert b[key] == pytest.approx(a[key], abs=1e-5), key


@pytest.fixture
def photo_folder(demo, tmp_path):
    """5 images, 2 more in a subfolder, and a file that is not an image."""
    source = os.path.join(demo["livec"], "Images")
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for k, name in enumerate(sorted(n for n in os.listdir(source) if n.endswith(".JPG"))[:7]):
        shutil.copy(os.path.join(source, name), folder / ("sub" if k >= 5 else "") / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_scores_a_folder_and_a_single_image(trained_run, photo_folder, tmp_path):
    output = tmp_path / "scores.csv"
    folder = photo_folder
    proc = run_cli("predict.py", "--checkpoint", trained_run / "best.pt", "--input", folder, "--output", output,
                   "--device", "cpu", "--num_workers", "0", "--batch_size", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(output) as f:
        rows = list(csv.DictReader(f))
    images = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.JPG"))
    assert len(images) == 7 and [r["image"] for r in rows] == images
    scores = {r["image"]: float(r["score"]) for r in rows}
    lo, hi = torch.load(trained_run / "best.pt", weights_only=True)["mos_bounds"]
    for r in rows:  # the score mapped onto the training split's MOS range
        assert float(r["mos"]) == pytest.approx(lo + float(r["score"]) * (hi - lo), abs=1e-4)

    single = tmp_path / "one.csv"
    proc = run_cli("predict.py", "--checkpoint", trained_run / "best.pt", "--input", os.path.join(folder, images[3]),
                   "--output", single, "--device", "cpu", "--num_workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(single) as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["score"]) == pytest.approx(scores[images[3]], abs=1e-5)  # batching does not change a score

    assert_user_error(run_cli("predict.py", "--checkpoint", trained_run / "best.pt", "--input", folder,
                              "--output", output), "already exists")


def test_predict_zero_shot_with_a_stage1_encoder(stage1_pkl, photo_folder, tmp_path):
    output = tmp_path / "zero_shot.csv"
    proc = run_cli("predict.py", "--checkpoint", stage1_pkl, "--input", photo_folder,
                   "--output", output, "--device", "cpu", "--num_workers", "0", "--test_patch_num", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(output) as f:
        reader = csv.DictReader(f)
        scores = [float(r["score"]) for r in reader]
    assert reader.fieldnames == ["image", "score"]  # zero-shot scores have no MOS scale
    assert len(scores) == 7 and all(math.isfinite(s) for s in scores)  # log-odds: unbounded
    assert "zero-shot log-odds" in proc.stdout
