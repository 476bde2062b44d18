"""iqa.datasets readers on small files written here in each dataset's real format."""
import csv
import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from iqa.datasets import (DATASET_NAMES, Sample, load_rgb, mos_bounds, normalize_mos, read_index,
                          select_split)
from iqa.runtime import UserError


def touch_image(path, color=(120, 60, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)


def write_csv(path, header, rows, quoting=csv.QUOTE_MINIMAL):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, quoting=quoting)
        writer.writerow(header)
        writer.writerows(rows)


def splits_of(samples):
    return {os.path.basename(s.path): s.split for s in samples}


# ----------------------------------------------------------------------------- KonIQ-10k

KONIQ_COLUMNS = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]


def make_koniq(root, n=10, folder="1024x768"):
    names = [f"{10000000 + i}.jpg" for i in range(n)]
    rows = [[name, 0, 1, 2, 3, 4, 10, 1.0 + 0.25 * i, 0.5, 10.0 * i] for i, name in enumerate(names)]
    # The official file quotes every string, the header included.
    write_csv(root / "koniq10k_scores_and_distributions.csv", KONIQ_COLUMNS, rows, csv.QUOTE_NONNUMERIC)
    for name in names:
        touch_image(str(root / folder / name))
    return names


def test_koniq_official_sets_file(tmp_path):
    names = make_koniq(tmp_path)
    sets = ["training"] * 6 + ["validation"] * 2 + ["test"] * 2
    write_csv(tmp_path / "koniq10k_distributions_sets.csv", ["image_name", "MOS", "set"],
              [[n, 1.0, s] for n, s in zip(names, sets)], csv.QUOTE_NONNUMERIC)
    assert open(tmp_path / "koniq10k_scores_and_distributions.csv").readline().startswith('"image_name","c1"')
    samples = read_index("koniq-10k", tmp_path)
    assert [s.mos for s in samples] == [1.0 + 0.25 * i for i in range(10)]  # MOS, not MOS_zscore
    assert [s.split for s in samples] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert samples[0].path == os.path.join(str(tmp_path), "1024x768", names[0])
    assert samples[3].origin == f"{tmp_path / 'koniq10k_scores_and_distributions.csv'}:5"


def test_koniq_sets_file_alone_and_512_folder(tmp_path):
    names = [f"{i}.jpg" for i in range(5)]
    write_csv(tmp_path / "koniq10k_distributions_sets.csv", ["image_name", "MOS", "set"],
              [[n, 2.0 + i, "test" if i == 4 else "training"] for i, n in enumerate(names)], csv.QUOTE_NONNUMERIC)
    for name in names:
        touch_image(str(tmp_path / "512x384" / name))
    samples = read_index("koniq-10k", tmp_path)
    assert [s.mos for s in samples] == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert [s.split for s in samples] == ["train"] * 4 + ["test"]
    assert all("512x384" in s.path for s in samples)


@pytest.mark.parametrize("style", ["records", "names", "wrapped"])
def test_koniq_seed_json_splits(tmp_path, style):
    names = make_koniq(tmp_path, n=20)
    train, test, unlisted = names[:16], names[16:19], names[19]

    def entries(listed):
        if style == "records":  # HyperIQA-style: {"image": "koniq_train/<name>", "score": ...}
            return [{"image": f"koniq_train/{n}", "score": 50.0} for n in listed]
        return list(listed) if style == "names" else {"images": list(listed)}

    (tmp_path / "koniq_train.json").write_text(json.dumps(entries(train)))
    (tmp_path / "koniq_test.json").write_text(json.dumps(entries(test)))
    split = splits_of(read_index("koniq-10k", tmp_path, seed=3))
    assert {n for n in train if split[n] == "val"} and Counter(split[n] for n in train) == {"train": 14, "val": 2}
    assert all(split[n] == "test" for n in test)
    assert split[unlisted] is None
    assert splits_of(read_index("koniq-10k", tmp_path, seed=3)) == split  # seeded


def test_koniq_json_needs_both_files(tmp_path):
    make_koniq(tmp_path)
    (tmp_path / "koniq_train.json").write_text("[]")
    with pytest.raises(UserError, match="koniq_test.json"):
        read_index("koniq-10k", tmp_path)


def test_koniq_json_entry_not_in_annotations(tmp_path):
    make_koniq(tmp_path)
    (tmp_path / "koniq_train.json").write_text(json.dumps([{"image": "x/999.jpg"}]))
    (tmp_path / "koniq_test.json").write_text("[]")
    with pytest.raises(UserError, match=r"koniq_train.json:1: image '999.jpg'"):
        read_index("koniq-10k", tmp_path)


def test_koniq_seeded_split_without_split_files(tmp_path):
    make_koniq(tmp_path, n=40)
    first = read_index("koniq-10k", tmp_path, seed=0)
    assert Counter(s.split for s in first) == {"train": 28, "val": 4, "test": 8}
    assert [s.split for s in read_index("koniq-10k", tmp_path, seed=0)] == [s.split for s in first]
    assert [s.split for s in read_index("koniq-10k", tmp_path, seed=1)] != [s.split for s in first]


def test_koniq_without_image_folder(tmp_path):
    write_csv(tmp_path / "koniq10k_scores_and_distributions.csv", KONIQ_COLUMNS, [["a.jpg", *[1] * 9]])
    with pytest.raises(UserError, match="1024x768/ or 512x384/"):
        read_index("koniq-10k", tmp_path)


# ----------------------------------------------------------------------------- other datasets

def test_spaq_xlsx(tmp_path):
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"])
    for i in range(10):
        sheet.append([f"{i + 1:05d}.jpg", 10.0 * i + 0.5, 1, 2, 3, 4, 5])
        touch_image(str(tmp_path / "TestImage" / f"{i + 1:05d}.jpg"))
    os.makedirs(tmp_path / "Annotations")
    book.save(tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx")
    samples = read_index("spaq", tmp_path)
    assert [s.mos for s in samples] == [10.0 * i + 0.5 for i in range(10)]
    assert samples[2].origin.endswith("MOS and Image attribute scores.xlsx:4")
    assert Counter(s.split for s in samples) == {"train": 7, "val": 1, "test": 2}


def test_spaq_csv_variant(tmp_path):
    write_csv(tmp_path / "Annotations" / "MOS and Image attribute scores.csv", ["Image name", "MOS"],
              [["00001.jpg", 42.0], ["00002.jpg", 7.5], ["00003.jpg", 99]])
    for i in (1, 2, 3):
        touch_image(str(tmp_path / "TestImage" / f"{i:05d}.jpg"))
    assert [s.mos for s in read_index("spaq", tmp_path)] == [42.0, 7.5, 99.0]


def test_kadid_grouped_split(tmp_path):
    rows = []
    for ref in range(1, 11):
        for dist in range(1, 6):
            name = f"I{ref:02d}_{dist:02d}_03.png"
            rows.append([name, f"I{ref:02d}.png", 1 + (ref + dist) % 5, 0.5])
            touch_image(str(tmp_path / "images" / name))
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
    samples = read_index("kadid-10k", tmp_path, seed=5)
    assert [s.mos for s in samples] == [float(r[2]) for r in rows]
    splits_per_ref = {}
    for s in samples:
        splits_per_ref.setdefault(s.ref, set()).add(s.split)
    assert all(len(v) == 1 for v in splits_per_ref.values())  # no reference in two splits
    assert Counter(next(iter(v)) for v in splits_per_ref.values()) == {"train": 7, "val": 1, "test": 2}


@pytest.mark.parametrize("subfolder", ["", "images"])
def test_agiqa_prompts_with_commas(tmp_path, subfolder):
    header = ["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align"]
    rows = [
        ["a.jpg", "a cat, on a sofa, digital art", "nice", "", "anime", 3.25, 0.4, 2.0, 0.3],
        ["b.jpg", 'a "quoted" word, then more, commas', "", "", "", 1.5, 0.4, 4.0, 0.3],
        ["c.jpg", "plain", "", "", "", 4.0, 0.4, 1.0, 0.3],
    ]
    write_csv(tmp_path / "data.csv", header, rows)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        touch_image(str(tmp_path / subfolder / name))
    samples = read_index("agiqa-3k", tmp_path)
    assert [s.mos for s in samples] == [3.25, 1.5, 4.0]  # mos_quality, not shifted by the commas
    assert os.path.samefile(samples[1].path, tmp_path / subfolder / "b.jpg")


def write_livec(root, n_test=5):
    from scipy.io import savemat

    names = [f"t{k}.bmp" for k in range(1, 8)] + [f"{k}.bmp" for k in range(100, 100 + n_test)]
    mos = [1.0] * 7 + [10.0 * k for k in range(n_test)]
    cells = np.empty((len(names), 1), dtype=object)
    cells[:, 0] = names
    os.makedirs(root / "Data")
    savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cells})
    savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos])})
    for name in names[7:]:
        touch_image(str(root / "Images" / name))
    return names, mos


def test_livec_mat_drops_training_images(tmp_path):
    names, mos = write_livec(tmp_path)
    samples = read_index("livec", tmp_path)
    assert [os.path.basename(s.path) for s in samples] == names[7:]
    assert [s.mos for s in samples] == mos[7:]
    assert samples[0].origin.endswith("AllMOS_release.mat:8")


def test_generic_csv_columns_and_paths(tmp_path):
    touch_image(str(tmp_path / "imgs" / "x.png"))
    touch_image(str(tmp_path / "abs" / "y.png"))
    table = tmp_path / "list.csv"
    write_csv(table, ["file", "MOS", "other"],
              [["imgs/x.png", 3, "a"], [str(tmp_path / "abs" / "y.png"), 4, "b"], ["imgs/x.png", 5, "c"]])
    samples = read_index("csv", table)
    assert [s.mos for s in samples] == [3.0, 4.0, 5.0]
    assert os.path.samefile(samples[0].path, tmp_path / "imgs" / "x.png")
    assert os.path.samefile(samples[1].path, tmp_path / "abs" / "y.png")
    explicit = read_index("csv", table, image_col="FILE", score_col="mos")  # names match case-insensitively
    assert [s.path for s in explicit] == [s.path for s in samples]
    with pytest.raises(UserError, match="--score_col"):
        read_index("csv", table, score_col="quality_score")


def test_generic_csv_non_numeric_score_column(tmp_path):
    touch_image(str(tmp_path / "x.png"))
    write_csv(tmp_path / "l.csv", ["path", "grade"], [["x.png", "3"], ["x.png", "good"]])
    with pytest.raises(UserError, match=r"l\.csv:3: grade value 'good' is not a finite number"):
        read_index("csv", tmp_path / "l.csv", score_col="grade")


# ----------------------------------------------------------------------------- split files

def make_agiqa(root, n=6):
    header = ["name", "prompt", "mos_quality"]
    write_csv(root / "data.csv", header, [[f"{i}.jpg", "p, q", i] for i in range(n)])
    for i in range(n):
        touch_image(str(root / f"{i}.jpg"))


def test_split_file_json_and_csv(tmp_path):
    make_agiqa(tmp_path)
    split_json = tmp_path / "split.json"
    split_json.write_text(json.dumps({"train": ["0.jpg", "1.jpg", "2.jpg"], "val": ["3.jpg"], "test": ["sub/4.jpg"]}))
    expect = {"0.jpg": "train", "1.jpg": "train", "2.jpg": "train", "3.jpg": "val", "4.jpg": "test", "5.jpg": None}
    assert splits_of(read_index("agiqa-3k", tmp_path, split_file=split_json)) == expect
    split_csv = tmp_path / "split.csv"
    write_csv(split_csv, ["image_name", "set"], [[n, {"train": "training", "val": "validation", "test": "test"}[s]]
                                                 for n, s in expect.items() if s])
    assert splits_of(read_index("agiqa-3k", tmp_path, split_file=split_csv)) == expect


def test_split_file_errors(tmp_path):
    make_agiqa(tmp_path)
    bad_name = tmp_path / "split.json"
    bad_name.write_text(json.dumps({"train": ["0.jpg", "missing.jpg"]}))
    with pytest.raises(UserError, match=r"split.json:train\[2\]: image 'missing.jpg'"):
        read_index("agiqa-3k", tmp_path, split_file=bad_name)
    bad_set = tmp_path / "split.csv"
    write_csv(bad_set, ["image_name", "set"], [["0.jpg", "training"], ["1.jpg", "holdout"]])
    with pytest.raises(UserError, match=r"split.csv:3: set value 'holdout'"):
        read_index("agiqa-3k", tmp_path, split_file=bad_set)


def test_select_split_and_empty_split(tmp_path):
    make_agiqa(tmp_path, n=2)  # too small for three splits: seeded split puts everything in train
    samples = read_index("agiqa-3k", tmp_path)
    assert len(select_split(samples, "train")) == 2 and len(select_split(samples, "all")) == 2
    with pytest.raises(UserError, match=r"'test' split of agiqa-3k is empty .*train=2"):
        select_split(samples, "test", "agiqa-3k")
    with pytest.raises(UserError, match=r"'val' split of .*data.csv is empty"):
        select_split(samples, "val")


# ----------------------------------------------------------------------------- user mistakes

def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(UserError, match="--dataset 'tid2013' is unknown"):
        read_index("tid2013", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        read_index("kadid-10k", tmp_path / "nowhere")
    assert set(DATASET_NAMES) == {"koniq-10k", "spaq", "kadid-10k", "agiqa-3k", "livec", "csv"}


@pytest.mark.parametrize("name, expected", [
    ("koniq-10k", "koniq10k_scores_and_distributions.csv"),
    ("spaq", "MOS and Image attribute scores.xlsx"),
    ("kadid-10k", "dmos.csv"),
    ("agiqa-3k", "data.csv"),
    ("livec", "AllImages_release.mat"),
])
def test_missing_annotation_file_names_it(tmp_path, name, expected):
    with pytest.raises(UserError, match=f"{expected}' not found; the {name} layout is"):
        read_index(name, tmp_path)


def test_missing_column(tmp_path):
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "score"], [["a.png", "r.png", 1]])
    with pytest.raises(UserError, match=r"dmos.csv' has no column 'dmos' \(columns: dist_img, ref_img, score\)"):
        read_index("kadid-10k", tmp_path)


def test_missing_image_names_file_and_row(tmp_path):
    make_agiqa(tmp_path, n=4)
    os.remove(tmp_path / "2.jpg")
    with pytest.raises(UserError, match=r"data.csv:4: image '2.jpg' not found"):
        read_index("agiqa-3k", tmp_path)
    assert len(read_index("agiqa-3k", tmp_path, check_exists=False)) == 4


@pytest.mark.parametrize("bad", ["n/a", "nan", "inf", ""])
def test_bad_mos_names_row(tmp_path, bad):
    rows = [["a.png", "r.png", 3.0, 0], ["b.png", "r.png", bad, 0]]
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
    with pytest.raises(UserError, match=r"dmos.csv:3: dmos value .* is not a finite number"):
        read_index("kadid-10k", tmp_path, check_exists=False)


def test_livec_mismatched_mat_files(tmp_path):
    from scipy.io import savemat

    write_livec(tmp_path)
    savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.ones((1, 3))})
    with pytest.raises(UserError, match="lists 12 images but .* has 3 scores"):
        read_index("livec", tmp_path)


# ----------------------------------------------------------------------------- MOS scale

def test_mos_bounds_and_normalize():
    samples = [Sample(f"{i}.jpg", m, "train", f"f.csv:{i}") for i, m in enumerate([20.0, 60.0, 100.0])]
    bounds = mos_bounds(samples)
    assert bounds == (20.0, 100.0)
    np.testing.assert_allclose(normalize_mos(np.array([20.0, 60.0, 100.0]), bounds), [0.0, 0.5, 1.0])
    assert mos_bounds(samples[:1]) == (20.0, 21.0)  # constant MOS maps to 0, never NaN


# ----------------------------------------------------------------------------- load_rgb

def saved(tmp_path, img, name):
    path = tmp_path / name
    img.save(path)
    return str(path)


def test_load_rgb_modes(tmp_path):
    gray = load_rgb(saved(tmp_path, Image.new("L", (4, 4), 77), "g.png"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_rgb(saved(tmp_path, pal, "p.png")).getpixel((0, 0)) == (10, 200, 30)
    rgba = Image.new("RGBA", (4, 4), (100, 0, 0, 0))
    rgba.putpixel((1, 1), (100, 0, 0, 255))
    out = load_rgb(saved(tmp_path, rgba, "a.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (100, 0, 0)  # composited on white
    cmyk = load_rgb(saved(tmp_path, Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "c.jpg"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[0] > 200 and cmyk.getpixel((0, 0))[1] < 50
    one = load_rgb(saved(tmp_path, Image.new("1", (4, 4), 1), "b.png"))
    assert one.getpixel((0, 0)) == (255, 255, 255)


def test_load_rgb_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = np.asarray(load_rgb(saved(tmp_path, img, "d.png")))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(load_rgb(saved(tmp_path, floats, "f.tif")))[0, :, 0].tolist() == [0, 128, 255]


def test_load_rgb_bad_files(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    for name, reason in [("cut.jpg", "cannot decode"), ("empty.jpg", "empty"), ("notes.jpg", "cannot decode"),
                         ("gone.jpg", "does not exist")]:
        with pytest.raises(UserError, match=reason) as err:
            load_rgb(tmp_path / name, origin="data.csv:7")
        message = str(err.value)
        assert name in message and "data.csv:7" in message and "\n" not in message


def test_header_only_annotations(tmp_path):
    write_csv(tmp_path / "data.csv", ["name", "mos_quality"], [])
    with pytest.raises(UserError, match="list no images"):
        read_index("agiqa-3k", tmp_path)
