"""Helpers for the tests: the repository root, running the real CLIs, checking their refusals, a KonIQ
split file with few training images."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "run_qualiclip_experiments.sh")


def run_command(argv, env=None, timeout=600, cwd=ROOT):
    """Run ``argv`` offline and unbuffered, output captured as text; returns CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(list(map(str, argv)), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def run_cli(*args, env=None, timeout=600, cwd=ROOT):
    """Run ``python args...``; a relative script path is taken from the repository root, whatever ``cwd``."""
    if args and str(args[0]).endswith(".py"):
        args = (os.path.join(ROOT, args[0]), *args[1:])
    return run_command([sys.executable, *args], env=env, timeout=timeout, cwd=cwd)


def run_pipeline(*args, env=None, timeout=900, cwd=ROOT):
    """Run ``run_qualiclip_experiments.sh --python <this python> args...``."""
    return run_command(["bash", PIPELINE, "--python", sys.executable, *args], env=env, timeout=timeout, cwd=cwd)


def assert_user_error(result, *fragments):
    """Non-zero exit, a one-line 'error:' message containing ``fragments``, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_small_train_split(koniq_root, path, n_train=2):
    """Write a --split_file keeping the validation and test images of the KonIQ-10k folder ``koniq_root``
    but only ``n_train`` of its training images (one Stage-1 step at --batch_size n_train); returns it."""
    from iqa.datasets import read_index

    samples = read_index("koniq-10k", str(koniq_root))
    split = {name: [os.path.basename(s.path) for s in samples if s.split == name] for name in ("train", "val", "test")}
    split["train"] = split["train"][:n_train]
    with open(path, "w") as f:
        json.dump(split, f)
    return split
