"""Both training scripts under torchrun (2 processes, gloo backend on CPU)."""
import json
import os
import socket

import pytest
import torch

from iqa.datasets import read_index
from models.swin_backbone import create_swin
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.slow  # every test here runs a CLI as a subprocess


def torchrun():
    """``python -m torch.distributed.run`` on a free port (port 0 hangs the static rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return ("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}")


def test_pretrain_under_torchrun_writes_one_run(tmp_path, demo_root, text_features_file):
    save_dir = tmp_path / "pretrain"
    result = run_cli(*torchrun(), os.path.join(ROOT, "pretrain_qualiclip.py"),
                     "--data_root", demo_root / "koniq-10k", "--text_features", text_features_file,
                     "--model_size", "nano", "--no_imagenet_pretrained", "--crop_size", "64", "--num_levels", "2",
                     "--batch_size", "2", "--epochs", "2", "--num_workers", "0", "--eval_patch_num", "1",
                     "--device", "cpu", "--save_dir", save_dir, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 alone writes: one log line per epoch, one encoder
    log = [json.loads(line) for line in (save_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    # the zero-shot validation gathers every rank's share of the images
    n_val = sum(s.split == "val" for s in read_index("koniq-10k", demo_root / "koniq-10k"))
    assert n_val >= 2 and log[-1]["val"]["n"] == n_val
    ckpt = torch.load(save_dir / "swin_nano_qualiclip_pretrained.pkl", weights_only=True)
    create_swin("nano").load_state_dict(ckpt["encoder"], strict=True)
    assert sorted(p.name for p in save_dir.iterdir() if p.suffix == ".pkl") == ["swin_nano_qualiclip_pretrained.pkl"]


def test_train_swin_under_torchrun_gathers_all_test_images(tmp_path, demo_root):
    run_dir = tmp_path / "ddp"
    result = run_cli(*torchrun(), os.path.join(ROOT, "train_swin.py"), "--dataset", "koniq-10k",
                     "--data_root", demo_root / "koniq-10k", "--model_size", "nano", "--no_imagenet_pretrained",
                     "--epochs", "1", "--batch_size", "4", "--train_patch_num", "1", "--test_patch_num", "1",
                     "--num_workers", "0", "--device", "cpu", "--amp", "off", "--output_dir", run_dir, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    assert results["test"]["n"] == len(split["test"]) and results["val"]["n"] == len(split["val"])
    # The gathered test metrics equal a single-process evaluation of the saved best model on the
    # same images (a CSV dataset of the test split; SRCC/PLCC/KRCC do not depend on MOS bounds).
    rows = [line.split(",") for line in (run_dir / "predictions_test.csv").read_text().splitlines()[1:]]
    assert len(rows) == len(split["test"]) and len({r[0] for r in rows}) == len(rows)
    test_csv = tmp_path / "test_split.csv"
    test_csv.write_text("image,mos\n" + "".join(f"{r[0]},{r[1]}\n" for r in rows))
    out = tmp_path / "single.json"
    single = run_cli("cross_dataset_test.py", "--checkpoint", run_dir / "best.pt", "--datasets", f"csv={test_csv}",
                     "--test_patch_num", "1", "--device", "cpu", "--num_workers", "0", "--amp", "off",
                     "--output", out)
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads(out.read_text())[str(run_dir / "best.pt")]["csv"]
    assert alone["n"] == results["test"]["n"]
    for key in ("srcc", "plcc", "krcc"):
        assert alone[key] == pytest.approx(results["test"][key], abs=1e-5), key
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 1
