"""The run lifecycle both stages share (iqa.training_run): checkpoint state, resume, non-finite checks,
TensorBoard scalars; and that both entry scripts use it the same way."""
import argparse
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cross_dataset_test
import pretrain_qualiclip
import train_swin
from iqa import distributed, runtime
from iqa.distributed import DistInfo
from iqa.runtime import UserError
from iqa.training_run import (
    LossMonitor, NonFiniteError, ScalarLog, check_finite_weights, read_training_state, resolve_resume,
    restore_training_state, training_state,
)
from qualiclip_pretrain import engine

STAGE1_FORMAT = engine.STATE_FORMAT


def small_run(scaler_enabled=False):
    """A model, optimizer, scheduler and scaler as a script builds them (tiny)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = runtime.cosine_schedule(optimizer, 10, 0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def state_of(parts, epoch=1, rng=None, args=None):
    state = training_state(STAGE1_FORMAT, **parts, epoch=epoch, args=args or argparse.Namespace(lr=1e-3),
                           history=[{"epoch": epoch}], dist_info=DistInfo())
    if rng is not None:
        state["rng"] = rng
    return state


def random_draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def seeded_state(seed):
    runtime.seed_everything(seed)
    return runtime.rng_state()


# ----------------------------------------------------------------------------- scaler and RNG

def test_scaler_state_restores_across_devices():
    """A CPU run (disabled scaler, state {}) resumed with fp16 on CUDA (enabled scaler), and the reverse."""
    saved_disabled = state_of(small_run(scaler_enabled=False))
    assert saved_disabled["scaler"] == {}
    enabled = small_run(scaler_enabled=True)
    restore_training_state(saved_disabled, DistInfo(), **enabled)  # torch alone raises on loading {} here
    assert enabled["scaler"].get_scale() == 65536.0  # a fresh scaler's initial scale

    trained = {**small_run(), "scaler": torch.amp.GradScaler("cpu", init_scale=1024.0)}  # as after overflows
    saved_enabled = state_of(trained)
    assert saved_enabled["scaler"]["scale"] == 1024.0
    disabled = small_run(scaler_enabled=False)
    restore_training_state(saved_enabled, DistInfo(), **disabled)
    assert not disabled["scaler"].is_enabled() and disabled["scaler"].state_dict() == {}

    again = small_run(scaler_enabled=True)
    restore_training_state(saved_enabled, DistInfo(), **again)
    assert again["scaler"].get_scale() == 1024.0


def test_each_rank_restores_its_own_rng_state():
    states = [seeded_state(11), seeded_state(22)]
    expected = []
    for seed in (11, 22):
        runtime.seed_everything(seed)
        expected.append(random_draws())
    assert expected[0] != expected[1]
    state = state_of(small_run(), rng=states)
    for rank in (1, 0):
        runtime.seed_everything(999)
        note = restore_training_state(state, DistInfo(rank=rank, world_size=2), **small_run())
        assert note is None and random_draws() == expected[rank]


def test_rng_streams_restart_when_the_number_of_ranks_changed():
    state = state_of(small_run(), rng=[seeded_state(11), seeded_state(22)])
    runtime.seed_everything(5)
    expected = random_draws()
    parts = small_run()
    runtime.seed_everything(5)
    note = restore_training_state(state, DistInfo(), **parts)
    assert "2 process(es)" in note and "resumes on 1" in note
    assert random_draws() == expected  # this rank's own seeding was left alone


def save_state_on_two_ranks(rank, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        parts = small_run()
        runtime.seed_everything(100 + rank)
        state = training_state(STAGE1_FORMAT, **parts, epoch=3, args=argparse.Namespace(), history=[],
                               dist_info=DistInfo(rank=rank, world_size=2))
        if rank == 0:
            torch.save(state, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_training_state_gathers_the_rng_state_of_every_rank(tmp_path):
    out = tmp_path / "last.pt"
    mp.spawn(save_state_on_two_ranks, args=(str(tmp_path / "init"), str(out)), nprocs=2)
    state = read_training_state(out, STAGE1_FORMAT, "pretrain_qualiclip.py")
    assert len(state["rng"]) == 2 and state["epoch"] == 3
    for rank in (0, 1):
        runtime.seed_everything(100 + rank)
        expected = random_draws()
        restore_training_state(state, DistInfo(rank=rank, world_size=2), **small_run())
        assert random_draws() == expected


# ----------------------------------------------------------------------------- reading checkpoints

def test_a_stage1_checkpoint_of_the_earlier_format_is_upgraded(tmp_path):
    """Format qualiclip-pretrain-state/1 counted epochs from 0 and held rank 0's RNG state only."""
    parts = small_run()
    old = state_of(parts, epoch=0, args=argparse.Namespace(no_imagenet_pretrained=True, lr=1e-3))
    old.update(format="qualiclip-pretrain-state/1", rng=seeded_state(7))
    torch.save(old, tmp_path / "last.pt")
    state = read_training_state(tmp_path / "last.pt", STAGE1_FORMAT, "pretrain_qualiclip.py")
    assert state["format"] == STAGE1_FORMAT and state["epoch"] == 1
    assert state["args"] == {"imagenet_pretrained": False, "lr": 1e-3}
    runtime.seed_everything(7)
    expected = random_draws()
    restore_training_state(state, DistInfo(), **small_run())
    assert random_draws() == expected


def test_a_checkpoint_of_the_other_stage_is_refused(tmp_path):
    torch.save({**state_of(small_run()), "format": "swin-hyperiqa/1"}, tmp_path / "last.pt")
    with pytest.raises(UserError, match=r"last.pt' is not a pretrain_qualiclip.py checkpoint \(format 'swin-hyperiqa/1'\)"):
        read_training_state(tmp_path / "last.pt", STAGE1_FORMAT, "pretrain_qualiclip.py")


# ----------------------------------------------------------------------------- resume resolution

def stage1_run_dir(tmp_path, *flags, legacy=False):
    """A Stage-1 run directory holding only the args.json a run of ``flags`` writes."""
    args = pretrain_qualiclip.get_args_parser().parse_args(["--image_dir", "imgs", *flags])
    pretrain_qualiclip.check_args(args)
    stored = vars(args)
    if legacy:  # as written before --no_imagenet_pretrained had the dest imagenet_pretrained
        stored["no_imagenet_pretrained"] = not stored.pop("imagenet_pretrained")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "args.json").write_text(json.dumps(stored))
    return run_dir


@pytest.mark.parametrize("legacy", [False, True])
def test_resume_keeps_the_runs_settings_and_names_the_ignored_flags(tmp_path, capsys, legacy):
    run_dir = stage1_run_dir(tmp_path, "--lr", "3e-4", "--no_imagenet_pretrained", legacy=legacy)
    command_line = pretrain_qualiclip.get_args_parser().parse_args(
        ["--resume", str(run_dir), "--lr", "1", "--epochs", "3", "--device", "cpu", "--num_workers", "0"])
    resume = resolve_resume(command_line, pretrain_qualiclip.get_args_parser(), "pretrain_qualiclip.py", STAGE1_FORMAT)
    assert capsys.readouterr().out.strip() == ("note: resuming keeps the run's own settings; "
                                               "ignoring --epochs, --lr")
    args = resume.args
    assert (args.lr, args.epochs, args.imagenet_pretrained) == (3e-4, 10, False)
    assert (args.device, args.num_workers, args.resume) == ("cpu", 0, str(run_dir))
    assert resume.run_dir == str(run_dir) and resume.checkpoint is None and resume.state is None


def test_resume_refuses_a_run_of_the_other_script(tmp_path):
    run_dir = stage1_run_dir(tmp_path)
    command_line = train_swin.get_args_parser().parse_args(["--resume", str(run_dir)])
    with pytest.raises(UserError, match="args.json was not written by train_swin.py"):
        resolve_resume(command_line, train_swin.get_args_parser(), "train_swin.py", "swin-hyperiqa/1")


# ----------------------------------------------------------------------------- non-finite values

def test_loss_monitor_reads_back_every_log_every_steps_and_stops_on_nan(tmp_path):
    monitor = LossMonitor(("loss", "aux"), torch.device("cpu"), DistInfo(), 3, epoch=2, run_dir=str(tmp_path),
                          advice="a smaller --lr")
    losses = [1.0, 2.0, 3.0, 4.0, 5.0]
    returned = [monitor.add(torch.tensor(v), torch.tensor(10 * v)) for v in losses]
    assert returned[:2] == [None, None] and returned[3:] == [None, None]
    assert returned[2] == {"loss": 2.0, "aux": 20.0}
    assert monitor.read() == {"loss": 3.0, "aux": 30.0}
    with pytest.raises(NonFiniteError) as raised:
        monitor.add(torch.tensor(float("nan")), torch.tensor(1.0))  # step 6: read back at once
    assert str(raised.value) == (f"training loss (nan) became non-finite at epoch 2, step 6; stopped, keeping last.pt "
                                 f"(epoch 1) in {tmp_path}; restart with a smaller --lr")
    assert isinstance(raised.value, UserError)


def test_non_finite_weights_name_the_parameter(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    check_finite_weights(model, 1, str(tmp_path), "x")
    with torch.no_grad():
        model[0].weight[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"weights \(0.weight\) became non-finite at epoch 1; stopped, "
                                             r"no checkpoint was written yet; restart with x"):
        check_finite_weights(model, 1, str(tmp_path), "x")


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")


def count_host_reads(monkeypatch):
    """Count reads to the host of float/bool tensors (the loss, features, weights, NaN checks).  Integer
    tensors are left out: the batch's distortion ids and the sampler's order are host tensors already."""
    counter = {"reads": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if self.is_floating_point() or self.dtype == torch.bool:
                counter["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


@pytest.mark.parametrize("log_every", [2, 3])
def test_stage1_epoch_reads_the_device_only_every_log_every_steps(tmp_path, monkeypatch, log_every):
    from PIL import Image

    from models.quality_encoder import QualityEncoder
    from qualiclip_pretrain.pretrain_dataset import PretrainDataset
    from qualiclip_pretrain.qualiclip_loss import build_loss

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(paths[-1])
    args = argparse.Namespace(seed=0, batch_size=1, num_workers=0, degrade_on="device", channels_last=False,
                              grad_accum=1, clip_grad=None, log_every=log_every, epochs=1, save_dir=str(tmp_path))
    info = DistInfo()
    loader = engine.make_train_loader(PretrainDataset(paths, 32, ["blur", "noise"], 2, "device", 0), args, info)
    encoder = QualityEncoder("nano", text_dim=8, imagenet_pretrained=False, img_size=32)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=1e-3)  # AdamW on CPU reads its step counts itself
    run = engine.RunContext(info, None, [0, 4], ScalarLog(str(tmp_path), False))
    text = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    reads = count_host_reads(monkeypatch)
    stats = engine.train_one_epoch(encoder, loader, build_loss("simplified"), text, optimizer,
                                   runtime.cosine_schedule(optimizer, 6, 0.1), runtime.make_grad_scaler(info.device, None),
                                   1, args, run)
    monkeypatch.undo()
    assert len(loader) == 6 and all(math.isfinite(v) for v in stats.values())
    assert reads["reads"] == 6 // log_every + 1  # the read-backs every log_every steps, and the epoch's end


# ----------------------------------------------------------------------------- both entry scripts

@pytest.mark.parametrize("script, work, argv", [(pretrain_qualiclip, "train", []), (train_swin, "train", []),
                                                (cross_dataset_test, "run", ["--checkpoint", "x.pt", "--datasets", "spaq=x"])])
def test_main_leaves_the_process_group_even_when_its_work_fails(script, work, argv, monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "init_distributed", lambda device: calls.append(("init", device)) or DistInfo())
    monkeypatch.setattr(distributed, "cleanup_distributed", lambda: calls.append("cleanup"))

    def fail(args, dist_info):
        calls.append("work")
        raise UserError("stopped")

    monkeypatch.setattr(script, work, fail)
    with pytest.raises(UserError, match="stopped"):
        script.main(script.get_args_parser().parse_args(argv + ["--device", "cpu"]))
    assert calls == [("init", "cpu"), "work", "cleanup"]


def read_scalars(directory):
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_scalar_log_writes_the_numbers_of_an_epoch_record(tmp_path):
    log = ScalarLog(str(tmp_path), enabled=True)
    assert not (tmp_path / "tensorboard").exists()  # nothing written before the first scalar
    log.add_record({"epoch": 2, "train_loss": 0.25, "lr": {"encoder": 1e-4}, "val": {"srcc": 0.5, "n": 8},
                    "level_ranking_accuracy": {"overall": 0.75}, "is_best": True, "note": "text"})
    log.add({"loss": 0.5}, 7, prefix="step/")
    log.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars == {"train_loss": [(2, 0.25)], "lr/encoder": [(2, pytest.approx(1e-4))], "val/srcc": [(2, 0.5)],
                       "val/n": [(2, 8.0)], "level_ranking_accuracy/overall": [(2, 0.75)], "step/loss": [(7, 0.5)]}
    ScalarLog(str(tmp_path / "off"), enabled=False).add({"loss": 1.0}, 1)
    assert not (tmp_path / "off").exists()
