"""Both training scripts under torchrun on CPU (gloo): two processes on one node, and two "nodes"
(``--nnodes 2 --node_rank 0/1``, one process each) on localhost."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

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


# ----------------------------------------------------------------------------- two nodes on localhost

def launch_nodes(script_args, cwd, log_dir, tag):
    """Two torchrun "nodes" (``--nnodes 2 --node_rank 0/1``, one gloo process each) on a free port of
    localhost, each writing its output to ``log_dir/<tag>_node<R>.log``; returns (Popen, log path) pairs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = []
    for node_rank in (0, 1):
        log_path = log_dir / f"{tag}_node{node_rank}.log"
        with open(log_path, "w") as log:
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
                    "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                    *map(str, script_args)]
            nodes.append((subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}),
                          log_path))
    return nodes


def finish_nodes(nodes, timeout=400):
    """Wait for both nodes; returns their outputs (node 0 first) after asserting both exited 0."""
    outputs = []
    for process, log_path in nodes:
        returncode = process.wait(timeout=timeout)
        outputs.append(log_path.read_text())
        assert returncode == 0, outputs[-1][-3000:]
    return outputs


def test_train_swin_on_two_nodes_writes_one_run_directory(tmp_path, demo_root):
    work = tmp_path / "work"
    work.mkdir()
    # No --output_dir: each node makes the timestamped default, so only rank 0's (broadcast) may be used.
    node0, node1 = finish_nodes(launch_nodes(
        [os.path.join(ROOT, "train_swin.py"), "--dataset", "koniq-10k", "--data_root", demo_root / "koniq-10k",
         "--model_size", "nano", "--no_imagenet_pretrained", "--epochs", "1", "--batch_size", "4",
         "--train_patch_num", "1", "--test_patch_num", "1", "--num_workers", "0", "--device", "cpu"],
        work, tmp_path, "stage2"))
    assert "distributed: 2 process(es), 1 on this node, backend gloo" in node0
    assert "distributed:" not in node1 and "run directory" not in node1  # rank 1 neither reports nor writes
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in work.iterdir()) == ["runs"]
    results = json.loads((runs[0] / "results.json").read_text())
    split = json.loads((runs[0] / "split.json").read_text())
    assert results["test"]["n"] == len(split["test"])  # both nodes' shares of the test images gathered
    assert len((runs[0] / "log.jsonl").read_text().splitlines()) == 1


def test_pretrain_on_two_nodes_resumes_after_a_kill(tmp_path, demo_root, text_features_file):
    save_dir = tmp_path / "pretrain"
    args = [os.path.join(ROOT, "pretrain_qualiclip.py"), "--data_root", demo_root / "koniq-10k",
            "--text_features", text_features_file, "--model_size", "nano", "--no_imagenet_pretrained",
            "--crop_size", "64", "--num_levels", "2", "--batch_size", "4", "--epochs", "2", "--num_workers", "0",
            "--eval_patch_num", "1", "--level_eval_images", "0", "--device", "cpu", "--save_dir", save_dir]
    nodes = launch_nodes(args, ROOT, tmp_path, "first")
    log = save_dir / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().strip()) and time.monotonic() < deadline:
        assert all(process.poll() is None for process, _ in nodes), nodes[0][1].read_text()[-3000:]
        time.sleep(0.05)
    assert log.is_file() and log.read_text().strip(), "no epoch logged within 300 s"
    # SIGTERM, as a scheduler ends a job: each torchrun agent stops its worker and exits.
    for process, _ in nodes:
        process.send_signal(signal.SIGTERM)
    for process, _ in nodes:
        process.wait(timeout=120)
    done = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert done == [1]
    assert not any(p.suffix == ".pkl" for p in save_dir.iterdir())

    node0, node1 = finish_nodes(launch_nodes([args[0], "--resume", save_dir, "--device", "cpu", "--num_workers", "0"],
                                             ROOT, tmp_path, "resume"))
    assert "resumed after epoch 1 of 2" in node0 and "resumed" not in node1
    assert "streams restart" not in node0  # same world size: every rank got its own RNG state back
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    ckpt = torch.load(save_dir / "swin_nano_qualiclip_pretrained.pkl", weights_only=True)
    create_swin("nano").load_state_dict(ckpt["encoder"], strict=True)
    assert torch.load(save_dir / "last.pt", weights_only=True)["epoch"] == 2
