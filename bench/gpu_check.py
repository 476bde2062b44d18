"""One command that runs every CUDA path of both training stages and measures them (``make gpu-check``).

    python bench/gpu_check.py [--device cuda|cpu] [--quick] [--checks NAME ...] [--budget_s 480]
                              [--out bench/results/<device>.json] [--workdir DIR]

Each check is a subprocess with its own timeout and log file; a failing check never stops the
others. The checks, in the order they run (the most important first, so that a spent time budget
skips the least important):

* ``stage1`` / ``stage2``: ``pretrain_qualiclip.py`` / ``train_swin.py`` end to end for two epochs
  with Swin-Base (random init) on generated KonIQ-format images, with the defaults (bf16 on CUDA);
  the losses and metrics in ``log.jsonl`` are finite, ``last.pt`` reads back as a training state
  and the encoder ``.pkl`` / ``best.pt`` loads into the scoring API and scores two images finitely.
* ``bench``: ``bench/bench.py`` on the device (Stage-1 end to end, Stage-2 training, peak memory,
  ARNIQA, ...); its rows go into the result file.
* ``stage2_resume``: a Stage-2 run killed (SIGKILL) after its first epoch, then ``--resume``d: it
  says so, and its log ends with every epoch exactly once.
* ``torchrun_stage2`` / ``torchrun_stage1``: both scripts under ``torchrun --nproc_per_node=1``
  (the process group is up even for one process: NCCL on CUDA, gloo on CPU).
* ``stage2_compile`` / ``stage1_compile``: as ``stage2`` / ``stage1`` with ``--compile``; the second
  epoch's time against the eager run's gives ``compile_vs_eager`` (the first epoch compiles).
* ``jpeg_cuda`` (CUDA only): the agreement of ``degradation_generator.cuda_jpeg`` (nvjpeg) with
  PIL (``bench/jpeg_agreement.py``: absolute differences and PSNR per quality), and a one-epoch
  Stage-1 run with ``--jpeg_on cuda``.

The result file (default ``bench/results/<device name>.json``) holds the device, the software
versions, every check (status PASS / FAIL / SKIP, a one-line reason, seconds, log path), the
bench rows, ``compile_vs_eager`` and ``jpeg_cuda``; a Markdown summary for ``bench/RESULTS.md`` is
printed at the end. A failed check makes the exit status 2 (after everything else ran).

``--device cpu --quick`` is the dry run the test suite executes: Swin-nano, 64-pixel Stage-1
crops, one epoch where a check needs no second, no ``--compile`` (minutes of compilation on a CPU).
"""
import argparse
import csv
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench import photo, print_table  # noqa: E402
from iqa import runtime  # noqa: E402
from iqa.runtime import UserError  # noqa: E402
from models.hyperiqa_swin import CHECKPOINT_FORMAT  # noqa: E402
from qualiclip_pretrain.engine import STATE_FORMAT  # noqa: E402

CHECK_NAMES = ("stage1", "stage2", "bench", "stage2_resume", "torchrun_stage2", "torchrun_stage1", "stage2_compile",
               "stage1_compile", "jpeg_cuda")
TARGETS = {  # issue 13's targets on one H100
    "stage1_end_to_end": 3000.0,  # trained crops/s, end to end with data loading
    "stage2_train": 3000.0,       # patches/s
    "stage1_peak_gib": 24 * 1e9 / 2**30,  # 24 GB at 8 images x 2 crops x 5 levels
}


class CheckFailed(Exception):
    """A check's verification failed; the message is the one-line reason."""


# ----------------------------------------------------------------------------- generated data

def write_koniq(root, count, size):
    """A KonIQ-10k layout (scores CSV + 512x384/) of ``count`` photos, each rotated and noised by its
    own amount; the MOS falls with the noise, so the scores are not constant."""
    import numpy as np
    from PIL import Image

    image_dir = os.path.join(root, "512x384")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    base = photo(*size)
    rows = []
    for i in range(count):
        sigma = 40.0 * i / max(1, count - 1)
        pixels = np.asarray(base.rotate(i * 13 % 360), dtype=np.float64)
        noisy = np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)
        name = f"{i:05d}.jpg"
        Image.fromarray(noisy).save(os.path.join(image_dir, name), quality=90)
        rows.append((name, round(4.5 - 3.0 * i / max(1, count - 1), 4)))
    with open(os.path.join(root, "koniq10k_scores_and_distributions.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_name", "MOS"])
        writer.writerows(rows)
    return [os.path.join(image_dir, name) for name, _ in rows]


def write_anchors(path, dim=1024):
    """Fixed random (2, dim) text anchors: the checks never load CLIP."""
    generator = torch.Generator().manual_seed(0)
    torch.save(torch.nn.functional.normalize(torch.randn(2, dim, generator=generator), dim=1), path)
    return path


# ----------------------------------------------------------------------------- running a check

@dataclass
class Check:
    name: str
    run: Callable          # run(context, log_path, timeout_s, name) -> dict of details; raises CheckFailed
    timeout_s: float
    skip_reason: str = ""  # non-empty: not run, reported as SKIP


def start_logged(argv, log):
    """``argv`` in its own process group, stdout and stderr to the open file ``log``, offline, unbuffered."""
    return subprocess.Popen(list(map(str, argv)), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"},
                            start_new_session=True)


def stop(process):
    """End ``process``'s group: SIGTERM first (torchrun then stops its workers, which run in sessions of
    their own), SIGKILL after 15 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_logged(argv, log_path, timeout_s):
    """Run ``argv`` with stdout and stderr appended to ``log_path``; stopped (``stop``) at ``timeout_s``.
    Returns the log text of this run; a non-zero exit raises CheckFailed."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(map(str, argv))}\n")
        log.flush()
        start = log.tell()
        process = start_logged(argv, log)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop(process)
            raise CheckFailed(f"timed out after {timeout_s:.0f} s") from None
    with open(log_path) as log:
        log.seek(start)
        text = log.read()
    if returncode != 0:
        raise CheckFailed(f"exit status {returncode}: {last_error_line(text)}")
    return text


def last_error_line(text):
    """The line that says what went wrong: an 'error:' line, else the last line of a traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^[\w.]*(Error|Exception)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def read_log(run_dir):
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise CheckFailed(f"no log.jsonl in {run_dir}")
    return runtime.read_jsonl(path)


def numbers_in(value, prefix=""):
    """(name, number) of every number in nested dicts/lists (None stands for a non-finite float)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers_in(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers_in(item, f"{prefix}{i}.")
    elif value is None or (isinstance(value, float) and not math.isfinite(value)):
        yield prefix.rstrip("."), float("nan")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield prefix.rstrip("."), float(value)


def check_log(run_dir, epochs, keys):
    """The run's log has epochs 1..``epochs`` once each and every number under ``keys`` is finite."""
    log = read_log(run_dir)
    found = [record.get("epoch") for record in log]
    if found != list(range(1, epochs + 1)):
        raise CheckFailed(f"log.jsonl epochs {found}, expected 1..{epochs}")
    for record in log:
        for key in keys:
            if key not in record:
                raise CheckFailed(f"log.jsonl epoch {record['epoch']} has no {key!r}")
            bad = [name for name, number in numbers_in(record[key], f"{key}.") if not math.isfinite(number)]
            if bad:
                raise CheckFailed(f"non-finite {bad[0]} at epoch {record['epoch']}")
    return log


def check_reload(context, run_dir, scored_file, state_format, script):
    """``last.pt`` reads back as a training state; ``scored_file`` loads into the scoring API and
    gives finite scores for two images."""
    from iqa.scoring import load_scorer
    from iqa.training_run import read_training_state
    from torchvision.io import read_image

    read_training_state(os.path.join(run_dir, "last.pt"), state_format, script)
    scorer = load_scorer(scored_file, device=context.device)
    scores = scorer([read_image(path) for path in context.images[:2]])
    del scorer
    if context.device.type == "cuda":
        torch.cuda.empty_cache()
    if len(scores) != 2 or not all(math.isfinite(float(s)) for s in scores):
        raise CheckFailed(f"{os.path.basename(scored_file)} scores {list(map(float, scores))} are not two finite "
                          f"numbers")
    return [round(float(s), 4) for s in scores]


# ----------------------------------------------------------------------------- the checks

class Context:
    """The device, the generated data and the size of every run."""

    def __init__(self, args, workdir):
        self.device = runtime.resolve_device(args.device)
        self.quick = args.quick
        self.workdir = workdir
        cuda = self.device.type == "cuda"
        self.koniq = os.path.join(workdir, "koniq-10k")
        # 70/10/20 split: Stage 1 trains on the 70%, validates zero-shot on the 10%.
        self.images = write_koniq(self.koniq, 96 if cuda else 16, (512, 384) if cuda else (320, 240))
        self.anchors = write_anchors(os.path.join(workdir, "anchors.pt"))
        self.size = "nano" if args.quick else "base"
        self.workers = str(min(8, os.cpu_count() or 1)) if cuda else "0"

    def stage1_argv(self, save_dir, epochs, *extra):
        # --quick on the CPU (11 training images): one step per epoch, the last partial batch dropped
        quick = ["--crop_size", "64", "--num_levels", "2", "--batch_size", "8", "--eval_patch_num", "1",
                 "--level_eval_images", "2"] if self.quick else ["--batch_size", "8", "--level_eval_images", "8"]
        return ["pretrain_qualiclip.py", "--data_root", self.koniq, "--text_features", self.anchors,
                "--model_size", self.size, "--no_imagenet_pretrained", "--epochs", str(epochs),
                "--num_workers", self.workers, "--device", self.device.type, "--log_every", "1",
                "--save_dir", save_dir, *quick, *extra]

    def stage2_argv(self, output_dir, epochs, *extra):
        # --quick on the CPU: one step per epoch
        sizes = (["--batch_size", "16", "--train_patch_num", "1", "--test_patch_num", "1"] if self.quick
                 else ["--batch_size", "32", "--train_patch_num", "4", "--test_patch_num", "2"])
        return ["train_swin.py", "--dataset", "koniq-10k", "--data_root", self.koniq, "--model_size", self.size,
                "--no_imagenet_pretrained", "--epochs", str(epochs), "--num_workers", self.workers,
                "--device", self.device.type, "--log_every", "1", "--output_dir", output_dir, *sizes, *extra]

    def python(self, argv):
        return [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]]

    def torchrun(self, argv):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                os.path.join(ROOT, argv[0]), *argv[1:]]

    def run_dir(self, name):
        return os.path.join(self.workdir, name)


def stage1_check(epochs, *extra, launcher="python"):
    def run(context, log_path, timeout_s, name):
        save_dir = context.run_dir(name)
        argv = context.stage1_argv(save_dir, epochs, *extra)
        text = run_logged(getattr(context, launcher)(argv), log_path, timeout_s)
        log = check_log(save_dir, epochs, ("train_loss", "train_cons", "train_pos", "train_neg", "val"))
        pkl = os.path.join(save_dir, f"swin_{context.size}_qualiclip_pretrained.pkl")
        scores = check_reload(context, save_dir, pkl, STATE_FORMAT, "pretrain_qualiclip.py")
        if launcher == "torchrun":
            expect_backend(text, context)
        return {"epoch_time_s": [round(r["time_s"], 3) for r in log], "zero_shot_scores": scores,
                "final_loss": log[-1]["train_loss"]}
    return run


def stage2_check(epochs, *extra, launcher="python"):
    def run(context, log_path, timeout_s, name):
        run_dir = context.run_dir(name)
        text = run_logged(getattr(context, launcher)(context.stage2_argv(run_dir, epochs, *extra)), log_path,
                          timeout_s)
        log = check_log(run_dir, epochs, ("train_loss", "val"))
        results = check_results(run_dir)
        scores = check_reload(context, run_dir, os.path.join(run_dir, "best.pt"), CHECKPOINT_FORMAT,
                              "train_swin.py")
        if launcher == "torchrun":
            expect_backend(text, context)
        return {"epoch_time_s": [r["epoch_time_s"] for r in log], "test_srcc": results["test"]["srcc"],
                "scores": scores}
    return run


def check_results(run_dir):
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise CheckFailed(f"no results.json in {run_dir}")
    with open(path) as f:
        results = json.load(f)
    bad = [name for name, number in numbers_in(results.get("test", {}), "test.") if not math.isfinite(number)]
    if bad:
        raise CheckFailed(f"results.json: non-finite {bad[0]}")
    return results


def expect_backend(text, context):
    backend = "nccl" if context.device.type == "cuda" else "gloo"
    if f"backend {backend}" not in text:
        raise CheckFailed(f"no 'backend {backend}' line: the process group was not initialised under torchrun")


def wait_for_epochs(run_dir, process, count, timeout_s):
    """Poll ``log.jsonl`` until it holds ``count`` epochs; False if the process ended first."""
    path = os.path.join(run_dir, "log.jsonl")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.isfile(path) and len(runtime.read_jsonl(path)) >= count:
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def stage2_resume_check(epochs):
    def run(context, log_path, timeout_s, name):
        run_dir = context.run_dir(name)
        deadline = time.monotonic() + timeout_s
        with open(log_path, "a") as log:
            process = start_logged(context.python(context.stage2_argv(run_dir, epochs)), log)
            reached = wait_for_epochs(run_dir, process, 1, timeout_s / 2)
            os.killpg(process.pid, signal.SIGKILL)  # a hard kill: no chance to save anything
            process.wait()
        if not reached:
            raise CheckFailed("the run ended or stalled before its first epoch was logged")
        killed_after = len(read_log(run_dir))
        if killed_after >= epochs:
            raise CheckFailed(f"the run finished all {epochs} epochs before the kill; nothing to resume")
        text = run_logged(context.python(["train_swin.py", "--resume", run_dir, "--num_workers", context.workers,
                                          "--device", context.device.type]),
                          log_path, max(1.0, deadline - time.monotonic()))
        if f"after epoch {killed_after}" not in text:
            raise CheckFailed(f"the resumed run does not say it continues after epoch {killed_after}")
        check_log(run_dir, epochs, ("train_loss", "val"))
        check_results(run_dir)
        return {"killed_after_epoch": killed_after, "epochs": epochs}
    return run


def bench_check(context, log_path, timeout_s, name):
    out = os.path.join(context.workdir, "bench.json")
    extra = ["--quick", "--rows", "stage2_sampling"] if context.quick else []  # bench's own test runs every row
    run_logged([sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--device", context.device.type,
                "--out", out, *extra], log_path, timeout_s)
    with open(out) as f:
        rows = json.load(f)
    bad = [r["name"] for r in rows if not (r["baseline_per_s"] > 0 and r["ours_per_s"] > 0)]
    if bad:
        raise CheckFailed(f"bench row {bad[0]} has a rate that is not positive")
    return {"rows": rows}


def jpeg_cuda_check(context, log_path, timeout_s, name):
    deadline = time.monotonic() + timeout_s
    out = os.path.join(context.workdir, "jpeg_cuda.json")
    run_logged([sys.executable, os.path.join(ROOT, "bench", "jpeg_agreement.py"), "--out", out], log_path, timeout_s)
    with open(out) as f:
        agreement = json.load(f)
    stage1 = stage1_check(1, "--jpeg_on", "cuda", "--degrade_on", "device")(
        context, log_path, max(1.0, deadline - time.monotonic()), name)
    return {**agreement, "stage1_jpeg_on_cuda": stage1}


def build_checks(context):
    cuda = context.device.type == "cuda"
    epochs = 1 if context.quick else 2
    no_compile = "--quick on a CPU: torch.compile takes minutes there" if context.quick and not cuda else ""
    jpeg_skip = "" if cuda else "CUDA only"
    return [
        Check("stage1", stage1_check(epochs), 240),
        Check("stage2", stage2_check(epochs), 240),
        Check("bench", bench_check, 300),
        Check("stage2_resume", stage2_resume_check(2 if context.quick else 6), 240),
        Check("torchrun_stage2", stage2_check(1, launcher="torchrun"), 180),
        Check("torchrun_stage1", stage1_check(1, launcher="torchrun"), 180),
        Check("stage2_compile", stage2_check(2, "--compile"), 300, no_compile),
        Check("stage1_compile", stage1_check(2, "--compile"), 300, no_compile),
        Check("jpeg_cuda", jpeg_cuda_check, 120, jpeg_skip),
    ]


def run_checks(checks, context, log_dir, budget_s):
    """Run every check within ``budget_s`` seconds in all -> one result dict per check."""
    deadline = time.monotonic() + budget_s
    results = []
    for check in checks:
        log_path = os.path.join(log_dir, f"{check.name}.log")
        left = deadline - time.monotonic()
        result = {"name": check.name, "log": log_path}
        if check.skip_reason:
            result.update(status="SKIP", reason=check.skip_reason, seconds=0.0)
        elif left < 10:
            result.update(status="SKIP", reason=f"time budget of {budget_s:.0f} s spent", seconds=0.0)
        else:
            print(f"[gpu-check] {check.name} (timeout {min(check.timeout_s, left):.0f} s, log {log_path})",
                  flush=True)
            start = time.monotonic()
            try:
                details = check.run(context, log_path, min(check.timeout_s, left), check.name)
                result.update(status="PASS", reason="", details=details)
            except CheckFailed as err:
                result.update(status="FAIL", reason=str(err))
            except Exception as err:  # a verification that broke is this check's failure, not the run's
                result.update(status="FAIL", reason=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                              if str(err) else type(err).__name__)
            result["seconds"] = round(time.monotonic() - start, 1)
            reason = f": {result['reason']}" if result["reason"] else ""
            print(f"[gpu-check] {check.name}: {result['status']}{reason} ({result['seconds']} s)", flush=True)
        results.append(result)
    return results


# ----------------------------------------------------------------------------- summary

def compile_vs_eager(results):
    """Per stage: the second epoch's time, eager / compiled (> 1: compile is faster), as the logs record
    it (Stage 1's ``time_s``: training only; Stage 2's ``epoch_time_s``: training and validation)."""
    by_name = {r["name"]: r for r in results if r["status"] == "PASS"}
    out = {}
    for stage in ("stage1", "stage2"):
        eager, compiled = by_name.get(stage), by_name.get(f"{stage}_compile")
        if eager and compiled and len(eager["details"]["epoch_time_s"]) > 1 and \
                len(compiled["details"]["epoch_time_s"]) > 1:
            e, c = eager["details"]["epoch_time_s"][1], compiled["details"]["epoch_time_s"][1]
            out[stage] = {"eager_epoch2_s": e, "compile_epoch2_s": c, "speedup": round(e / c, 3)}
    return out


def device_label(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def target_lines(rows):
    """Issue 13's targets against the bench rows (CUDA)."""
    by_name = {r["name"]: r for r in rows}
    lines = []
    for name, unit in (("stage1_end_to_end", "trained crops/s"), ("stage2_train", "patches/s")):
        if name in by_name:
            value = by_name[name]["ours_per_s"]
            lines.append(f"- {name}: {value:.0f} {unit} (target >= {TARGETS[name]:.0f}: "
                         f"{'met' if value >= TARGETS[name] else 'missed'})")
    peak = by_name.get("stage1_end_to_end", {}).get("ours_peak_gib")
    if peak is not None:
        lines.append(f"- Stage-1 peak memory at 8 images x 2 crops x 5 levels: {peak:.2f} GiB (target <= 24 GB = "
                     f"{TARGETS['stage1_peak_gib']:.2f} GiB: {'met' if peak <= TARGETS['stage1_peak_gib'] else 'missed'})")
    parts = {"input path": by_name.get("stage1_degradation"), "training step": by_name.get("stage1_train")}
    if "stage1_end_to_end" in by_name and all(parts.values()):
        # Where Stage 1's time goes: each half alone (data workers + device degradations; forward/
        # backward/optimizer on resident crops) against the whole; the slower half bounds the whole.
        rates = {part: r["ours_per_s"] for part, r in parts.items()}
        bound = min(rates, key=rates.get)
        lines.append(f"- Stage-1 time: input path alone {rates['input path']:.0f} crops/s (stage1_degradation), "
                     f"training step alone {rates['training step']:.0f} crops/s (stage1_train), end to end "
                     f"{by_name['stage1_end_to_end']['ours_per_s']:.0f}: bound by the {bound}")
    return lines


def markdown(report):
    lines = [f"### {report['device']} ({report['date']}, torch {report['torch']}, CUDA {report['cuda']})", "",
             "| check | result | seconds | reason | log |", "|---|---|---|---|---|"]
    for r in report["checks"]:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {r['reason']} | {os.path.basename(r['log'])} |")
    if report["bench"]:
        lines += ["", "| bench row | baseline/s | ours/s | ratio | ours peak GiB |", "|---|---|---|---|---|"]
        for r in report["bench"]:
            peak = r.get("ours_peak_gib")
            lines.append(f"| {r['name']} ({r.get('unit', '')}) | {r['baseline_per_s']} | {r['ours_per_s']} | "
                         f"{r['ratio']}x | {'' if 'ours_peak_gib' not in r else 'n/a' if peak is None else peak} |")
    for stage, c in report["compile_vs_eager"].items():
        lines.append(f"- {stage} --compile: epoch 2 in {c['compile_epoch2_s']} s against {c['eager_epoch2_s']} s "
                     f"eager ({c['speedup']}x)")
    if report["jpeg_cuda"]:
        lines.append(f"- GPU JPEG against PIL: {json.dumps(report['jpeg_cuda'])}")
    if report["device"].startswith("cpu"):
        return "\n".join(lines)
    return "\n".join(lines + target_lines(report["bench"]))


# ----------------------------------------------------------------------------- main

def get_args_parser():
    p = argparse.ArgumentParser("CUDA checks and measurements of both training stages")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="dry run: Swin-nano, tiny crops, no --compile on a CPU")
    p.add_argument("--checks", nargs="+", choices=CHECK_NAMES, default=list(CHECK_NAMES), metavar="NAME",
                   help=f"checks to run (default all: {', '.join(CHECK_NAMES)})")
    p.add_argument("--budget_s", type=float, default=480.0,
                   help="total seconds; a check that would start after that is skipped")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/<device name>.json)")
    p.add_argument("--workdir", default=None,
                   help="folder for the generated data, the runs and the logs (default: a new temporary folder, "
                        "kept)")
    return p


def main(args):
    device = runtime.resolve_device(args.device)
    label = device_label(device)
    out = args.out or os.path.join(ROOT, "bench", "results", f"{slug(label if device.type == 'cuda' else 'cpu')}.json")
    runtime.check_writable_path(out, "--out")
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-check-")
    log_dir = os.path.join(workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    print(f"[gpu-check] {label}; runs and logs in {workdir}", flush=True)
    context = Context(args, workdir)
    checks = [c for c in build_checks(context) if c.name in args.checks]
    results = run_checks(checks, context, log_dir, args.budget_s)
    bench = next((r for r in results if r["name"] == "bench" and r["status"] == "PASS"), None)
    jpeg = next((r for r in results if r["name"] == "jpeg_cuda" and r["status"] == "PASS"), None)
    report = {
        "device": label, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "quick": args.quick, "workdir": workdir,
        "checks": results, "bench": bench["details"]["rows"] if bench else [],
        "compile_vs_eager": compile_vs_eager(results), "jpeg_cuda": jpeg["details"] if jpeg else {},
    }
    runtime.atomic_write_json(out, report)
    if report["bench"]:
        print_table(report["bench"])
    print("\n" + markdown(report) + "\n", flush=True)
    print(f"[gpu-check] written to {out}", flush=True)
    failed = [r["name"] for r in results if r["status"] == "FAIL"]
    if failed:
        raise UserError(f"{len(failed)} check(s) failed: {', '.join(failed)}; see the logs named above")
    return report


if __name__ == "__main__":
    runtime.run_cli(main, get_args_parser().parse_args())
