"""Benchmarks: our input pipelines and training settings against the naive way, in one run.

    python bench/bench.py [--device auto|cpu|cuda] [--quick] [--compile] [--rows NAME ...]
                          [--out bench/results/latest.json]

Six rows, each ``{"name", "device", "baseline_per_s", "ours_per_s", "ratio", ...}``:

Both input pipelines are measured end to end through a DataLoader with the same ``--workers``
(default: 0 on CPU, where the device is the same cores; one per core, at most 8, on CUDA), from
JPEG files on disk to normalised batches on the device:

* ``stage1_degradation``: degraded crops/s. Baseline = the original per-crop path in the workers
  (tensor -> normalise -> PIL -> degrade each level -> tensor -> normalise). Ours = the training
  path: workers decode, crop and JPEG-encode; blur/noise/brightness run batched on the device,
  normalisation after (``qualiclip_pretrain.engine.prepare_batch``).
* ``stage2_sampling``: training patches/s. Baseline = decode + resize the file for every patch.
  Ours = slices of the decoded-once uint8 cache (the one-off decode time is reported too, and
  ``ours_including_decode_per_s`` counts it against one epoch).
* ``stage1_end_to_end``: trained crops/s of whole Stage-1 steps fed by the DataLoader (files on
  disk -> workers decode/crop/JPEG -> device degradations -> forward/backward/AdamW), at 8 images
  x 2 crops x 5 levels per step on CUDA. Baseline = the original per-crop path in the workers and
  fp32 eager; ours = the training path and settings. The first step (start-up) is not timed.
* ``stage1_train`` / ``stage2_train``: training crops (patches)/s of one optimizer step, plain
  fp32 eager against our settings (bf16 autocast, channels_last, fused AdamW, TF32 on CUDA; on
  CPU the scripts' defaults).
* ``arniqa_distort``: crops/s of ``qualiclip_pretrain.arniqa.distort`` over all 24 distortions,
  each crop at its own level: one crop at a time (baseline) against one batched call per
  distortion (ours); ``per_distortion`` holds both rates per distortion.

Training rows carry ``baseline_peak_gib`` / ``ours_peak_gib``: ``torch.cuda.max_memory_allocated``
over the timed steps on CUDA, ``None`` (printed n/a) on CPU, where no per-step figure is measured.
On CPU the models are Swin-nano; on CUDA Swin-Base at the original recipe's batch sizes.
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iqa import runtime  # noqa: E402
from iqa.datasets import Sample  # noqa: E402
from iqa.patches import IMAGENET_MEAN, IMAGENET_STD, TrainPatchDataset, cache_images, to_model_input  # noqa: E402
from models.hyperiqa_swin import HyperIQASwin  # noqa: E402
from models.quality_encoder import QualityEncoder  # noqa: E402
from qualiclip_pretrain import arniqa  # noqa: E402
from qualiclip_pretrain.engine import prepare_batch  # noqa: E402
from qualiclip_pretrain.degradation_generator import (  # noqa: E402
    DISTORTION_TYPES,
    SyntheticDegradation,
    degrade_batch,
)
from qualiclip_pretrain.pretrain_dataset import PretrainDataset  # noqa: E402
from qualiclip_pretrain.qualiclip_loss import SimplifiedQualiCLIPLoss  # noqa: E402

CROP = 224
LEVELS = 5
ROW_NAMES = ("stage1_degradation", "stage2_sampling", "stage1_end_to_end", "stage1_train", "stage2_train",
             "arniqa_distort")


def photo(width, height):
    """A real photograph (scikit-image's coffee) at ``width``×``height``."""
    from skimage import data

    return Image.fromarray(data.coffee()).resize((width, height), Image.BICUBIC)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def row(name, device, baseline_per_s, ours_per_s, **extra):
    return {"name": name, "device": device_name(device), "baseline_per_s": round(baseline_per_s, 2),
            "ours_per_s": round(ours_per_s, 2), "ratio": round(ours_per_s / baseline_per_s, 2), **extra}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- input pipelines

def write_photos(workdir, count):
    """``count`` KonIQ-like 1024×768 JPEGs of a real photograph (rotated for variety)."""
    paths = []
    for i in range(count):
        path = os.path.join(workdir, f"img{i}.jpg")
        photo(1024, 768).rotate(i * 7).save(path, quality=90)
        paths.append(path)
    return paths


def normalised(image):
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


class NaivePretrainDataset(Dataset):
    """The original Stage-1 item: per crop, normalise, back to PIL, degrade each level, normalise again."""

    def __init__(self, paths, distortion_types=DISTORTION_TYPES):
        self.paths = paths
        self.degraders = [SyntheticDegradation(t, LEVELS) for t in distortion_types]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = Image.open(self.paths[index]).convert("RGB")
        degrader = self.degraders[index % len(self.degraders)]
        views = []
        for left in (0, CROP // 2):
            crop = image.crop((left, 0, left + CROP, CROP))
            pil = TF.to_pil_image(normalised(crop).clamp(0, 1))
            views.append(torch.stack([normalised(im) for im in degrader(pil)]))
        return torch.stack(views)


class NaivePatchDataset(Dataset):
    """The original Stage-2 item: decode and resize the whole image for every patch."""

    def __init__(self, paths, patches_per_image):
        self.paths, self.patches_per_image = paths, patches_per_image

    def __len__(self):
        return len(self.paths) * self.patches_per_image

    def __getitem__(self, index):
        image = Image.open(self.paths[index // self.patches_per_image]).convert("RGB").resize((512, 384), Image.BICUBIC)
        top, left = torch.randint(0, 384 - CROP + 1, ()).item(), torch.randint(0, 512 - CROP + 1, ()).item()
        return normalised(image.crop((left, top, left + CROP, top + CROP))), 0.0


def drain(loader, on_batch):
    """Seconds to pull every batch through ``on_batch`` (the device-side step)."""
    start = time.perf_counter()
    for batch in loader:
        on_batch(batch)
    return time.perf_counter() - start


def loader(dataset, batch_size, workers, device):
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      shuffle=False)


def bench_stage1_degradation(device, paths, workers, batch_size):
    """Degraded crops/s end to end: decode, crop, degrade, normalise, on the device."""
    sink = []

    def naive_step(batch):
        sink.append(batch.to(device, non_blocking=True).sum())

    ours_args = argparse.Namespace(degrade_on="device", channels_last=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)

    def ours_step(batch):
        images, _ = prepare_batch(batch, list(range(LEVELS)), ours_args, device, generator)
        sink.append(images.sum())

    crops = len(paths) * 2 * LEVELS
    naive = drain(loader(NaivePretrainDataset(paths), batch_size, workers, device), naive_step)
    ours = drain(loader(PretrainDataset(paths, CROP, DISTORTION_TYPES, LEVELS), batch_size, workers, device),
                 ours_step)
    sync(device)
    return row("stage1_degradation", device, crops / naive, crops / ours, unit="degraded crops/s",
               images=len(paths), workers=workers)


def bench_stage2_sampling(device, paths, workers, batch_size, patches_per_image):
    """Training patches/s: decode + resize per patch against slices of the decoded-once cache."""
    sink = []

    def step(batch):
        sink.append(to_model_input(batch[0], device).sum() if batch[0].dtype == torch.uint8
                    else batch[0].to(device, non_blocking=True).sum())

    count = len(paths) * patches_per_image
    naive = drain(loader(NaivePatchDataset(paths, patches_per_image), batch_size, workers, device), step)
    samples = [Sample(path=p, mos=float(i), split="train", origin=f"bench:{i}") for i, p in enumerate(paths)]
    start = time.perf_counter()
    cache = cache_images(samples, 384, CROP, progress=False)
    decode_s = time.perf_counter() - start
    dataset = TrainPatchDataset(cache, [s.mos for s in samples], patches_per_image, CROP)
    ours = drain(loader(dataset, batch_size, workers, device), step)
    sync(device)
    return row("stage2_sampling", device, count / naive, count / ours, unit="patches/s",
               ours_including_decode_per_s=round(count / (ours + decode_s), 2), cache_decode_s=round(decode_s, 3),
               images=len(paths), patches_per_image=patches_per_image, workers=workers)


# ----------------------------------------------------------------------------- training throughput

class Trainer:
    """A model and its optimizer under ``settings`` (amp, channels_last, fused, compile)."""

    def __init__(self, model, device, settings):
        self.amp, self.channels_last = settings["amp"], settings["channels_last"]
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = (runtime.make_adamw(model.parameters(), device, lr=1e-5) if settings["fused"]
                          else torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False))
        self.forward = torch.compile(model) if settings.get("compile") else model

    def step(self, loss_fn):
        """One optimizer step on ``loss_fn(forward, amp, channels_last) -> (loss, items)``; returns items."""
        loss, count = loss_fn(self.forward, self.amp, self.channels_last)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return count


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def train_steps(model, step_fn, device, settings, steps):
    """Crops/s and peak GPU memory (GiB) of ``steps`` optimizer steps under ``settings``."""
    trainer = Trainer(model, device, settings)
    trainer.step(step_fn)
    sync(device)
    reset_peak(device)
    start, count = time.perf_counter(), 0
    for _ in range(steps):
        count += trainer.step(step_fn)
    sync(device)
    return count / (time.perf_counter() - start), peak_gib(device)


def stage1_loss(model, x, amp, text, loss_fn, batch_size):
    with runtime.autocast(x.device, amp):
        features = model(x)
    return loss_fn(features.float().view(batch_size, 2, LEVELS, -1), text)["loss"]


def anchors(device):
    return torch.nn.functional.normalize(torch.randn(2, 1024, device=device), dim=1)


def stage1_step_fn(device, batch_size):
    text = anchors(device)
    loss_fn = SimplifiedQualiCLIPLoss()
    crops = torch.randint(0, 256, (batch_size * 2 * LEVELS, 3, CROP, CROP), dtype=torch.uint8, device=device)
    types = torch.arange(crops.shape[0], device=device) % len(DISTORTION_TYPES)
    levels = torch.arange(LEVELS, device=device).repeat(batch_size * 2)

    def step(model, amp, channels_last):
        x = to_model_input(degrade_batch(crops, types, levels), device, channels_last)
        return stage1_loss(model, x, amp, text, loss_fn, batch_size), crops.shape[0]

    return step


def stage2_step_fn(device, batch_size):
    patches = torch.randint(0, 256, (batch_size, 3, CROP, CROP), dtype=torch.uint8, device=device)
    targets = torch.rand(batch_size, device=device)

    def step(model, amp, channels_last):
        x = to_model_input(patches, device, channels_last)
        with runtime.autocast(device, amp):
            pred = model(x)
        return torch.nn.functional.l1_loss(pred.float(), targets), batch_size

    return step


BASELINE_SETTINGS = {"amp": None, "channels_last": False, "fused": False}


def our_settings(device, compile_model):
    cuda = device.type == "cuda"
    return {"amp": runtime.amp_dtype("auto", device), "channels_last": cuda, "fused": cuda, "compile": compile_model}


def bench_training(device, size, steps, compile_model, names):
    cuda = device.type == "cuda"
    baseline, ours = BASELINE_SETTINGS, our_settings(device, compile_model)
    stage1_batch, stage2_batch = (8, 64) if cuda else (1, 8)
    rows = []
    for name, build, step_fn in (
        ("stage1_train", lambda: QualityEncoder(size, 1024, imagenet_pretrained=False), stage1_step_fn(device, stage1_batch)),
        ("stage2_train", lambda: HyperIQASwin(size, attention_fusion=True, imagenet_pretrained=False),
         stage2_step_fn(device, stage2_batch)),
    ):
        if name not in names:
            continue
        torch.manual_seed(0)
        base_rate, base_peak = train_steps(build().to(device), step_fn, device, baseline, steps)
        torch.manual_seed(0)
        ours_rate, ours_peak = train_steps(build().to(device), step_fn, device, ours, steps)
        rows.append(row(name, device, base_rate, ours_rate, unit="crops/s" if name == "stage1_train" else "patches/s",
                        model=f"swin-{size}", batch=stage1_batch if name == "stage1_train" else stage2_batch,
                        baseline_peak_gib=rounded(base_peak), ours_peak_gib=rounded(ours_peak),
                        ours_settings={k: str(v) for k, v in ours.items()}))
    return rows


def rounded(value):
    return None if value is None else round(value, 2)


# ----------------------------------------------------------------------------- Stage 1 end to end

def timed_steps(loader, on_batch, device):
    """(items/s, peak GiB) of ``on_batch`` over ``loader``; the first batch warms up (workers start,
    kernels are chosen, ``--compile`` compiles) and is not timed, so the loader needs two batches."""
    batches = iter(loader)
    on_batch(next(batches))
    sync(device)
    reset_peak(device)
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += on_batch(batch)
    sync(device)
    if not count:
        raise ValueError("timed_steps needs at least two batches")
    return count / (time.perf_counter() - start), peak_gib(device)


def bench_stage1_end_to_end(device, size, paths, workers, batch_size, compile_model):
    """Trained crops/s of whole Stage-1 steps fed from JPEG files by the DataLoader."""
    text, loss_fn = anchors(device), SimplifiedQualiCLIPLoss()
    ours_settings = our_settings(device, compile_model)
    batch_args = argparse.Namespace(degrade_on="device", channels_last=ours_settings["channels_last"])
    generator = torch.Generator(device=device).manual_seed(0)

    def naive_input(views):
        return views.flatten(0, 2).to(device, non_blocking=True), views.shape[0]

    def our_input(batch):
        x, shape = prepare_batch(batch, list(range(LEVELS)), batch_args, device, generator)
        return x, shape[0]

    def measure(settings, dataset, model_input):
        torch.manual_seed(0)
        trainer = Trainer(QualityEncoder(size, 1024, imagenet_pretrained=False).to(device), device, settings)

        def step(batch):
            x, images = model_input(batch)
            return trainer.step(lambda model, amp, _: (stage1_loss(model, x, amp, text, loss_fn, images), x.shape[0]))

        return timed_steps(loader(dataset, batch_size, workers, device), step, device)

    base_rate, base_peak = measure(BASELINE_SETTINGS, NaivePretrainDataset(paths), naive_input)
    ours_rate, ours_peak = measure(ours_settings, PretrainDataset(paths, CROP, DISTORTION_TYPES, LEVELS), our_input)
    return row("stage1_end_to_end", device, base_rate, ours_rate, unit="trained crops/s", model=f"swin-{size}",
               batch=f"{batch_size} images x 2 crops x {LEVELS} levels", images=len(paths), workers=workers,
               baseline_peak_gib=rounded(base_peak), ours_peak_gib=rounded(ours_peak),
               ours_settings={k: str(v) for k, v in ours_settings.items()})


# ----------------------------------------------------------------------------- ARNIQA degradations

def bench_arniqa(device, crops, size):
    """Crops/s of every ARNIQA distortion: one crop at a time against one batched call."""
    source, box = photo(size * 2, size * 2), (size // 2, size // 2, size // 2 + size, size // 2 + size)
    batch = torch.stack([TF.to_tensor(source.rotate(i * 11).crop(box)) for i in range(crops)]).to(device)
    levels = torch.arange(crops) % arniqa.NUM_LEVELS + 1
    generator = torch.Generator(device=device).manual_seed(0)
    per_distortion, naive_total, ours_total = {}, 0.0, 0.0
    for name in arniqa.DISTORTIONS:
        arniqa.distort(batch[:1], name, 1, generator=generator)  # warm-up (tables, kernels)
        sync(device)
        start = time.perf_counter()
        for image, level in zip(batch, levels.tolist()):
            arniqa.distort(image, name, level, generator=generator)
        sync(device)
        naive = time.perf_counter() - start
        start = time.perf_counter()
        arniqa.distort(batch, name, levels.to(device), generator=generator)
        sync(device)
        ours = time.perf_counter() - start
        per_distortion[name] = {"baseline_per_s": round(crops / naive, 1), "ours_per_s": round(crops / ours, 1)}
        naive_total, ours_total = naive_total + naive, ours_total + ours
    count = crops * len(arniqa.DISTORTIONS)
    return row("arniqa_distort", device, count / naive_total, count / ours_total, unit="distorted crops/s",
               crops=crops, crop_size=size, distortions=len(arniqa.DISTORTIONS), per_distortion=per_distortion)


# ----------------------------------------------------------------------------- main

def get_args_parser():
    p = argparse.ArgumentParser("Benchmarks against the naive way")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the models in 'ours'")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for the input pipelines")
    p.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES), metavar="NAME",
                   help=f"rows to measure (default all: {', '.join(ROW_NAMES)})")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest.json"))
    return p


def peak_text(r):
    """The table's peak-memory cell: GiB for training rows on CUDA, n/a on CPU, empty for data rows."""
    if "ours_peak_gib" not in r:
        return ""
    return "n/a" if r["ours_peak_gib"] is None else f"{r['ours_peak_gib']:.2f}"


def print_table(rows):
    header = (f"{'name':<20} {'device':<28} {'baseline/s':>12} {'ours/s':>12} {'ratio':>8} "
              f"{'ours peak GiB':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<20} {r['device'][:28]:<28} {r['baseline_per_s']:>12.1f} {r['ours_per_s']:>12.1f} "
              f"{r['ratio']:>7.2f}x {peak_text(r):>14}")


def main(args):
    device = runtime.resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cuda = device.type == "cuda"
    size = "base" if cuda else "nano"
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if cuda else 0)
    names = set(args.rows)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        paths = write_photos(workdir, 4 if args.quick else (512 if cuda else 24))
        if "stage1_degradation" in names:
            rows.append(bench_stage1_degradation(device, paths, workers, 8))
        if "stage2_sampling" in names:
            rows.append(bench_stage2_sampling(device, paths, workers, 32, 2 if args.quick else 8))
        if "stage1_end_to_end" in names:
            # CUDA: the recipe's 8 images per step; CPU: 2 per step (Swin-nano trains ~2 crops/s on 2 cores).
            end_to_end_batch = 8 if cuda else 2
            count = 4 if args.quick else (64 * end_to_end_batch if cuda else 3 * end_to_end_batch)
            rows.append(bench_stage1_end_to_end(device, size, paths[:count], workers, end_to_end_batch,
                                                args.compile))
    rows += bench_training(device, size, 1 if args.quick else (20 if cuda else 3), args.compile, names)
    if "arniqa_distort" in names:
        rows.append(bench_arniqa(device, 2 if args.quick else (64 if cuda else 8), CROP))
    print_table(rows)
    runtime.atomic_write_json(args.out, rows)
    print(f"written to {args.out}")
    return rows


if __name__ == "__main__":
    runtime.run_cli(main, get_args_parser().parse_args())
