"""Labelled IQA datasets in their real on-disk formats.

``read_index(name, root)`` turns a dataset folder into a list of ``Sample`` (image path, MOS on
the dataset's native scale with higher = better, split, and the annotation row it came from).
Every mistake a user can make with a dataset (wrong root, missing file / column / image,
non-numeric MOS, empty split) is reported as a one-line ``UserError`` naming the file and row,
before any training starts.  ``load_rgb`` decodes any image mode to 8-bit RGB and turns
undecodable files into the same kind of error.

Layouts (relative to ``root``):

==============  =========================================================================
koniq-10k       koniq10k_scores_and_distributions.csv (image_name, c1..c5, c_total, MOS,
                SD, MOS_zscore), images in 1024x768/ or 512x384/; split from
                koniq10k_distributions_sets.csv (``set`` column), else koniq_train.json +
                koniq_test.json, else seeded 70/10/20
spaq            Annotations/MOS and Image attribute scores.xlsx (or .csv), images TestImage/
kadid-10k       dmos.csv (dist_img, ref_img, dmos, var), images/ (dmos is higher = better)
agiqa-3k        data.csv (name, prompt, ..., mos_quality, ...), images beside it or in images/
livec           Data/AllImages_release.mat, Data/AllMOS_release.mat, Images/; the first 7
                entries (training images) are dropped
csv             root is a CSV (or .xlsx) file; image column and score column by name,
                image paths relative to the CSV's folder or absolute
==============  =========================================================================

``protocol="hyperiqa"`` reads a dataset as HyperIQA's loaders do (KonIQ-10k's ``MOS_zscore``
label) and splits it with ``hyperiqa_split`` instead of the official or 70/10/20 split.
"""
import csv
import json
import math
import os
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
from PIL import Image

from iqa.runtime import UserError

__all__ = [
    "DATASET_NAMES", "SPLITS", "DEFAULT_SPLIT_SEED", "PROTOCOLS", "HYPERIQA_RESIZE", "Sample", "read_index",
    "select_split", "hyperiqa_split", "split_source", "label_column", "load_rgb", "mos_bounds", "normalize_mos",
    "IMAGE_EXTENSIONS", "list_image_files",
]

DATASET_NAMES = ("koniq-10k", "spaq", "kadid-10k", "agiqa-3k", "livec", "csv")
SPLITS = ("train", "val", "test")
# Seed of the seeded splits, shared by both stages' --split_seed so that Stage 1 never trains on
# an image Stage 2 validates or tests on; independent of the run seed.
DEFAULT_SPLIT_SEED = 0
PROTOCOLS = ("ours", "hyperiqa")
# The label each reader trains on; HyperIQA's Koniq_10kFolder (folders.py) reads MOS_zscore instead.
LABEL_COLUMNS = {"koniq-10k": "MOS", "spaq": "MOS", "kadid-10k": "dmos", "agiqa-3k": "mos_quality",
                 "livec": "AllMOS_release"}
HYPERIQA_KONIQ_LABEL = "MOS_zscore"
# Image size HyperIQA's data_loader.py gives each dataset it reads, as [width, height] (fixed size)
# or 0 (native).  Its torchvision Resize((512, 384)) is (height, width): KonIQ-10k becomes 384
# wide and 512 tall.  KADID-10k has no HyperIQA loader; its synthetic-distortion loaders (LIVE,
# CSIQ, TID2013) keep the native size.  Datasets not listed use our shorter-side --resize.
HYPERIQA_RESIZE = {"koniq-10k": [384, 512], "livec": 0, "kadid-10k": 0}
# Validation carved (seeded) from the training 80% of a HyperIQA split: 1/8, i.e. 10% of all images,
# so both protocols train on 70%.
HYPERIQA_TRAIN_FRACTION = 0.8
HYPERIQA_VAL_SHARE = 1 / 8

LAYOUTS = {
    "koniq-10k": "koniq10k_scores_and_distributions.csv (or koniq10k_distributions_sets.csv) and 1024x768/ or 512x384/",
    "spaq": "'Annotations/MOS and Image attribute scores.xlsx' (or .csv) and TestImage/",
    "kadid-10k": "dmos.csv and images/",
    "agiqa-3k": "data.csv and its images beside it or in images/",
    "livec": "Data/AllImages_release.mat, Data/AllMOS_release.mat and Images/",
    "csv": "a CSV file with an image column and a score column",
}

# Split names as written by dataset authors -> ours.
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
# Column names tried for the generic ``csv`` dataset and for split files, compared case-insensitively.
_IMAGE_COLUMNS = ("image_name", "image", "img", "name", "filename", "file", "path", "image_path", "dist_img", "image name")
_SCORE_COLUMNS = ("mos", "score", "mos_quality", "quality", "rating", "label")
_SET_COLUMNS = ("set", "split")
# HyperIQA-style koniq_train.json entries: {"image": "koniq_train/xxx.jpg", "score": ...} or plain names.
_JSON_NAME_KEYS = ("image", "image_name", "img", "name", "path", "filename", "file")
_JSON_LIST_KEYS = ("images", "data", "items", "samples", "files")


@dataclass(frozen=True)
class Sample:
    """One labelled image.  ``origin`` is "<annotation file>:<row number>" for error messages."""
    path: str
    mos: float
    split: Optional[str]
    origin: str
    ref: Optional[str] = None


# ----------------------------------------------------------------------------- public API

def read_index(name, root, *, seed=0, split_file=None, image_col=None, score_col=None, check_exists=True,
               protocol="ours"):
    """Read a dataset's annotations into ``Sample``s, every one with its split.

    ``seed`` drives the seeded 70/10/20 split used where the dataset has no official one
    (KADID-10k grouped by reference image, so no reference content crosses splits).
    ``protocol="hyperiqa"``: HyperIQA's label (see ``label_column``) and ``hyperiqa_split`` by
    ``seed`` for every dataset, official splits ignored; a ``split_file`` is refused.
    ``split_file`` (JSON ``{"train": [...], "val": [...], "test": [...]}`` or a CSV with an image
    column and a ``set``/``split`` column) overrides every other split; images it does not list
    get split None, as do KonIQ images listed in neither koniq_train.json nor koniq_test.json.
    ``check_exists`` verifies that every listed image file is on disk; decoding is left to
    ``load_rgb`` (callers decode each image once, before training).
    """
    if name not in DATASET_NAMES:
        raise UserError(f"--dataset '{name}' is unknown; choose one of {', '.join(DATASET_NAMES)}")
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol '{protocol}' is unknown; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "hyperiqa" and split_file is not None:
        raise UserError(f"--split_file '{split_file}' cannot be used with --protocol hyperiqa, whose rounds draw "
                        f"their own 80/20 splits from --split_seed; drop --split_file or use --protocol ours")
    root = os.fspath(root)
    if not os.path.exists(root):
        what = "the path of" if name == "csv" else "the folder holding"
        raise UserError(f"{name} root '{root}' does not exist; pass {what} {LAYOUTS[name]}")
    if name == "csv":
        names, samples = _read_generic_csv(root, image_col, score_col)
    else:
        if not os.path.isdir(root):
            raise UserError(f"{name} root '{root}' is not a folder; pass the folder holding {LAYOUTS[name]}")
        names, samples = _READERS[name](root, seed, check_exists, label_column(name, protocol))
    if not samples:
        raise UserError(f"the {name} annotations under '{root}' list no images; add one row per image")
    if check_exists:
        for listed, sample in zip(names, samples):
            if not os.path.isfile(sample.path):
                raise UserError(
                    f"{sample.origin}: image '{listed}' not found at {sample.path}; "
                    f"restore the image or remove this row"
                )
    group = (lambda s: s.ref) if name == "kadid-10k" else None
    if protocol == "hyperiqa":
        return hyperiqa_split(samples, seed, group=group)
    if split_file is not None:
        return _apply_split_file(names, samples, os.fspath(split_file))
    if name == "koniq-10k":
        return samples  # the reader already applied KonIQ's official / seed split
    return _seeded_split(samples, seed, group=group)


def label_column(name, protocol="ours", score_col=None):
    """The annotation column ``read_index`` takes the label from (``csv``: ``score_col`` or the detected one)."""
    if name == "csv":
        return score_col or f"first of {'/'.join(_SCORE_COLUMNS)}"
    if name == "koniq-10k" and protocol == "hyperiqa":
        return HYPERIQA_KONIQ_LABEL
    return LABEL_COLUMNS[name]


def split_source(name, root, *, split_file=None, protocol="ours"):
    """How ``read_index`` splits this dataset, in words (for results.json)."""
    grouped = " grouped by reference image" if name == "kadid-10k" else ""
    if protocol == "hyperiqa":
        return (f"hyperiqa: random 80/20 train/test{grouped}, validation = a seeded 1/8 of the 80% "
                f"(split seed)")
    if split_file is not None:
        return f"--split_file {split_file}"
    if name == "koniq-10k":
        official = _koniq_split_files(os.fspath(root))
        if official:
            return "official: " + " + ".join(os.path.basename(p) for p in official) + (
                "" if len(official) == 1 else ", validation = a seeded 1/8 of train (split seed)")
    return f"seeded 70/10/20{grouped} (split seed)"


def select_split(samples, split, dataset=None):
    """Samples of one split (``train``/``val``/``test``, or ``all``); an empty result is a UserError."""
    if split not in (*SPLITS, "all"):
        raise UserError(f"split '{split}' is unknown; use one of train, val, test, all")
    chosen = list(samples) if split == "all" else [s for s in samples if s.split == split]
    if not chosen:
        counts = ", ".join(f"{k}={sum(s.split == k for s in samples)}" for k in SPLITS)
        where = dataset or (samples[0].origin.rsplit(":", 1)[0] if samples else "the dataset")
        raise UserError(
            f"the '{split}' split of {where} is empty ({counts}); use a larger dataset "
            f"or pass --split_file with a non-empty '{split}' list"
        )
    return chosen


def mos_bounds(samples):
    """(lowest, highest) MOS of ``samples``, for rescaling to [0, 1]; Stage 2 passes its training split only."""
    values = [s.mos for s in samples]
    if not values:
        raise ValueError("mos_bounds needs at least one sample")
    lo, hi = float(min(values)), float(max(values))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)  # a constant-MOS set maps to 0, not to NaN


def normalize_mos(mos, bounds):
    """Rescale native MOS (float or array) to [0, 1] with ``mos_bounds``; higher stays better."""
    lo, hi = bounds
    return (mos - lo) / (hi - lo)


def load_rgb(path, origin=None, *, reduced=False):
    """Decode an image fully into an 8-bit RGB PIL image.

    Any mode is accepted: 1/L/P/CMYK/YCbCr are converted; images with transparency (RGBA, LA,
    PA, P with a transparent colour) are composited onto white, as they would be printed;
    16-bit and 32-bit modes (I;16, I, F) are scaled to 8 bits over their full range rather than
    clipped.  The pixel data are loaded here, so truncated, empty or non-image files fail with a
    UserError naming the file and the annotation row (``origin``).  ``reduced=True`` decodes
    JPEGs at 1/8 scale (libjpeg DCT scaling still reads the whole stream): a cheap check that
    a file decodes, with the same errors.
    """
    path = os.fspath(path)
    where = f" (listed at {origin})" if origin else ""
    if not os.path.isfile(path):
        raise UserError(f"image '{path}'{where} does not exist; restore it or remove its row")
    if os.path.getsize(path) == 0:
        raise UserError(f"image '{path}'{where} is empty (0 bytes); replace the file or remove its row")
    try:
        with Image.open(path) as img:
            if reduced:
                img.draft(None, (1, 1))
            img.load()
            return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot decode image '{path}'{where}: {reason[:160]}; replace the file or remove its row"
        ) from None


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # any case


def list_image_files(folder, flag):
    """The image files under ``folder`` (recursive), as paths relative to it, sorted; a one-line
    ``UserError`` naming ``flag`` when ``folder`` is missing, not a folder, or holds no images."""
    if not os.path.isdir(folder):
        problem = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UserError(f"{flag} '{folder}' {problem}; pass a folder of images")
    names = sorted(
        os.path.relpath(os.path.join(parent, name), folder)
        for parent, _, names in os.walk(folder) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not names:
        raise UserError(f"{flag} '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); check the path")
    return names


# ----------------------------------------------------------------------------- image modes

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _to_rgb(img):
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(img)
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _high_depth_to_rgb(img):
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        full_scale = 65535.0
    else:
        # 'I' and 'F' carry no nominal range: use the smallest usual one that holds the data
        # ([0, 1] floats, 8-bit, 16-bit), else the image's own peak.
        peak = float(values.max())
        usual = (1.0, 255.0, 65535.0) if img.mode == "F" else (255.0, 65535.0)
        full_scale = next((s for s in usual if peak <= s), peak)
    gray = np.clip(np.rint(values / full_scale * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


# ----------------------------------------------------------------------------- tables

def _read_table(path):
    """(header, [(row number, {column: value})]) of a CSV or .xlsx file; row numbers as in the file."""
    if path.lower().endswith((".xlsx", ".xlsm")):
        return _read_xlsx(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = []
            for cells in reader:
                if any(c.strip() for c in cells):
                    cells += [""] * (len(header) - len(cells))  # short rows read as empty cells
                    rows.append((reader.line_num, dict(zip(header, cells))))
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text; re-save it as UTF-8 CSV") from None
    except csv.Error as err:
        raise UserError(f"'{path}' is not a readable CSV ({err}); check its quoting") from None
    if not header:
        raise UserError(f"'{path}' is empty; it needs a header row and one row per image")
    return header, rows


def _read_xlsx(path):
    import openpyxl  # only SPAQ ships a spreadsheet

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises zipfile / XML / KeyError variants for damaged files
        raise UserError(f"cannot read spreadsheet '{path}' ({type(err).__name__}: {err}); re-export it as .xlsx") from None
    try:
        lines = list(book.worksheets[0].iter_rows(values_only=True))
    finally:
        book.close()
    if not lines:
        raise UserError(f"'{path}' is empty; it needs a header row and one row per image")
    header = ["" if h is None else str(h).strip() for h in lines[0]]
    rows = [
        (number, {h: ("" if v is None else str(v)) for h, v in zip(header, (*cells, *[None] * len(header)))})
        for number, cells in enumerate(lines[1:], start=2)
        if any(v is not None and str(v).strip() for v in cells)
    ]
    return header, rows


def _column(header, path, wanted, flag=None):
    """The header entry matching one of ``wanted`` (case-insensitive), else a UserError."""
    lowered = {h.lower(): h for h in header}
    for name in wanted:
        if name.lower() in lowered:
            return lowered[name.lower()]
    hint = f"; pass {flag} with the right column name" if flag else ""
    raise UserError(f"'{path}' has no column {' / '.join(repr(w) for w in wanted)} (columns: {', '.join(header)}){hint}")


def _parse_mos(value, origin, column):
    try:
        mos = float(str(value).strip())
    except ValueError:
        mos = math.nan
    if not math.isfinite(mos):
        raise UserError(f"{origin}: {column} value {str(value)!r} is not a finite number; fix or remove this row")
    return mos


def _need_file(path, dataset):
    if not os.path.isfile(path):
        raise UserError(f"{dataset} annotation file '{path}' not found; the {dataset} layout is {LAYOUTS[dataset]}")
    return path


# ----------------------------------------------------------------------------- readers
# Each reader returns (names as listed in the annotations, samples); names serve split files.

def _koniq_split_files(root):
    """The official split files of a KonIQ-10k root, in the order the reader prefers them ([] = none)."""
    sets_csv = os.path.join(root, "koniq10k_distributions_sets.csv")
    if os.path.isfile(sets_csv):
        return [sets_csv]
    jsons = [os.path.join(root, "koniq_train.json"), os.path.join(root, "koniq_test.json")]
    return jsons if any(os.path.isfile(p) for p in jsons) else []


def _read_koniq(root, seed, check_exists, label):
    scores_csv = os.path.join(root, "koniq10k_scores_and_distributions.csv")
    sets_csv = os.path.join(root, "koniq10k_distributions_sets.csv")
    # The sets file carries MOS too, so it alone is enough; a missing pair is reported by the scores name.
    table = sets_csv if os.path.isfile(sets_csv) and not os.path.isfile(scores_csv) else scores_csv
    header, rows = _read_table(_need_file(table, "koniq-10k"))
    if label == HYPERIQA_KONIQ_LABEL and label.lower() not in (h.lower() for h in header):
        raise UserError(f"'{table}' has no {label} column, the label HyperIQA trains on; provide "
                        f"koniq10k_scores_and_distributions.csv (it has one) or use --protocol ours")
    name_col, mos_col = _column(header, table, ["image_name"]), _column(header, table, [label])
    image_dir = next(
        (os.path.join(root, d) for d in ("1024x768", "512x384") if os.path.isdir(os.path.join(root, d))), None
    )
    if image_dir is None:
        if check_exists:
            raise UserError(f"koniq-10k root '{root}' has no image folder 1024x768/ or 512x384/; unpack the images there")
        image_dir = os.path.join(root, "1024x768")
    names, samples = [], []
    for number, row in rows:
        origin = f"{table}:{number}"
        name = row[name_col].strip()
        names.append(name)
        samples.append(Sample(os.path.join(image_dir, name), _parse_mos(row[mos_col], origin, mos_col), None, origin))

    official = _koniq_split_files(root)
    if not official:
        return names, _seeded_split(samples, seed)
    splits = _split_table(official[0]) if len(official) == 1 else _koniq_json_splits(*official, seed)
    return names, _assign_splits(names, samples, splits)


def _koniq_json_splits(train_json, test_json, seed):
    """HyperIQA-style koniq_train.json / koniq_test.json; validation = a seeded 1/8 of train."""
    for path in (train_json, test_json):
        if not os.path.isfile(path):
            raise UserError(f"'{path}' is missing while its train/test partner exists; provide both KonIQ split files")
    train = [name for name, _ in _json_names(train_json)]
    test = _json_names(test_json)
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, round(len(train) / 8)) if len(train) > 1 else 0
    val = {train[i] for i in order[:n_val]}
    splits = {name: ("val" if name in val else "train", f"{train_json}:{k}") for k, name in enumerate(train, 1)}
    splits.update({name: ("test", origin) for name, origin in test})
    return splits


def _read_json(path, what, advice):
    """Parsed JSON of ``path``; a syntax error is a one-line UserError naming ``what``."""
    with open(path, encoding="utf-8-sig") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise UserError(f"{what} is not valid JSON ({err.msg} at line {err.lineno}); {advice}") from None


def _json_names(path):
    """[(image name, origin)] from a JSON list of names or of {"image": ...} records."""
    data = _read_json(path, f"'{path}'", "fix or regenerate it")
    if isinstance(data, dict):
        inner = next((data[k] for k in _JSON_LIST_KEYS if isinstance(data.get(k), list)), None)
        data = inner if inner is not None else list(data)  # {name: score} maps
    if not isinstance(data, list):
        raise UserError(f"'{path}' must hold a list of image names or of {{\"image\": name}} records")
    return [(_json_entry_name(item, f"{path}:{k}"), f"{path}:{k}") for k, item in enumerate(data, 1)]


def _json_entry_name(item, origin):
    if isinstance(item, dict):
        key = next((k for k in _JSON_NAME_KEYS if k in item), None)
        if key is None:
            raise UserError(f"{origin}: record has none of the keys {', '.join(_JSON_NAME_KEYS)}; add the image name")
        item = item[key]
    if not isinstance(item, str) or not item.strip():
        raise UserError(f"{origin}: {item!r} is not an image name; fix this entry")
    return os.path.basename(item.strip())


def _read_spaq(root, seed, check_exists, label):
    stem = os.path.join(root, "Annotations", "MOS and Image attribute scores")
    table = next((stem + ext for ext in (".xlsx", ".csv") if os.path.isfile(stem + ext)), stem + ".xlsx")
    header, rows = _read_table(_need_file(table, "spaq"))
    name_col, mos_col = _column(header, table, ["Image name"]), _column(header, table, [label])
    image_dir = os.path.join(root, "TestImage")
    return _simple_samples(table, rows, name_col, mos_col, lambda name: os.path.join(image_dir, name))


def _read_kadid(root, seed, check_exists, label):
    table = _need_file(os.path.join(root, "dmos.csv"), "kadid-10k")
    header, rows = _read_table(table)
    name_col, ref_col = _column(header, table, ["dist_img"]), _column(header, table, ["ref_img"])
    mos_col = _column(header, table, [label])
    image_dir = os.path.join(root, "images")
    names, samples = _simple_samples(table, rows, name_col, mos_col, lambda name: os.path.join(image_dir, name))
    refs = [row[ref_col].strip() for _, row in rows]
    return names, [replace(s, ref=ref) for s, ref in zip(samples, refs)]


def _read_agiqa(root, seed, check_exists, label):
    table = _need_file(os.path.join(root, "data.csv"), "agiqa-3k")
    header, rows = _read_table(table)
    name_col, mos_col = _column(header, table, ["name"]), _column(header, table, [label])
    folders = [root, os.path.join(root, "images"), os.path.join(root, "AGIQA-3K")]

    def locate(name):
        return next((p for p in (os.path.join(d, name) for d in folders) if os.path.isfile(p)), os.path.join(root, name))

    return _simple_samples(table, rows, name_col, mos_col, locate)


def _read_livec(root, seed, check_exists, label):
    from scipy.io import loadmat

    names_mat = _need_file(os.path.join(root, "Data", "AllImages_release.mat"), "livec")
    mos_mat = _need_file(os.path.join(root, "Data", "AllMOS_release.mat"), "livec")
    all_names = [str(np.ravel(cell)[0]).strip() for cell in np.ravel(_mat_variable(loadmat, names_mat, "AllImages_release"))]
    all_mos = np.ravel(_mat_variable(loadmat, mos_mat, label))
    if len(all_names) != len(all_mos):
        raise UserError(
            f"'{names_mat}' lists {len(all_names)} images but '{mos_mat}' has {len(all_mos)} scores; use matching release files"
        )
    image_dir = os.path.join(root, "Images")
    names, samples = [], []
    for index in range(7, len(all_names)):  # entries 1-7 are LIVE-C's training images (t1..t7)
        origin = f"{mos_mat}:{index + 1}"
        names.append(all_names[index])
        mos = _parse_mos(all_mos[index], origin, label)
        samples.append(Sample(os.path.join(image_dir, all_names[index]), mos, None, origin))
    return names, samples


def _mat_variable(loadmat, path, key):
    try:
        content = loadmat(path)
    except (ValueError, OSError, TypeError) as err:
        raise UserError(f"cannot read MATLAB file '{path}' ({err}); replace it with the LIVE-C release file") from None
    if key not in content:
        found = ", ".join(k for k in content if not k.startswith("__"))
        raise UserError(f"'{path}' has no variable '{key}' (found: {found}); use the LIVE-C release file")
    return content[key]


def _read_generic_csv(table, image_col, score_col):
    if not os.path.isfile(table):
        raise UserError(f"csv dataset root '{table}' is a folder; pass the CSV file itself as the root")
    header, rows = _read_table(table)
    name_col = _column(header, table, [image_col] if image_col else _IMAGE_COLUMNS, "--image_col")
    mos_col = _column(header, table, [score_col] if score_col else _SCORE_COLUMNS, "--score_col")
    base = os.path.dirname(os.path.abspath(table))
    return _simple_samples(table, rows, name_col, mos_col, lambda name: os.path.join(base, name))


def _simple_samples(table, rows, name_col, mos_col, locate):
    names, samples = [], []
    for number, row in rows:
        origin = f"{table}:{number}"
        name = row[name_col].strip()
        if not name:
            raise UserError(f"{origin}: the {name_col} cell is empty; fill in the image name or remove this row")
        names.append(name)
        samples.append(Sample(locate(name), _parse_mos(row[mos_col], origin, mos_col), None, origin))
    return names, samples


_READERS = {
    "koniq-10k": _read_koniq,
    "spaq": _read_spaq,
    "kadid-10k": _read_kadid,
    "agiqa-3k": _read_agiqa,
    "livec": _read_livec,
}


# ----------------------------------------------------------------------------- splits

def _seeded_split(samples, seed, group=None):
    """Seeded 70/10/20 train/val/test split; with ``group`` whole groups go to one split."""
    key = group or (lambda s: s.path)
    groups = sorted({key(s) for s in samples})
    order = np.random.default_rng(seed).permutation(len(groups))
    n_test, n_val = round(0.2 * len(groups)), round(0.1 * len(groups))
    if len(groups) >= 3:  # tiny sets still get one group in every split
        n_test, n_val = max(1, n_test), max(1, n_val)
    split_of = {}
    for rank, index in enumerate(order):
        split_of[groups[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return [replace(s, split=split_of[key(s)]) for s in samples]


def hyperiqa_split(samples, seed, group=None):
    """HyperIQA's split (train_test_IQA.py) with a validation part: a seeded random 80/20 train/test
    split of the images (``group``: of whole groups, e.g. KADID-10k reference images), then a seeded
    1/8 of the training 80% as validation, so the epoch is never chosen on the test images.

    The 80% is ``round(0.8 * n)`` as in HyperIQA.  Depends on ``seed`` (a round's split seed) only.
    """
    key = group or (lambda s: s.path)
    groups = sorted({key(s) for s in samples})
    order = np.random.default_rng(seed).permutation(len(groups))
    n_train = int(round(HYPERIQA_TRAIN_FRACTION * len(groups)))
    n_val = max(1, round(HYPERIQA_VAL_SHARE * n_train)) if n_train > 1 else 0
    split_of = {}
    for rank, index in enumerate(order):
        split_of[groups[index]] = "val" if rank < n_val else "train" if rank < n_train else "test"
    return [replace(s, split=split_of[key(s)]) for s in samples]


def _split_table(path):
    """{image name: (split, origin)} from a CSV/xlsx with an image column and a set/split column."""
    header, rows = _read_table(path)
    name_col, set_col = _column(header, path, _IMAGE_COLUMNS), _column(header, path, _SET_COLUMNS)
    splits = {}
    for number, row in rows:
        value = row[set_col].strip().lower()
        if value not in _SPLIT_ALIASES:
            raise UserError(
                f"{path}:{number}: {set_col} value {row[set_col]!r} is not a split; use training/validation/test"
            )
        splits[os.path.basename(row[name_col].strip())] = (_SPLIT_ALIASES[value], f"{path}:{number}")
    return splits


def _split_json(path):
    """{image name: (split, origin)} from {"train": [...], "val": [...], "test": [...]}."""
    data = _read_json(path, f"--split_file '{path}'", "fix it")
    if not isinstance(data, dict) or not data:
        raise UserError(f"--split_file '{path}' must be a JSON object {{\"train\": [names], \"val\": [...], \"test\": [...]}}")
    splits = {}
    for key, entries in data.items():
        split = _SPLIT_ALIASES.get(str(key).strip().lower())
        if split is None or not isinstance(entries, list):
            raise UserError(f"--split_file '{path}': key '{key}' is not train/val/test with a list of image names")
        for k, item in enumerate(entries, 1):
            origin = f"{path}:{key}[{k}]"
            splits[_json_entry_name(item, origin)] = (split, origin)
    return splits


def _apply_split_file(names, samples, path):
    if not os.path.isfile(path):
        raise UserError(f"--split_file '{path}' does not exist; check the path")
    splits = _split_json(path) if path.lower().endswith(".json") else _split_table(path)
    return _assign_splits(names, samples, splits)


def _assign_splits(names, samples, splits):
    """Give each sample the split its image name has in ``splits``; unlisted images get None.

    A split entry naming an image the dataset does not contain is an error (a split file for
    another dataset or version would otherwise silently leave a split empty).
    """
    known = {os.path.basename(n) for n in names}
    for name, (_, origin) in splits.items():
        if name not in known:
            raise UserError(f"{origin}: image '{name}' is not in the dataset's annotations; remove it from the split file")
    return [replace(s, split=splits.get(os.path.basename(n), (None,))[0]) for n, s in zip(names, samples)]
