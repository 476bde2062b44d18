"""Benchmarks: our input pipelines and training settings against the naive way, in one run.

    python bench/bench.py [--device auto|cpu|cuda] [--quick] [--out bench/results/latest.json]

Four rows, each ``{"name", "device", "baseline_per_s", "ours_per_s", "ratio", ...}``:

* ``stage1_degradation``: degraded crops/s. Baseline = the original per-crop path (tensor ->
  normalise -> PIL -> degrade each level -> tensor -> normalise, one crop at a time). Ours = the
  training path: JPEG with PIL as in the workers, blur/noise/brightness in one batched call on
  the device, normalisation after.
* ``stage2_sampling``: training patches/s. Baseline = decode + resize the file for every patch.
  Ours = slices of the decoded-once uint8 cache (the one-off decode time is reported too).
* ``stage1_train`` / ``stage2_train``: training crops (patches)/s of one optimizer step, plain
  fp32 eager against our settings (bf16 autocast, channels_last, fused AdamW, TF32 on CUDA; on
  CPU the scripts' defaults), and peak GPU memory on CUDA.

On CPU the models are Swin-nano; on CUDA Swin-Base at the guide's batch sizes.
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iqa import runtime  # noqa: E402
from iqa.datasets import Sample  # noqa: E402
from iqa.patches import TrainPatchDataset, cache_images  # noqa: E402
from models.hyperiqa_swin import HyperIQASwin  # noqa: E402
from models.quality_encoder import QualityEncoder  # noqa: E402
from qualiclip_pretrain.degradation_generator import (  # noqa: E402
    DISTORTION_TYPES,
    SyntheticDegradation,
    degrade_batch,
)
from qualiclip_pretrain.qualiclip_loss import SimplifiedQualiCLIPLoss  # noqa: E402

CROP = 224
LEVELS = 5


def photo(width, height):
    """A real photograph (scikit-image's coffee) at ``width``×``height``."""
    from skimage import data

    return Image.fromarray(data.coffee()).resize((width, height), Image.BICUBIC)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Best-of-``repeats`` seconds of ``fn()`` after one warm-up call."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def row(name, device, baseline_per_s, ours_per_s, **extra):
    return {"name": name, "device": device_name(device), "baseline_per_s": round(baseline_per_s, 2),
            "ours_per_s": round(ours_per_s, 2), "ratio": round(ours_per_s / baseline_per_s, 2), **extra}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- stage 1 degradation

def random_crops(image, count, rng):
    array = np.asarray(image)
    h, w = array.shape[:2]
    tops, lefts = rng.integers(0, h - CROP + 1, count), rng.integers(0, w - CROP + 1, count)
    return [Image.fromarray(array[t:t + CROP, s:s + CROP]) for t, s in zip(tops, lefts)]


def naive_degrade(crop, degrader):
    """The original script: normalise, back to PIL (uint8), degrade each level, tensor, normalise."""
    normalised = TF.normalize(TF.to_tensor(crop), runtime.IMAGENET_MEAN, runtime.IMAGENET_STD)
    pil = TF.to_pil_image(normalised.clamp(0, 1))
    return torch.stack([TF.normalize(TF.to_tensor(im), runtime.IMAGENET_MEAN, runtime.IMAGENET_STD)
                        for im in degrader(pil)])


def bench_stage1_degradation(device, n_crops, repeats):
    rng = np.random.default_rng(0)
    crops = random_crops(photo(1024, 768), n_crops, rng)
    types = [DISTORTION_TYPES[i % len(DISTORTION_TYPES)] for i in range(n_crops)]
    degraders = {t: SyntheticDegradation(t, LEVELS, rng=0) for t in DISTORTION_TYPES}

    def baseline():
        return [naive_degrade(c, degraders[t]) for c, t in zip(crops, types)]

    # Ours: workers hand over uint8 crops (JPEG already applied with PIL); the device does the rest.
    def worker_side():
        views = []
        for c, t in zip(crops, types):
            levels = degraders[t](c) if t == "jpeg" else [c] * LEVELS
            views.append(torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in levels]))
        return torch.stack(views)

    type_ids = torch.tensor([DISTORTION_TYPES.index(t) for t in types], device=device).repeat_interleave(LEVELS)
    level_ids = torch.arange(LEVELS, device=device).repeat(n_crops)
    generator = torch.Generator(device=device).manual_seed(0)

    def ours():
        batch = worker_side().to(device, non_blocking=True).flatten(0, 1)
        return runtime.to_model_input(degrade_batch(batch, type_ids, level_ids, generator=generator), device)

    handed_over = worker_side()

    def device_only():
        batch = handed_over.to(device, non_blocking=True).flatten(0, 1)
        return runtime.to_model_input(degrade_batch(batch, type_ids, level_ids, generator=generator), device)

    count = n_crops * LEVELS
    t_base, t_ours, t_device = (timed(fn, device, repeats) for fn in (baseline, ours, device_only))
    # ours_per_s includes the worker-side work done inline here; in training it runs in parallel
    # DataLoader workers, so device_only_per_s is what the GPU side can absorb.
    return row("stage1_degradation", device, count / t_base, count / t_ours, unit="degraded crops/s",
               device_only_per_s=round(count / t_device, 2), crops=count)


# ----------------------------------------------------------------------------- stage 2 sampling

def bench_stage2_sampling(device, n_images, n_patches, repeats, workdir):
    samples = []
    for i in range(n_images):
        path = os.path.join(workdir, f"img{i}.jpg")
        photo(1024, 768).rotate(i * 7).save(path, quality=90)
        samples.append(Sample(path=path, mos=float(i), split="train", origin=f"bench:{i}"))
    rng = np.random.default_rng(0)
    picks = rng.integers(0, n_images, n_patches)

    def baseline():
        out = []
        for i in picks:
            image = Image.open(samples[i].path).convert("RGB")
            image = image.resize((512, 384), Image.BICUBIC)
            top, left = rng.integers(0, 384 - CROP + 1), rng.integers(0, 512 - CROP + 1)
            patch = TF.to_tensor(image.crop((left, top, left + CROP, top + CROP)))
            out.append(TF.normalize(patch, runtime.IMAGENET_MEAN, runtime.IMAGENET_STD))
        return torch.stack(out)

    start = time.perf_counter()
    cache = cache_images(samples, 384, CROP, progress=False)
    decode_s = time.perf_counter() - start
    dataset = TrainPatchDataset(cache, [s.mos for s in samples], patch_num=max(1, n_patches // n_images),
                                patch_size=CROP)

    def ours():
        patches = torch.stack([dataset[i][0] for i in range(len(dataset))])
        return runtime.to_model_input(patches, device)

    n_ours = len(dataset)
    t_base, t_ours = timed(baseline, device, repeats), timed(ours, device, repeats)
    return row("stage2_sampling", device, n_patches / t_base, n_ours / t_ours, unit="patches/s",
               cache_decode_s=round(decode_s, 3), images=n_images)


# ----------------------------------------------------------------------------- training throughput

def train_steps(model, step_fn, device, settings, steps):
    """Crops/s and peak GPU memory (GiB) of ``steps`` optimizer steps under ``settings``."""
    amp = settings["amp"]
    if settings["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = (runtime.make_adamw(model.parameters(), device, lr=1e-5) if settings["fused"]
                 else torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False))
    forward = torch.compile(model) if settings.get("compile") else model

    def one_step():
        loss, count = step_fn(forward, amp, settings["channels_last"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return count

    one_step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, count = time.perf_counter(), 0
    for _ in range(steps):
        count += one_step()
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return count / elapsed, peak


def stage1_step_fn(device, batch_size):
    text = torch.nn.functional.normalize(torch.randn(2, 1024, device=device), dim=1)
    loss_fn = SimplifiedQualiCLIPLoss()
    crops = torch.randint(0, 256, (batch_size * 2 * LEVELS, 3, CROP, CROP), dtype=torch.uint8, device=device)
    types = torch.arange(crops.shape[0], device=device) % len(DISTORTION_TYPES)
    levels = torch.arange(LEVELS, device=device).repeat(batch_size * 2)

    def step(model, amp, channels_last):
        x = runtime.to_model_input(degrade_batch(crops, types, levels), device, channels_last)
        with runtime.autocast(device, amp):
            features = model(x)
        return loss_fn(features.float().view(batch_size, 2, LEVELS, -1), text)["loss"], crops.shape[0]

    return step


def stage2_step_fn(device, batch_size):
    patches = torch.randint(0, 256, (batch_size, 3, CROP, CROP), dtype=torch.uint8, device=device)
    targets = torch.rand(batch_size, device=device)

    def step(model, amp, channels_last):
        x = runtime.to_model_input(patches, device, channels_last)
        with runtime.autocast(device, amp):
            pred = model(x)
        return torch.nn.functional.l1_loss(pred.float(), targets), batch_size

    return step


def bench_training(device, size, steps, compile_model):
    cuda = device.type == "cuda"
    baseline = {"amp": None, "channels_last": False, "fused": False}
    ours = {"amp": runtime.amp_dtype("auto", device), "channels_last": cuda, "fused": cuda, "compile": compile_model}
    stage1_batch, stage2_batch = (8, 64) if cuda else (1, 8)
    rows = []
    for name, build, step_fn in (
        ("stage1_train", lambda: QualityEncoder(size, 1024, imagenet_pretrained=False), stage1_step_fn(device, stage1_batch)),
        ("stage2_train", lambda: HyperIQASwin(size, attention_fusion=True, imagenet_pretrained=False),
         stage2_step_fn(device, stage2_batch)),
    ):
        torch.manual_seed(0)
        base_rate, base_peak = train_steps(build().to(device), step_fn, device, baseline, steps)
        torch.manual_seed(0)
        ours_rate, ours_peak = train_steps(build().to(device), step_fn, device, ours, steps)
        rows.append(row(name, device, base_rate, ours_rate, unit="crops/s" if name == "stage1_train" else "patches/s",
                        model=f"swin-{size}", batch=stage1_batch if name == "stage1_train" else stage2_batch,
                        baseline_peak_gib=base_peak and round(base_peak, 2),
                        ours_peak_gib=ours_peak and round(ours_peak, 2),
                        ours_settings={k: str(v) for k, v in ours.items()}))
    return rows


# ----------------------------------------------------------------------------- main

def get_args_parser():
    p = argparse.ArgumentParser("Benchmarks against the naive way")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the models in 'ours'")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest.json"))
    return p


def print_table(rows):
    header = f"{'name':<20} {'device':<28} {'baseline/s':>12} {'ours/s':>12} {'ratio':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<20} {r['device'][:28]:<28} {r['baseline_per_s']:>12.1f} {r['ours_per_s']:>12.1f} "
              f"{r['ratio']:>7.2f}x")


def main(args):
    device = runtime.resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cuda = device.type == "cuda"
    repeats = 1 if args.quick else 3
    size = "base" if cuda else "nano"
    with tempfile.TemporaryDirectory() as workdir:
        rows = [
            bench_stage1_degradation(device, 8 if args.quick else (256 if cuda else 48), repeats),
            bench_stage2_sampling(device, 4 if args.quick else 16, 16 if args.quick else 128, repeats, workdir),
            *bench_training(device, size, 1 if args.quick else (20 if cuda else 3), args.compile),
        ]
    print_table(rows)
    runtime.atomic_write_json(args.out, rows)
    print(f"written to {args.out}")
    return rows


if __name__ == "__main__":
    runtime.run_cli(main, get_args_parser().parse_args())
