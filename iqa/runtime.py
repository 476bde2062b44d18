"""Shared run-time helpers for every entry script.

One place for: user-facing errors, safe checkpoint I/O (atomic writes, ``weights_only`` loads),
run directories and their logs, device and mixed-precision selection, the optimizer and the
per-iteration cosine schedule, seeding and RNG state.  DDP lives in ``iqa.distributed``, what a
training run does with these (checkpoints, resume, non-finite checks) in ``iqa.training_run``,
the ImageNet normalisation beside the data in ``iqa.patches``.
"""
import contextlib
import datetime
import json
import math
import os
import pickle
import random
import re
import sys
import tempfile

import numpy as np
import torch

class UserError(Exception):
    """An expected mistake (bad flag, missing file, ...): reported in one line, no traceback."""


def run_cli(main, args):
    """Run ``main(args)``; expected mistakes exit with status 2 and a one-line message."""
    try:
        return main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


# ----------------------------------------------------------------------------- file I/O

TEMP_PREFIX = ".tmp-"  # temp files of atomic writes; a SIGKILL mid-save can leave one behind


def _atomic_write(path, write_fn, mode):
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    """``torch.save`` through a temp file + rename: a kill mid-save leaves the old file intact."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_binary(path, write_fn):
    """``write_fn(f)`` into a binary temp file beside ``path``, then rename it over ``path``."""
    _atomic_write(path, write_fn, "wb")


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def append_text(path, text):
    """Append ``text`` and force it to disk: a killed run loses nothing it reported as written."""
    with open(path, "a", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def append_jsonl(path, record):
    """Append one JSON line (``log.jsonl``) with ``append_text``."""
    append_text(path, json.dumps(to_jsonable(record)) + "\n")


def write_jsonl(path, records):
    """Replace ``log.jsonl`` atomically with ``records``: on resume the log is rebuilt from the
    checkpoint's history, so an epoch logged but not checkpointed (or the reverse) before a kill
    is neither lost nor duplicated."""
    atomic_write_text(path, "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))


def remove_stale_temp_files(directory):
    """Delete temp files that a run killed during an atomic write left in ``directory``."""
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return to_jsonable(obj.tolist())  # through the float case: non-finite values become null
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _unpickling_reason(err):
    """The specific line of torch's weights-only refusal (e.g. 'Unsupported global: GLOBAL exec ...'),
    without its terminal colour codes; else its first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    match = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(?:\s|$)", text)
    reason = match.group(1) if match else (text.splitlines()[0] if text else type(err).__name__)
    return reason[:160]


def checkpoint_format(ckpt):
    """What a loaded file says it is, for error messages: its ``format``, or why it has none."""
    return ckpt.get("format", "no 'format' key") if isinstance(ckpt, dict) else type(ckpt).__name__


def require_format(ckpt, expected, source, what, advice):
    """Refuse ``ckpt`` unless it is a dict of format ``expected``: one line naming the file and ``advice``."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != expected:
        raise UserError(f"'{source}' is not {what} (format {checkpoint_format(ckpt)!r}, expected {expected!r}); "
                        f"{advice}")


def safe_load(path, what="checkpoint"):
    """``torch.load(path, weights_only=True)`` with one-line errors.

    A file that needs arbitrary unpickling (code objects, custom classes) is refused: nothing
    in it runs, because the weights-only unpickler never imports or calls anything.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist; check the path")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} '{path}' is empty (0 bytes); it was not saved completely")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"refusing to load {what} '{path}': it needs arbitrary unpickling, which could run "
            f"code ({_unpickling_reason(err)}); only plain tensors/dicts saved by this project are accepted"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read {what} '{path}': {first[:200]}; is it a complete torch.save file?") from None


# ----------------------------------------------------------------------------- run directories

def timestamp():
    return datetime.datetime.now().strftime("%Y%m%d_%H%M%S")


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_writable_path(path, flag):
    """Fail before any work if ``path`` (a file or folder not made yet, or a folder) cannot be written.

    Writes nothing: the nearest existing entry on the way to ``path`` must be a folder that this
    process may write into.
    """
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} '{path}' cannot be created: '{existing}' is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} '{path}' cannot be created: folder '{existing}' is not writable; choose another path")


def check_output_dir(path, resume=False, flag="--output_dir"):
    """Validate a run directory without writing anything (called before the expensive set-up)."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} '{path}' exists and is not a directory; choose another path")
    if not resume and os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("args.json", "log.jsonl", "results.json", "last.pt")
    ):
        raise UserError(f"{flag} '{path}' already holds a run; choose a new directory or pass --resume {path}")
    check_writable_path(path, flag)


def prepare_output_dir(path, resume=False, flag="--output_dir"):
    """Create a run directory; refuse one that already holds a run unless resuming."""
    path = os.fspath(path)
    check_output_dir(path, resume, flag)
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as err:
        raise UserError(f"{flag} '{path}' is not writable ({err.strerror}); pass a writable {flag}") from None
    if resume:
        remove_stale_temp_files(path)
    return path


def save_args(run_dir, args):
    atomic_write_json(os.path.join(run_dir, "args.json"), vars(args))


# ----------------------------------------------------------------------------- device

def resolve_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device '{name}' is not one of auto, cuda, cpu")


# ----------------------------------------------------------------------------- precision

def amp_dtype(amp, device):
    """``--amp`` flag -> autocast dtype (None = off). ``auto`` means bf16 on CUDA, off on CPU."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device, dtype):
    """A loss scaler is only needed for fp16; disabled otherwise (its state still round-trips)."""
    return torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16 and device.type == "cuda"))


def make_adamw(param_groups, device, **kwargs):
    """AdamW, fused on CUDA (one kernel for all parameters)."""
    return torch.optim.AdamW(param_groups, fused=(device.type == "cuda"), **kwargs)


# ----------------------------------------------------------------------------- schedule / RNG

def cosine_schedule(optimizer, total_steps, final_ratio, warmup_steps=0):
    """Per-iteration cosine from each group's own LR down to ``final_ratio`` × that LR."""
    total_steps = max(1, int(total_steps))

    def factor(step):
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state():
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return _rng_to_tensors(state)


def set_rng_state(state):
    random.setstate(_python_rng_from_tensor(state["python"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _rng_to_tensors(state):
    # weights_only loads accept tensors and plain containers, so RNG states are stored as such.
    version, internal, gauss = state["python"]
    np_state = state["numpy"]
    out = {
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def _python_rng_from_tensor(t):
    values = t.tolist()
    return (values[0], tuple(values[1:]), None)
