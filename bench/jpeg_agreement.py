"""Agreement of the GPU JPEG path (``degradation_generator.cuda_jpeg``, nvjpeg) with PIL's libjpeg.

    python bench/jpeg_agreement.py [--crops 32] [--out jpeg_cuda.json]

For every Stage-1 JPEG quality, ``--crops`` 224-pixel crops of a photograph are encoded and decoded
by PIL (4:2:0, as the data workers do) and by ``cuda_jpeg``; the JSON holds, per quality, the
largest and mean absolute difference between the two (0..255), the PSNR of the GPU result against
PIL's, the PSNR of each against the clean crops (how strongly each degrades) and both rates
(crops/s, encode + decode). Needs CUDA; ``make gpu-check`` runs it.
"""
import argparse
import io
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iqa import runtime  # noqa: E402
from qualiclip_pretrain.degradation_generator import JPEG_SUBSAMPLING, LEVEL_PARAMS, cuda_jpeg  # noqa: E402

CROP = 224


def psnr(a, b):
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def pil_jpeg(crops, quality):
    out = []
    for crop in crops:
        buf = io.BytesIO()
        Image.fromarray(crop.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality,
                                                            subsampling=JPEG_SUBSAMPLING)
        with Image.open(buf) as decoded:
            out.append(torch.from_numpy(np.asarray(decoded.convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(out)


def photo_crops(count):
    """``count`` 224-pixel crops of a 1024x768 photograph on a grid (different content each)."""
    # Imported here: bench.bench loads every model, which a machine without CUDA never needs.
    from bench.bench import photo

    image = torch.from_numpy(np.asarray(photo(1024, 768)).copy()).permute(2, 0, 1)
    ys, xs = np.linspace(0, 768 - CROP, 4).astype(int), np.linspace(0, 1024 - CROP, max(1, -(-count // 4))).astype(int)
    return torch.stack([image[:, y:y + CROP, x:x + CROP] for x in xs for y in ys][:count])


def measure(count):
    device = torch.device("cuda")
    crops = photo_crops(count)
    on_device = crops.to(device)
    cuda_jpeg(on_device[:1], [LEVEL_PARAMS["jpeg"][0]])  # warm-up (nvjpeg handles)
    results = {}
    for quality in LEVEL_PARAMS["jpeg"]:
        start = time.perf_counter()
        reference = pil_jpeg(crops, quality)
        pil_s = time.perf_counter() - start
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        gpu = cuda_jpeg(on_device, [quality] * count)
        torch.cuda.synchronize(device)
        gpu_s = time.perf_counter() - start
        gpu = gpu.cpu()
        diff = (gpu.int() - reference.int()).abs()
        results[str(quality)] = {
            "max_abs_diff": int(diff.max()), "mean_abs_diff": round(float(diff.double().mean()), 4),
            "psnr_gpu_vs_pil_db": round(psnr(gpu, reference), 2),
            "psnr_pil_vs_clean_db": round(psnr(reference, crops), 2),
            "psnr_gpu_vs_clean_db": round(psnr(gpu, crops), 2),
            "pil_crops_per_s": round(count / pil_s, 1), "gpu_crops_per_s": round(count / gpu_s, 1),
        }
    return {"device": torch.cuda.get_device_name(device), "crops": count, "crop_size": CROP, "qualities": results}


def main(args):
    if not torch.cuda.is_available():
        raise runtime.UserError("bench/jpeg_agreement.py needs a CUDA GPU (cuda_jpeg runs nvjpeg)")
    report = measure(args.crops)
    for quality, r in report["qualities"].items():
        print(f"quality {quality}: max |diff| {r['max_abs_diff']}, mean |diff| {r['mean_abs_diff']}, "
              f"PSNR GPU vs PIL {r['psnr_gpu_vs_pil_db']} dB (vs clean: PIL {r['psnr_pil_vs_clean_db']}, "
              f"GPU {r['psnr_gpu_vs_clean_db']} dB), {r['gpu_crops_per_s']} vs {r['pil_crops_per_s']} crops/s")
    runtime.atomic_write_json(args.out, report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser("GPU JPEG (nvjpeg) against PIL")
    parser.add_argument("--crops", type=int, default=32)
    parser.add_argument("--out", default="jpeg_cuda.json")
    runtime.run_cli(main, parser.parse_args())
