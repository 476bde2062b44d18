"""Build small demo datasets in the real on-disk formats of KonIQ-10k, SPAQ, KADID-10k, AGIQA-3K and LIVE-C.

The images are crops of the photographs that scikit-image ships inside its wheel (no
download), degraded with a known overall strength s in [0, 1], and scored
MOS = lo + (hi - lo) * clip(1 - s + N(0, 0.04), 0, 1) on the dataset's native scale, so a
working model has something real to learn and every reader, split and metric can be exercised
end to end.  Like real photographs, the in-the-wild sets (KonIQ-10k, SPAQ, LIVE-C, AGIQA-3K)
carry a mixture: Gaussian blur, darkening and Gaussian noise, each at a strength scattered around
s, and are stored as JPEG at quality 95.  KADID-10k, synthetic by design, carries one of four
kinds (those three and JPEG) per image at level s = level / 5.  The scores are synthetic;
``demo_truth.csv`` lists each image's distortion and s.

    python tools/make_demo_data.py --out demo_data [--koniq 160 --others 32 --size 512x384 --seed 0 --force]

Re-running with the same settings skips the build; the output folder is written atomically
(built beside it, then renamed into place).
"""
import argparse
import csv
import io
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from iqa.runtime import UserError, run_cli  # noqa: E402

DISTORTIONS = ("blur", "darken", "noise", "jpeg")
# The in-the-wild mixture, in the order it is applied: optics, exposure, sensor noise.  No JPEG
# step: Stage 1 pretrains on these images as clean ones, and an image already compressed at
# quality ~22 hides Stage 1's JPEG ladder (re-encoding at quality 85..25 changes it by 0.5-2.8
# grey levels on average) and has lost the fine detail that Stage 1's blur ladder takes away.
MIXTURE = ("blur", "darken", "noise")
MIXED = "mixed"
# Spread of the per-distortion strengths of a mixture around its overall strength s.  A single
# distortion per image is too hard for the demo's random-init Swin-nano: blur and noise move
# its features in opposite directions and JPEG barely moves them, so a few hundred CPU steps
# learn nothing; a mixture gives every image several consistent cues.
MIX_SPREAD = 0.1
# KADID-10k's distortion ids for the same four kinds (gaussian blur, JPEG, white noise, darken).
KADID_TYPE_IDS = {"blur": 1, "jpeg": 10, "noise": 11, "darken": 17}
AGIQA_PROMPTS = (
    "a cat sitting on a sofa, digital art, highly detailed",
    "an astronaut riding a horse, on the moon, photorealistic",
    "a cup of coffee on a wooden table, morning light, bokeh",
    "a rocket launching at night, long exposure, cinematic",
    "a red motorcycle in a garage, studio lighting, 8k",
    "a galaxy full of stars, deep space, vivid colors",
)
AGIQA_STYLES = ("baroque", "realistic", "abstract", "anime", "sci-fi")
AGIQA_MODELS = ("midjourney", "sd1.5", "sdxl", "dalle2", "glide", "aigan")
SETTINGS_FILE = "demo.json"
DEMO_DATASETS = ("koniq-10k", "spaq", "kadid-10k", "agiqa-3k", "livec")
MIN_KONIQ, MIN_OTHERS = 5, 3
DEMO_VERSION = 3  # bump whenever images or scores change, so that older demo folders are rebuilt


# ----------------------------------------------------------------------------- images

def load_sources():
    """The RGB photographs bundled with scikit-image (grayscale 'camera' replicated to RGB).

    Mostly-black photographs (hubble_deep_field, retina) are left out: darkening them is
    invisible, so their scores would be arbitrary.
    """
    from skimage import data

    rgb = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(),
           data.stereo_motorcycle()[0]]
    gray = np.stack([data.camera()] * 3, axis=-1)
    return [Image.fromarray(a) for a in (*rgb, gray)]


def random_crop(source, size, rng):
    """A crop of ``size``'s aspect at a random position and scale, resized to ``size``."""
    width, height = size
    aspect = width / height
    max_w = min(source.width, source.height * aspect)
    crop_w = max_w * rng.uniform(0.5, 1.0)
    crop_h = crop_w / aspect
    x0 = rng.uniform(0, source.width - crop_w)
    y0 = rng.uniform(0, source.height - crop_h)
    return source.resize(size, Image.BICUBIC, box=(x0, y0, x0 + crop_w, y0 + crop_h))


def degrade(img, kind, strength, rng):
    """Apply one distortion at ``strength`` in [0, 1] (0 = untouched, 1 = strongest)."""
    if kind == "blur":
        sigma = 4.0 * strength
        return img.filter(ImageFilter.GaussianBlur(radius=sigma)) if sigma > 0.05 else img.copy()
    if kind == "jpeg":
        buffer = io.BytesIO()
        # Geometric in s: quality steps above ~50 are hardly visible, those below are.
        img.save(buffer, format="JPEG", quality=round(95 * (5 / 95) ** strength))
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")
    pixels = np.asarray(img, dtype=np.float64)
    if kind == "noise":
        pixels = pixels + rng.normal(0.0, 35.0 * strength, pixels.shape)
    elif kind == "darken":
        pixels = pixels * (1.0 - 0.7 * strength)
    else:
        raise ValueError(f"unknown distortion '{kind}'")
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def degrade_mixed(img, strength, rng):
    """All distortions in ``MIXTURE`` order, each at ``strength`` + N(0, MIX_SPREAD) (clipped)."""
    for kind in MIXTURE:
        img = degrade(img, kind, float(np.clip(strength + rng.normal(0.0, MIX_SPREAD), 0.0, 1.0)), rng)
    return img


def synthetic_mos(strength, lo, hi, rng):
    return lo + (hi - lo) * float(np.clip(1.0 - strength + rng.normal(0.0, 0.04), 0.0, 1.0))


def seeded_sets(n, rng):
    """70/10/20 split labels in KonIQ's spelling; for n >= MIN_KONIQ at least two images in
    validation and test (a correlation needs two) and one in training."""
    n_test, n_val = max(2, round(0.2 * n)), max(2, round(0.1 * n))
    labels = ["test"] * n_test + ["validation"] * n_val + ["training"] * (n - n_test - n_val)
    return [labels[i] for i in rng.permutation(n)]


class DemoBuilder:
    """Writes one demo dataset after another into ``root``, recording each image's ground truth."""

    def __init__(self, root, seed):
        self.root = root
        self.rng = np.random.default_rng(seed)
        self.sources = load_sources()
        self.truth = []  # (dataset, image file relative to root, distortion, strength)

    def degraded_image(self, index, size, dataset, relpath, kind=None, strength=None, clean=None):
        """Crop a source (or take ``clean``), degrade it (a mixture unless ``kind``), save it under ``dataset``."""
        strength = self.rng.uniform(0.0, 1.0) if strength is None else strength
        if clean is None:
            clean = random_crop(self.sources[index % len(self.sources)], size, self.rng)
        if kind is None:
            self.save(degrade_mixed(clean, strength, self.rng), dataset, relpath)
        else:
            self.save(degrade(clean, kind, strength, self.rng), dataset, relpath)
        self.truth.append((dataset, relpath, kind or MIXED, round(strength, 4)))
        return strength

    def save(self, img, dataset, relpath):
        path = os.path.join(self.root, dataset, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # PNG at low compression: speed over size for a throwaway demo.
        options = {".jpg": {"quality": 95}, ".png": {"compress_level": 1}}.get(os.path.splitext(path)[1].lower(), {})
        img.save(path, **options)

    def write_csv(self, dataset, name, header, rows, quoting=csv.QUOTE_MINIMAL):
        path = os.path.join(self.root, dataset, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, quoting=quoting)
            writer.writerow(header)
            writer.writerows(rows)

    # ------------------------------------------------------------------------- datasets

    def koniq(self, n, size):
        # The reader looks for 1024x768/ or 512x384/; other sizes are stored in 512x384/.
        folder = "1024x768" if tuple(size) == (1024, 768) else "512x384"
        ids = np.sort(self.rng.choice(9_000_000_000, size=n, replace=False) + 1_000_000_000)
        scores, sets = [], []
        for i, (image_id, set_name) in enumerate(zip(ids, seeded_sets(n, self.rng))):
            name = f"{image_id}.jpg"
            target = synthetic_mos(self.degraded_image(i, size, "koniq-10k", f"{folder}/{name}"), 1, 5, self.rng)
            # Rating counts c1..c5 drawn around the target, so MOS/SD are consistent with them.
            probs = np.exp(-0.5 * ((np.arange(1, 6) - target) / 0.6) ** 2)
            counts = self.rng.multinomial(int(self.rng.integers(100, 121)), probs / probs.sum())
            total = int(counts.sum())
            mos = float(np.dot(np.arange(1, 6), counts) / total)
            sd = float(np.sqrt(np.dot(counts, (np.arange(1, 6) - mos) ** 2) / (total - 1)))
            dist = [*(int(c) for c in counts), total, round(mos, 9), round(sd, 9)]
            scores.append([name, *dist, round(100 * (mos - 1) / 4, 8)])
            sets.append([name, *dist, set_name])
        columns = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD"]
        # KonIQ's files quote every string (header included) and leave numbers bare.
        self.write_csv("koniq-10k", "koniq10k_scores_and_distributions.csv", [*columns, "MOS_zscore"], scores,
                       csv.QUOTE_NONNUMERIC)
        self.write_csv("koniq-10k", "koniq10k_distributions_sets.csv", [*columns, "set"], sets, csv.QUOTE_NONNUMERIC)

    def spaq(self, n):
        import openpyxl

        book = openpyxl.Workbook(write_only=True)
        sheet = book.create_sheet()
        sheet.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"])
        for i in range(n):
            name = f"{i + 1:05d}.jpg"
            mos = synthetic_mos(self.degraded_image(i, (640, 480), "spaq", f"TestImage/{name}"), 0, 100, self.rng)
            attributes = np.clip(mos + self.rng.normal(0, 8, 5), 0, 100).round(2)
            sheet.append([name, round(mos, 2), *attributes.tolist()])
        path = os.path.join(self.root, "spaq", "Annotations", "MOS and Image attribute scores.xlsx")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        book.save(path)

    def kadid(self, n, size):
        # KADID names: I<ref>.png references, I<ref>_<type>_<level>.png distorted versions.
        n_refs = max(3, -(-n // 4))
        clean = [random_crop(self.sources[r % len(self.sources)], size, self.rng) for r in range(n_refs)]
        for r, img in enumerate(clean, 1):
            self.save(img, "kadid-10k", f"images/I{r:02d}.png")
        combos = [(kind, level) for kind in DISTORTIONS for level in range(1, 6)]
        per_ref = {r: iter(self.rng.permutation(len(combos))) for r in range(n_refs)}
        rows = []
        for i in range(n):
            r = i % n_refs
            kind, level = combos[next(per_ref[r])]
            name = f"I{r + 1:02d}_{KADID_TYPE_IDS[kind]:02d}_{level:02d}.png"
            strength = self.degraded_image(i, size, "kadid-10k", f"images/{name}", kind, level / 5, clean[r])
            rows.append([name, f"I{r + 1:02d}.png", round(synthetic_mos(strength, 1, 5, self.rng), 3),
                         round(float(self.rng.uniform(0.3, 1.2)), 3)])
        self.write_csv("kadid-10k", "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)

    def agiqa(self, n, size):
        rows = []
        for i in range(n):
            name = f"{AGIQA_MODELS[i % len(AGIQA_MODELS)]}_{AGIQA_STYLES[i % len(AGIQA_STYLES)]}_{i:03d}.jpg"
            quality = synthetic_mos(self.degraded_image(i, size, "agiqa-3k", name), 0, 5, self.rng)
            align = float(self.rng.uniform(1, 5))
            rows.append([name, AGIQA_PROMPTS[i % len(AGIQA_PROMPTS)], "beautiful", "detailed",
                         AGIQA_STYLES[i % len(AGIQA_STYLES)], round(quality, 4),
                         round(float(self.rng.uniform(0.5, 1)), 4), round(align, 4),
                         round(float(self.rng.uniform(0.5, 1)), 4)])
        header = ["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align"]
        self.write_csv("agiqa-3k", "data.csv", header, rows)

    def livec(self, n):
        from scipy.io import savemat

        size = (500, 500)
        # LIVE-C lists its 7 training images t1..t7 first; readers drop them.
        names = [f"t{k}.bmp" for k in range(1, 8)]
        mos = [synthetic_mos(0.5, 0, 100, self.rng) for _ in names]
        for k, name in enumerate(names):
            self.save(random_crop(self.sources[k], size, self.rng), "livec", f"Images/trainingImages/{name}")
        for i in range(n):
            name = f"{i + 1}.JPG"
            names.append(name)
            mos.append(synthetic_mos(self.degraded_image(i, size, "livec", f"Images/{name}"), 0, 100, self.rng))
        cells = np.empty((len(names), 1), dtype=object)
        cells[:, 0] = names
        data_dir = os.path.join(self.root, "livec", "Data")
        os.makedirs(data_dir, exist_ok=True)
        savemat(os.path.join(data_dir, "AllImages_release.mat"), {"AllImages_release": cells})
        savemat(os.path.join(data_dir, "AllMOS_release.mat"), {"AllMOS_release": np.array([mos])})


README = """Demo datasets built by tools/make_demo_data.py -- THE SCORES ARE SYNTHETIC.

Images are crops of the photographs shipped with scikit-image, degraded with a known overall
strength s in [0, 1] (see demo_truth.csv): KADID-10k images carry one distortion (blur, jpeg,
noise or darken) at s = level / 5, all other images a mixture of blur, darken and noise, each at a
strength near s, stored as JPEG at quality 95. The score is
lo + (hi - lo) * clip(1 - s + N(0, 0.04), 0, 1) on the dataset's native scale:
KonIQ-10k MOS 1-5 (c1..c5 counts drawn around it), SPAQ 0-100, KADID-10k dmos 1-5,
AGIQA-3K mos_quality 0-5, LIVE-C 0-100. Results on these folders test the software, not a model.

Folders (real on-disk formats; pass one as --root together with its --dataset name):
  koniq-10k/  {koniq} images
  spaq/       {others} images
  kadid-10k/  {others} distorted images of {refs} references
  agiqa-3k/   {others} images
  livec/      {others} images (+7 training entries that readers drop)
Settings: {settings}
"""


def demo_settings(n_koniq, n_others, seed, size):
    return {"n_koniq": int(n_koniq), "n_others": int(n_others), "seed": int(seed), "size": [int(v) for v in size],
            "version": DEMO_VERSION}


def is_complete(out_dir, settings):
    """True when ``out_dir`` holds a finished demo built with ``settings``."""
    marker = os.path.join(out_dir, SETTINGS_FILE)
    if not os.path.isfile(marker):
        return False
    with open(marker) as f:
        return json.load(f) == settings


def build_demo(out_dir, n_koniq=160, n_others=32, seed=0, size=(512, 384), force=False):
    """Build the five demo datasets under ``out_dir``; returns {dataset name: root folder}.

    Skips the build when ``out_dir`` already holds a complete demo built with the same
    settings (unless ``force``).  Refuses to replace a folder that is not a demo.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    settings = demo_settings(n_koniq, n_others, seed, size)
    roots = {name: os.path.join(out_dir, name) for name in DEMO_DATASETS}
    if not force and is_complete(out_dir, settings):
        return roots
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, SETTINGS_FILE)):
        raise UserError(f"--out '{out_dir}' exists and is not a demo folder; choose another path or remove it")
    if n_koniq < MIN_KONIQ or n_others < MIN_OTHERS:
        raise UserError(f"--koniq must be at least {MIN_KONIQ} (two images each for validation and test, one for "
                        f"training) and --others at least {MIN_OTHERS}")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".demo-build-", dir=parent)
    try:
        builder = DemoBuilder(staging, seed)
        builder.koniq(n_koniq, tuple(size))
        builder.spaq(n_others)
        builder.kadid(n_others, (512, 384))
        builder.agiqa(n_others, (512, 384))
        builder.livec(n_others)
        builder.write_csv("", "demo_truth.csv", ["dataset", "image", "distortion", "strength"], builder.truth)
        with open(os.path.join(staging, "README.txt"), "w") as f:
            f.write(README.format(koniq=n_koniq, others=n_others, refs=max(3, -(-n_others // 4)),
                                  settings=json.dumps(settings)))
        with open(os.path.join(staging, SETTINGS_FILE), "w") as f:
            json.dump(settings, f)  # written last: its presence marks a complete build
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return roots


def parse_size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not WIDTHxHEIGHT, e.g. 512x384") from None
    if width < 64 or height < 64:
        raise argparse.ArgumentTypeError(f"'{text}' is too small; use at least 64x64")
    return width, height


def main(args):
    settings = demo_settings(args.koniq, args.others, args.seed, args.size)
    skipped = not args.force and is_complete(os.path.abspath(args.out), settings)
    roots = build_demo(args.out, args.koniq, args.others, args.seed, args.size, args.force)
    verb = "already complete (pass --force to rebuild)" if skipped else "built"
    print(f"demo data {verb}: {os.path.abspath(args.out)}  (synthetic scores, see README.txt)")
    for name, root in roots.items():
        print(f"  --dataset {name:<10} --root {root}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_data", help="output folder (default: demo_data)")
    parser.add_argument("--koniq", type=int, default=160, help="number of KonIQ-10k demo images")
    parser.add_argument("--others", type=int, default=32, help="images per other dataset")
    parser.add_argument("--size", type=parse_size, default=(512, 384),
                        help="KonIQ image size WxH (default 512x384); stored in 1024x768/ if that size, else 512x384/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete demo exists")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
