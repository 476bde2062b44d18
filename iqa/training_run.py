"""What a training run of either stage shares, from its first checkpoint to its resumption.

* **Training state** (``last.pt``; Stage 2's ``best.pt`` too): ``format``, ``model``, ``optimizer``,
  ``scheduler``, ``scaler``, ``epoch`` (1-based: the last epoch completed), ``args`` (a dict), ``rng``
  (``runtime.rng_state()`` of every rank, index = rank), ``history`` (the ``log.jsonl`` records) and the
  stage's extras (Stage 2: ``best``, ``mos_bounds``).  ``training_state`` is collective (it gathers the
  RNG states of all ranks); ``save_training_state`` writes atomically on rank 0.
  ``restore_training_state`` loads the scaler only where one was saved enabled (fp16 on CUDA) and
  gives each rank its own RNG state.
* **Resume**: ``resolve_resume`` turns ``--resume RUN_DIR_OR_CHECKPOINT`` into the run's own settings
  (its ``args.json``); only ``RESUME_OVERRIDABLE`` flags come from the command line, any other flag
  given there is named in an "ignoring" note.
* **Non-finite values**: ``LossMonitor`` keeps an epoch's loss sums on the device and reads them back
  (averaged over ranks) only every ``--log_every`` steps and at the end of the epoch, never per step;
  a NaN/inf step leaves its mark in the sums.  ``check_finite_weights`` runs after each epoch, before
  the checkpoint.  Both stop the run with ``NonFiniteError``; the last good checkpoint is kept.
* **TensorBoard**: ``ScalarLog`` writes scalars under ``<run>/tensorboard/`` (rank 0, ``--tensorboard``).
"""
import json
import math
import os
import re
from typing import NamedTuple, Optional

import torch

from iqa.distributed import all_gather_objects, all_reduce_mean, barrier
from iqa.runtime import UserError, atomic_torch_save, rng_state, safe_load, set_rng_state

# Flags that may differ between a run and its resumption: where/how it runs, not what it computes.
RESUME_OVERRIDABLE = ("resume", "device", "num_workers")
# Stage-1 last.pt of earlier versions: epoch counted from 0, rank 0's RNG state only.  Still resumed.
ZERO_BASED_FORMATS = {"qualiclip-pretrain-state/1": "qualiclip-pretrain-state/2"}


# ----------------------------------------------------------------------------- training state

def training_state(fmt, *, model, optimizer, scheduler, scaler, epoch, args, history, dist_info, **extras):
    """The checkpoint dict of a run after ``epoch`` (1-based).  Every rank must call it: it gathers
    each rank's RNG state."""
    return {
        "format": fmt, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
        "args": dict(vars(args)), "rng": all_gather_objects(rng_state(), dist_info), "history": list(history),
        **extras,
    }


def save_training_state(state, paths, dist_info):
    """Rank 0 writes ``state`` to each of ``paths`` in order (atomically); every rank waits for it."""
    if dist_info.is_main:
        for path in paths:
            atomic_torch_save(state, path)
    barrier(dist_info)


def upgrade_args(saved):
    """Saved settings under this version's names: ``no_imagenet_pretrained`` became ``imagenet_pretrained``."""
    saved = dict(saved)
    if "no_imagenet_pretrained" in saved:
        saved["imagenet_pretrained"] = not saved.pop("no_imagenet_pretrained")
    return saved


def read_training_state(path, fmt, script):
    """A ``last.pt``/``best.pt`` of ``script`` (format ``fmt``), a Stage-1 one of an earlier version upgraded."""
    state = safe_load(path, "--resume checkpoint")
    found = state.get("format") if isinstance(state, dict) else None
    if found != fmt and ZERO_BASED_FORMATS.get(found) != fmt:
        raise UserError(f"--resume '{path}' is not a {script} checkpoint (format {found!r}); pass a {script} "
                        f"run directory or its last.pt")
    if found != fmt:
        state = {**state, "format": fmt, "epoch": state["epoch"] + 1, "rng": [state["rng"]]}
    return {**state, "args": upgrade_args(state["args"])}


def restore_training_state(state, dist_info, *, model, optimizer, scheduler, scaler):
    """Load ``state`` into the run's objects and this rank's RNG; returns a note for the log, or None."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # A disabled scaler (no fp16 on CUDA) saves {}; an enabled one cannot load that and starts afresh.
    # An enabled scaler's state is ignored by a disabled one.
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) != dist_info.world_size:
        return (f"note: the run was saved by {len(state['rng'])} process(es) and resumes on "
                f"{dist_info.world_size}; the random streams restart from --seed")
    set_rng_state(state["rng"][dist_info.rank])
    return None


# ----------------------------------------------------------------------------- resume

class ResumePoint(NamedTuple):
    args: object              # the run's own settings (argparse.Namespace)
    run_dir: str
    checkpoint: Optional[str]  # the checkpoint file --resume named, if it named one
    state: Optional[dict]     # that checkpoint, read and checked


def restore_args(args, saved):
    """Continue a run with its own saved settings; only ``RESUME_OVERRIDABLE`` flags come from the command line."""
    merged = dict(saved)
    merged.update({k: getattr(args, k) for k in RESUME_OVERRIDABLE if hasattr(args, k)})
    for key, value in vars(args).items():
        merged.setdefault(key, value)
    return type(args)(**merged)


def resolve_resume(args, parser, script, fmt, *, subrun=None, upgrade=None):
    """``args.resume`` (a run directory or one of its checkpoints) -> ``ResumePoint``.

    A checkpoint file is read and checked first; then the run's ``args.json``, which must hold only
    settings ``parser`` knows.  ``subrun``: a pattern of sub-run folder names (Stage 2's rounds) whose
    parent is the run.  ``upgrade``: the stage's own fix-ups of older ``args.json`` files.
    """
    path = args.resume
    state = None
    if os.path.isfile(path):
        state = read_training_state(path, fmt, script)
        run_dir, checkpoint = os.path.dirname(os.path.abspath(path)), path
    elif os.path.isdir(path):
        run_dir, checkpoint = os.path.abspath(path), None
    else:
        raise UserError(f"--resume '{path}' does not exist; pass a {script} run directory or its last.pt")
    parent = os.path.dirname(run_dir)
    if subrun and re.fullmatch(subrun, os.path.basename(run_dir)) and os.path.isfile(os.path.join(parent, "args.json")):
        run_dir = parent
    args_path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(args_path):
        raise UserError(f"--resume '{path}': no args.json in {run_dir}; it is not a {script} run directory")
    try:
        with open(args_path) as f:
            stored = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--resume '{path}': cannot read {args_path} ({err}); pass a {script} run directory") from None
    defaults = vars(parser.parse_args([]))
    if isinstance(stored, dict):
        stored = upgrade_args(stored)
        if upgrade:
            stored = upgrade(stored)
    # Settings this script does not know mean another script's run (e.g. a Stage-1 directory).
    foreign = sorted(set(stored) - set(defaults)) if isinstance(stored, dict) else ["<not a JSON object>"]
    if foreign:
        raise UserError(f"--resume '{path}': {args_path} was not written by {script} (unknown settings: "
                        f"{', '.join(foreign[:5])}); pass a {script} run directory")
    ignored = [k for k, v in vars(args).items()
               if k not in RESUME_OVERRIDABLE and v != defaults.get(k) and v != stored.get(k)]
    if ignored:
        print(f"note: resuming keeps the run's own settings; ignoring --{', --'.join(ignored)}")
    return ResumePoint(restore_args(args, stored), run_dir, checkpoint, state)


# ----------------------------------------------------------------------------- non-finite values

class NonFiniteError(UserError):
    """The loss or the weights became NaN/inf; the run stopped, its last good checkpoint kept."""


def non_finite_error(what, epoch, run_dir, advice, step=None):
    where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
    kept = f"keeping last.pt (epoch {epoch - 1}) in {run_dir}" if epoch > 1 else "no checkpoint was written yet"
    return NonFiniteError(f"{what} became non-finite at {where}; stopped, {kept}; restart with {advice}")


def first_nonfinite_parameter(module):
    """Name of a parameter holding NaN/inf, or None: checked before a checkpoint replaces the last
    good one (the last step of an epoch can blow the weights up before any loss shows it)."""
    named = [(name, p) for name, p in module.named_parameters() if p.is_floating_point()]
    if not named:
        return None
    finite = torch.stack([p.detach().isfinite().all() for _, p in named]).cpu()  # one device sync
    bad = (~finite).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


def check_finite_weights(module, epoch, run_dir, advice):
    bad = first_nonfinite_parameter(module)
    if bad is not None:
        raise non_finite_error(f"weights ({bad})", epoch, run_dir, advice)


class LossMonitor:
    """Sums of one epoch's loss terms ``names``, kept on ``device``.

    ``add`` never reads the device: every ``log_every``-th call it returns ``read()``, else None.
    ``read`` is one host sync: the means so far, averaged over ranks (so every rank must call it at
    the same step); a NaN/inf in them raises ``NonFiniteError``.
    """

    def __init__(self, names, device, dist_info, log_every, *, epoch, run_dir, advice):
        self.names = tuple(names)
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.steps = 0
        self.dist, self.log_every = dist_info, log_every
        self.epoch, self.run_dir, self.advice = epoch, run_dir, advice

    def add(self, *values):
        self.sums += torch.stack([v.detach().double() for v in values])
        self.steps += 1
        return self.read() if self.steps % self.log_every == 0 else None

    def read(self):
        means = all_reduce_mean(dict(zip(self.names, (self.sums / max(1, self.steps)).tolist())), self.dist)
        bad = [name for name in self.names if not math.isfinite(means[name])]
        if bad:
            raise non_finite_error(f"training {bad[0]} ({means[bad[0]]})", self.epoch, self.run_dir, self.advice,
                                   step=self.steps)
        return means


# ----------------------------------------------------------------------------- TensorBoard

def tensorboard_writer_class():
    """``SummaryWriter``, or a one-line error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(it is in requirements.txt)") from None
    return SummaryWriter


def scalars(values, prefix=""):
    """``(tag, number)`` for every number in nested dicts, tags joined with '/' (booleans left out)."""
    for key, value in values.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, value


class ScalarLog:
    """TensorBoard scalars under ``<run_dir>/tensorboard/``; a no-op unless ``enabled`` (rank 0 with
    --tensorboard).  The event file is created by the first ``add``: constructing one writes nothing."""

    def __init__(self, run_dir, enabled):
        self.directory = os.path.join(run_dir, "tensorboard")
        self.enabled = enabled
        self.writer = None

    def add(self, values, step, prefix=""):
        """Every number in ``values`` (e.g. an epoch record; nested dicts become 'val/srcc') at ``step``."""
        if not self.enabled:
            return
        if self.writer is None:
            self.writer = tensorboard_writer_class()(self.directory)
        for tag, value in scalars(values, prefix):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def add_record(self, record):
        """Every number of an epoch record (losses, learning rates, validation metrics, ...) at its epoch."""
        self.add({key: value for key, value in record.items() if key != "epoch"}, record["epoch"])

    def close(self):
        if self.writer is not None:
            self.writer.close()
