"""tools/make_demo_data.py: its folders read back through iqa.datasets with sensible scores."""
import csv
import importlib.util
import io
import os

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from iqa.datasets import load_rgb, read_index, select_split
from iqa.runtime import UserError

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "make_demo_data.py")
_spec = importlib.util.spec_from_file_location("make_demo_data", _TOOL)
make_demo_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_demo_data)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_data"
    return out, make_demo_data.build_demo(out, n_koniq=12, n_others=8, seed=0)


def test_every_demo_dataset_reads_back_with_mos_tracking_the_degradation(demo):
    out, roots = demo
    with open(out / "demo_truth.csv", newline="") as f:
        truth = list(csv.DictReader(f))
    strength = {(row["dataset"], row["image"]): float(row["strength"]) for row in truth}
    # KADID-10k is synthetic (one distortion per image, as its file names say); the rest are mixtures
    kinds = {name: {row["distortion"] for row in truth if row["dataset"] == name} for name in roots}
    assert kinds.pop("kadid-10k") == set(make_demo_data.DISTORTIONS)
    assert all(found == {make_demo_data.MIXED} for found in kinds.values()), kinds
    assert set(roots) == {"koniq-10k", "spaq", "kadid-10k", "agiqa-3k", "livec"}
    for name, root in roots.items():
        samples = read_index(name, root)
        assert len(samples) == (12 if name == "koniq-10k" else 8)
        for split in ("train", "val", "test"):
            assert select_split(samples, split, name)
        known = [strength[(name, os.path.relpath(s.path, root))] for s in samples]
        rho = stats.spearmanr(known, [s.mos for s in samples]).statistic
        assert rho < -0.8, (name, rho)
        assert load_rgb(samples[0].path, samples[0].origin).size in {(512, 384), (640, 480), (500, 500)}
    assert "synthetic" in (out / "README.txt").read_text().lower()


def test_stage1_jpeg_ladder_is_visible_on_the_demo_koniq_images(demo):
    # The images Stage 1 treats as clean must not be compressed already: re-encoding them at
    # Stage 1's strongest JPEG level (quality 25) has to change them visibly.  With JPEG in their
    # mixture (quality ~22 at s = 0.5) the median change was 2.1 grey levels.
    _, roots = demo
    changes = []
    for sample in read_index("koniq-10k", roots["koniq-10k"]):
        image = load_rgb(sample.path, sample.origin)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=25)
        reencoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float64)
        changes.append(np.abs(reencoded - np.asarray(image, dtype=np.float64)).mean())
    assert np.median(changes) > 5.0, changes


def test_demo_is_idempotent_and_rebuilds_on_force(demo):
    out, _ = demo
    marker = out / make_demo_data.SETTINGS_FILE
    before = marker.stat().st_mtime_ns
    make_demo_data.build_demo(out, n_koniq=12, n_others=8, seed=0)
    assert marker.stat().st_mtime_ns == before
    assert make_demo_data.is_complete(str(out), make_demo_data.demo_settings(12, 8, 0, (512, 384)))
    assert not make_demo_data.is_complete(str(out), make_demo_data.demo_settings(12, 8, 1, (512, 384)))
    older = {**make_demo_data.demo_settings(12, 8, 0, (512, 384)), "version": make_demo_data.DEMO_VERSION - 1}
    assert not make_demo_data.is_complete(str(out), older)  # an older generator's folder is rebuilt
    make_demo_data.build_demo(out, n_koniq=12, n_others=8, seed=0, force=True)
    assert marker.stat().st_mtime_ns != before


def test_smallest_demo_has_two_images_in_each_evaluation_split(tmp_path):
    roots = make_demo_data.build_demo(tmp_path / "small", n_koniq=5, n_others=3, size=(128, 96))
    samples = read_index("koniq-10k", roots["koniq-10k"])
    assert [len(select_split(samples, s, "koniq-10k")) for s in ("train", "val", "test")] == [1, 2, 2]
    with pytest.raises(UserError, match="--koniq must be at least 5"):
        make_demo_data.build_demo(tmp_path / "too_small", n_koniq=4, n_others=3)


def test_demo_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(UserError, match="is not a demo folder"):
        make_demo_data.build_demo(tmp_path, n_koniq=4, n_others=4)
    assert (tmp_path / "mine.txt").exists()
