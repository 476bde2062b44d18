"""Stage-2 solver: parameter groups, LR schedule, learning, resume, NaN stop, rounds (in-process, CPU)."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import train_swin
from HyperIQASolver_swin import (
    FINAL_LR_RATIO, HyperIQASolver, NonFiniteLossError, evaluate, make_scheduler, param_groups,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from iqa.datasets import read_index, select_split
from iqa.distributed import DistInfo
from iqa.runtime import make_adamw, read_jsonl, safe_load
from models.hyperiqa_swin import HyperIQASwin

METRICS = {"srcc", "plcc", "plcc_logistic", "krcc", "rmse", "rmse_logistic", "n"}  # val/test: on the training scale


def make_noise_dataset(root, n_train, n_val, n_test, seed=0):
    """Smooth random textures with added Gaussian noise of strength s; MOS = 5 - 4 s (csv dataset).

    A random-init network responds to noise as to any high-frequency energy (i.e. it ranks noisy
    images as *better*), so learning has to reverse the untrained ranking.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(n_train + n_val + n_test):
        base = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
        strength = rng.uniform(0, 1)
        noisy = np.asarray(base, dtype=float) + rng.normal(0, 60 * strength, (256, 256, 3))
        name = f"img_{i:03d}.png"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(os.path.join(root, name))
        rows.append((name, 5 - 4 * strength))
    with open(os.path.join(root, "scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mos"])
        writer.writerows(rows)
    names = [r[0] for r in rows]
    with open(os.path.join(root, "split.json"), "w") as f:
        json.dump({"train": names[:n_train], "val": names[n_train:n_train + n_val],
                   "test": names[n_train + n_val:]}, f)
    return os.path.join(root, "scores.csv"), os.path.join(root, "split.json")


def cli_args(scores, split, run_dir, *extra):
    return train_swin.get_args_parser().parse_args([
        "--dataset", "csv", "--data_root", scores, "--split_file", split, "--model_size", "nano",
        "--no_imagenet_pretrained", "--resize", "256", "--batch_size", "8", "--num_workers", "0",
        "--device", "cpu", "--output_dir", str(run_dir), "--log_every", "2", *extra,
    ])


@pytest.fixture
def no_global_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def test_param_groups_learning_rates_and_schedule_end():
    model = HyperIQASwin("nano", imagenet_pretrained=False)
    args = train_swin.get_args_parser().parse_args(
        ["--lr", "2e-4", "--lr_ratio", "10", "--lr_encoder_pretrained", "3e-5"])
    groups = param_groups(model, args)
    encoder_ids = {id(p) for p in model.backbone.parameters()}
    assert {g["name"] for g in groups} == {"encoder", "head"}
    enc, head = (next(g for g in groups if g["name"] == n) for n in ("encoder", "head"))
    assert {id(p) for p in enc["params"]} == encoder_ids
    assert not encoder_ids & {id(p) for p in head["params"]}
    assert len(enc["params"]) + len(head["params"]) == len(list(model.parameters()))
    assert (enc["lr"], head["lr"]) == (pytest.approx(2e-4), pytest.approx(2e-3))

    args.pretrained_encoder = "stage1.pkl"
    pretrained = {g["name"]: g["lr"] for g in param_groups(model, args)}
    assert pretrained == {"encoder": pytest.approx(3e-5), "head": pytest.approx(2e-3)}
    # the controlled baseline: ImageNet init with exactly the pretrained run's learning rates
    matched = train_swin.get_args_parser().parse_args(
        ["--lr", "2e-4", "--lr_ratio", "10", "--lr_encoder_pretrained", "3e-5", "--match_pretrained_lr"])
    assert {g["name"]: g["lr"] for g in param_groups(model, matched)} == pretrained

    optimizer = make_adamw(param_groups(model, args), torch.device("cpu"), weight_decay=5e-4)
    scheduler = make_scheduler(optimizer, "cosine", total_steps=12, steps_per_epoch=4, step_epochs=1)
    seen = []
    for _ in range(12):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    assert all(a > b for a, b in zip(seen, seen[1:]))  # decays every iteration
    final = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert final == {"encoder": pytest.approx(3e-5 * FINAL_LR_RATIO), "head": pytest.approx(2e-3 * FINAL_LR_RATIO)}

    step_opt = make_adamw(param_groups(model, args), torch.device("cpu"))
    step_sched = make_scheduler(step_opt, "step", total_steps=12, steps_per_epoch=4, step_epochs=2)
    lrs = []
    for _ in range(9):
        lrs.append(step_opt.param_groups[1]["lr"])
        step_opt.step()
        step_sched.step()
    assert lrs[7] == pytest.approx(2e-3) and lrs[8] == pytest.approx(2e-4)


@pytest.mark.slow
def test_training_beats_the_untrained_model(tmp_path):
    scores, split = make_noise_dataset(tmp_path / "data", 32, 8, 16)
    args = cli_args(scores, split, tmp_path / "run", "--epochs", "3", "--train_patch_num", "2",
                    "--test_patch_num", "2", "--lr", "1e-4", "--no_early_stopping", "--tensorboard")
    train_swin.check_args(args)
    samples = read_index("csv", scores, split_file=split)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    info = DistInfo()
    solver = HyperIQASolver(args, *(select_split(samples, s) for s in ("train", "val", "test")), info, str(run_dir))
    untrained, _ = evaluate(solver.model.eval(), solver.test_set, info, solver.eval_opts)
    results = solver.train()

    assert results["test"]["srcc"] > 0.9, results["test"]
    assert results["test"]["srcc"] > untrained["srcc"] + 0.5, (untrained, results["test"])
    assert results["test"]["plcc"] > 0.85
    assert results["test"]["rmse"] < 1.0  # on the 1..5 MOS scale
    final = {g["name"]: g["lr"] for g in solver.optimizer.param_groups}
    assert final == {"encoder": pytest.approx(1e-4 * FINAL_LR_RATIO), "head": pytest.approx(1e-3 * FINAL_LR_RATIO)}
    history = read_jsonl(run_dir / "log.jsonl")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    best = max(history, key=lambda r: r["val"]["srcc"])  # first best on ties
    assert results["best_epoch"] == best["epoch"] and results["val"] == best["val"]
    assert safe_load(run_dir / "best.pt")["epoch"] == best["epoch"]
    events = EventAccumulator(str(run_dir / "tensorboard"))  # --tensorboard: the log's numbers per epoch
    events.Reload()
    for tag, value in (("train_loss", lambda r: r["train_loss"]), ("val/srcc", lambda r: r["val"]["srcc"]),
                       ("lr/encoder", lambda r: r["lr"]["encoder"]), ("lr/head", lambda r: r["lr"]["head"])):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(r["epoch"], pytest.approx(value(r)))
                                                                      for r in history], tag


def test_targets_are_scaled_with_the_training_split_only(tmp_path):
    scores, split = make_noise_dataset(tmp_path / "data", 8, 4, 4)
    samples = read_index("csv", scores, split_file=split)
    # Train on the 8 middle MOS values; val and test hold the 4 lowest and 4 highest.
    ranked = [os.path.basename(s.path) for s in sorted(samples, key=lambda s: s.mos)]
    with open(split, "w") as f:
        json.dump({"train": ranked[4:12], "val": ranked[:2] + ranked[-2:], "test": ranked[2:4] + ranked[-4:-2]}, f)
    samples = read_index("csv", scores, split_file=split)
    train, val, test = (select_split(samples, s) for s in ("train", "val", "test"))
    train_mos = np.array([s.mos for s in train])
    lo, hi = train_mos.min(), train_mos.max()
    assert min(s.mos for s in samples) < lo and max(s.mos for s in samples) > hi

    args = cli_args(scores, split, tmp_path / "run", "--epochs", "1", "--train_patch_num", "1", "--test_patch_num", "1")
    solver = HyperIQASolver(args, train, val, test, DistInfo(), str(tmp_path / "run"))
    assert solver.bounds == (lo, hi) and solver.val_set.bounds == solver.test_set.bounds == (lo, hi)
    np.testing.assert_allclose(solver.train_set.targets.numpy(), (train_mos - lo) / (hi - lo), rtol=1e-6)
    assert solver.train_set.targets.min() == 0 and solver.train_set.targets.max() == 1
    assert solver.checkpoint()["mos_bounds"] == [lo, hi]
    # Explicit bounds still win (e.g. a fixed scale shared by several runs).
    assert HyperIQASolver(args, train, val, test, DistInfo(), str(tmp_path / "run"), bounds=(0, 10)).bounds == (0, 10)

    block, pred = evaluate(solver.model.eval(), solver.test_set, DistInfo(), solver.eval_opts)
    assert set(block) == METRICS  # in-domain: raw RMSE on the training scale, plus the logistic one
    test_mos = np.array([s.mos for s in test])
    assert block["rmse"] == pytest.approx(np.sqrt(np.mean((pred - test_mos) ** 2)))


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, no_global_determinism):
    scores, split = make_noise_dataset(tmp_path / "data", 12, 4, 4)
    common = ("--epochs", "3", "--train_patch_num", "1", "--test_patch_num", "2", "--lr", "1e-4", "--deterministic",
              "--no_early_stopping", "--dropout_rate", "0.2", "--drop_path_rate", "0.1", "--batch_size", "4")
    train_swin.main(cli_args(scores, split, tmp_path / "full", *common))

    original = HyperIQASolver.save_checkpoints

    def killed_after_epoch_2(self, is_best):
        original(self, is_best)
        if self.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(HyperIQASolver, "save_checkpoints", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_swin.main(cli_args(scores, split, tmp_path / "resumed", *common))
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert safe_load(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    monkeypatch.setattr(HyperIQASolver, "save_checkpoints", original)
    train_swin.main(train_swin.get_args_parser().parse_args(
        ["--resume", str(tmp_path / "resumed"), "--device", "cpu", "--num_workers", "0"]))

    full = json.loads((tmp_path / "full" / "results.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert full["best_epoch"] == resumed["best_epoch"]
    for block in ("val", "test", "test_last"):
        for key in METRICS:
            assert resumed[block][key] == pytest.approx(full[block][key], abs=1e-6), (block, key)
    full_log, resumed_log = read_jsonl(tmp_path / "full" / "log.jsonl"), read_jsonl(tmp_path / "resumed" / "log.jsonl")
    assert [r["epoch"] for r in resumed_log] == [1, 2, 3]
    assert [r["train_loss"] for r in resumed_log] == pytest.approx([r["train_loss"] for r in full_log], abs=1e-6)
    a, b = safe_load(tmp_path / "full" / "last.pt")["model"], safe_load(tmp_path / "resumed" / "last.pt")["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    scores, split = make_noise_dataset(tmp_path / "data", 8, 4, 4)
    original = HyperIQASolver.save_checkpoints

    def poison_after_epoch_1(self, is_best):
        original(self, is_best)
        self.loss_fn = lambda pred, target: (pred - target).abs().mean() * float("nan")

    monkeypatch.setattr(HyperIQASolver, "save_checkpoints", poison_after_epoch_1)
    with pytest.raises(NonFiniteLossError, match="epoch 2.*last.pt \\(epoch 1\\)"):
        train_swin.main(cli_args(scores, split, tmp_path / "run", "--epochs", "3", "--train_patch_num", "1",
                                 "--test_patch_num", "1", "--batch_size", "4"))
    ckpt = safe_load(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_rounds_write_per_round_results_and_summary(tmp_path):
    scores, split = make_noise_dataset(tmp_path / "data", 8, 4, 4)
    train_swin.main(cli_args(scores, split, tmp_path / "run", "--epochs", "1", "--train_patch_num", "1",
                             "--test_patch_num", "1", "--train_test_num", "2"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["seed"] for r in results["rounds"]] == [0, 1]
    for k in (1, 2):
        round_results = json.loads((tmp_path / "run" / f"round_{k}" / "results.json").read_text())
        assert set(round_results["test"]) == METRICS
        assert json.loads((tmp_path / "run" / f"round_{k}" / "args.json").read_text())["seed"] == k - 1
    srcc = [r["test"]["srcc"] for r in results["rounds"]]
    assert results["summary"]["test"]["srcc"] == {
        "median": pytest.approx(np.median(srcc)), "mean": pytest.approx(np.mean(srcc)),
        "std": pytest.approx(np.std(srcc, ddof=1)),
    }
