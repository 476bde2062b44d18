"""Stage-1 diagnostics: level-ranking accuracy against hand-worked orders, feature spread against numpy."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.helpers import run_cli

from iqa.runtime import UserError
from models.quality_encoder import QualityEncoder
from qualiclip_pretrain.diagnostics import (
    COLLAPSE_SPREAD,
    centre_crop,
    choose_images,
    collapse_warning,
    feature_spread,
    level_ranking_accuracy,
    pairwise_order_accuracy,
)

ANCHORS = torch.eye(2)  # row 0 positive, row 1 negative: log-odds = 100 * (cos(f, e0) - cos(f, e1))


class ScalarQuality(nn.Module):
    """Feature (s, 1) for a per-image scalar s >= 0: the score's log-odds 100 * (s - 1) / sqrt(s^2 + 1)
    increases strictly with s. Records the mode it ran in."""

    def __init__(self, scalar):
        super().__init__()
        self.scalar = scalar
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        s = self.scalar(x)
        return torch.stack([s, torch.ones_like(s)], dim=1)


def sharpness(x):
    """Mean |Laplacian|: falls with blur, grows with noise."""
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.abs().mean(dim=(1, 2, 3))


def darkness(x):
    return torch.exp(-x.mean(dim=(1, 2, 3)))


def brightness(x):
    return torch.exp(x.mean(dim=(1, 2, 3)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three textured mid-grey images (values 60..190: no clipping by x1.5 or by the noise mean)."""
    folder = tmp_path_factory.mktemp("heldout")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(160, 120), (120, 160), (192, 144)]):
        smooth = np.kron(rng.uniform(60, 190, (size[1] // 8, size[0] // 8, 3)), np.ones((8, 8, 1)))
        path = folder / f"img{i}.png"
        Image.fromarray(smooth.astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def accuracy(model, paths, types, **kw):
    kw = {"crop_size": 64, "resize": 96, "progress": False, **kw}
    return level_ranking_accuracy(model, ANCHORS, paths, types, **kw)


def test_pairwise_order_accuracy_hand_worked():
    assert pairwise_order_accuracy(torch.tensor([[3.0, 2.0, 1.0]])) == 1.0
    assert pairwise_order_accuracy(torch.tensor([[1.0, 2.0, 3.0]])) == 0.0
    # pairs (0,1) tie -> 1/2, (0,2) and (1,2) correct -> (0.5 + 1 + 1) / 3
    assert pairwise_order_accuracy(torch.tensor([[1.0, 1.0, 0.0]])) == pytest.approx(2.5 / 3)
    # mean over rows
    assert pairwise_order_accuracy(torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])) == 0.5


def test_sharpness_model_orders_blur_perfectly_and_noise_backwards(photos):
    acc = accuracy(ScalarQuality(sharpness), photos, ["blur", "noise"])
    # Clean then sigma 0.5..2.5: sharpness falls at every step; noise sigma 5..25 raises it at every step.
    assert acc["blur"] == 1.0
    assert acc["noise"] == 0.0
    assert acc["overall"] == 0.5
    assert set(acc) == {"blur", "noise", "overall"}


def test_brightness_ladder_hand_worked(photos):
    # Versions: clean (x1.0), then x1.3, x0.7, x1.5, x0.5, x0.3. A model preferring darker images
    # orders a pair correctly iff the milder version is the darker one: (1.0,1.3), (1.0,1.5),
    # (1.3,1.5), (0.7,1.5) -> 4 of 15 pairs; one preferring brighter images gets the other 11.
    assert accuracy(ScalarQuality(darkness), photos, ["brightness"])["brightness"] == pytest.approx(4 / 15)
    assert accuracy(ScalarQuality(brightness), photos, ["brightness"])["brightness"] == pytest.approx(11 / 15)


def test_constant_features_score_chance(photos):
    acc = accuracy(ScalarQuality(lambda x: torch.zeros(x.shape[0])), photos, ["blur", "jpeg", "noise", "brightness"])
    assert acc == {"blur": 0.5, "jpeg": 0.5, "noise": 0.5, "brightness": 0.5, "overall": 0.5}


@pytest.mark.parametrize("training", [True, False])
def test_runs_in_eval_mode_and_restores_mode(photos, training):
    model = ScalarQuality(sharpness).train(training)
    accuracy(model, photos[:1], ["blur"])
    assert model.modes and not any(model.modes)
    assert model.training is training


def test_deterministic_and_independent_of_batching(photos):
    types = ["jpeg", "noise"]
    one = accuracy(ScalarQuality(sharpness), photos, types, batch_size=1)
    many = accuracy(ScalarQuality(sharpness), photos, types, batch_size=64)
    assert one == many == accuracy(ScalarQuality(sharpness), photos, types, batch_size=1)
    # the noise is seeded: another seed draws other noise (compare the features, not the accuracy)
    seen = {}
    for seed in (0, 1):
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 2))
        torch.manual_seed(0)
        model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        outputs = []
        model.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone()))
        accuracy(model, photos[:1], ["noise"], seed=seed)
        seen[seed] = torch.cat(outputs)
    assert not torch.equal(seen[0][1:], seen[1][1:])  # degraded versions differ
    torch.testing.assert_close(seen[0][0], seen[1][0], rtol=0, atol=0)  # clean crop identical


def test_centre_crop_matches_pil(photos):
    crop = centre_crop(photos[2], 96, 64)  # 192x144 -> shorter side 96: 128x96, centre 64x64 at (32, 16)
    with Image.open(photos[2]) as image:
        expected = image.convert("RGB").resize((128, 96), Image.BICUBIC).crop((32, 16, 96, 80))
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected))
    native = centre_crop(photos[2], 0, 64)  # 0 = native size
    with Image.open(photos[2]) as image:
        np.testing.assert_array_equal(np.asarray(native), np.asarray(image.convert("RGB").crop((64, 40, 128, 104))))


def test_choose_images():
    paths = [f"p{i}" for i in range(10)]
    chosen = choose_images(paths, 4, seed=3)
    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert chosen == sorted(chosen, key=paths.index)  # input order kept
    assert chosen == choose_images(paths, 4, seed=3)
    assert choose_images(paths, 10, seed=3) == paths and choose_images(paths, 20, seed=3) == paths
    for bad in (0, -1):
        with pytest.raises(UserError, match="--level_eval_images"):
            choose_images(paths, bad, seed=0)


def test_no_images_is_an_error():
    with pytest.raises(UserError, match="held-out image"):
        level_ranking_accuracy(ScalarQuality(sharpness), ANCHORS, [], ["blur"], crop_size=64)


def test_feature_spread_against_numpy():
    assert float(feature_spread(torch.ones(5, 7) * 3.0)) == pytest.approx(0.0, abs=1e-6)
    d = 8
    assert float(feature_spread(torch.eye(d) * torch.arange(1, d + 1)[:, None])) == pytest.approx(1 - 1 / d)
    features = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    rows = features.reshape(-1, 16).double().numpy()
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    assert float(feature_spread(features)) == pytest.approx(unit.var(axis=0).sum(), rel=1e-5)


def test_collapse_warning_threshold():
    assert collapse_warning(COLLAPSE_SPREAD) is None and collapse_warning(0.5) is None
    line = collapse_warning(0.0004)
    assert line.startswith("warning: feature spread 0.0004 <") and "\n" not in line


@pytest.mark.slow
def test_cli_logs_spread_and_level_ranking_of_the_saved_encoder(tmp_path, text_features_file):
    """The CLI's final level ranking equals the one recomputed from its .pkl on the held-out images."""
    from qualiclip_pretrain.engine import holdout_split
    from qualiclip_pretrain.pretrain_dataset import list_image_dir

    folder = tmp_path / "clean"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    save_dir = tmp_path / "run"
    result = run_cli("pretrain_qualiclip.py", "--image_dir", folder, "--text_features", text_features_file,
                     "--epochs", "2", "--save_dir", save_dir, "--model_size", "nano", "--no_imagenet_pretrained",
                     "--batch_size", "2", "--num_workers", "0", "--crop_size", "64", "--num_levels", "3",
                     "--heldout_fraction", "0.25", "--split_seed", "7", "--resize", "80",
                     "--distortion_types", "blur", "noise", "--level_eval_images", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (save_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    for record in log:
        assert 0 <= record["feature_spread"] <= 1
        assert set(record["level_ranking_accuracy"]) == {"blur", "noise", "overall"}
    results = json.loads((save_dir / "results.json").read_text())
    assert results["level_ranking_accuracy"] == log[-1]["level_ranking_accuracy"]
    assert results["feature_spread"] == log[-1]["feature_spread"]
    assert "feature spread" in result.stdout and "level ranking" in result.stdout

    _, heldout = holdout_split(list_image_dir(str(folder)), 0.25, 7)
    chosen = choose_images(heldout, 1, 7)
    ckpt = torch.load(save_dir / "swin_nano_qualiclip_pretrained.pkl", weights_only=True)
    assert not set(ckpt["train_images"]) & {os.path.relpath(p, folder) for p in heldout}
    model, text = QualityEncoder.from_checkpoint(ckpt, "run")
    expected = level_ranking_accuracy(model.train(), text, chosen, ["blur", "noise"], crop_size=64, resize=80,
                                      batch_size=8, seed=7, progress=False)
    assert results["level_ranking_accuracy"] == expected


# ----------------------------------------------------------------------------- ARNIQA's groups

def test_arniqa_ladders_are_one_distortion_of_the_group_at_levels_1_to_5(photos):
    from qualiclip_pretrain import arniqa
    from qualiclip_pretrain.diagnostics import degradation_ladders

    groups = ["brightness_change", "sharpness_contrast"]  # deterministic distortions: recomputable by hand
    chosen = set()
    for index in range(6):
        ladders = degradation_ladders(photos[index % 3], groups, 96, 64, (0, index), "arniqa")
        clean = ladders[0, 0]
        assert ladders.shape == (2, 6, 3, 64, 64) and torch.equal(ladders[1, 0], clean)
        for group, ladder in zip(groups, ladders):
            matches = [name for name in arniqa.DISTORTION_GROUPS[group]
                       if all(torch.equal(ladder[level], (arniqa.distort(clean.float() / 255, name, level) * 255)
                                          .round().to(torch.uint8)) for level in range(1, 6))]
            assert len(matches) == 1, (group, matches)
            chosen.add(matches[0])
    assert len(chosen) > 2  # the choice in the group varies with the image


def test_arniqa_level_ranking_is_per_group(photos):
    from qualiclip_pretrain import arniqa

    groups = list(arniqa.DISTORTION_GROUPS)
    acc = accuracy(ScalarQuality(sharpness), photos, groups, degradations="arniqa")
    assert set(acc) == {*groups, "overall"}
    assert acc["overall"] == pytest.approx(np.mean([acc[g] for g in groups]))
    # Every blur lowers the mean |Laplacian| with its level (level 1 of gaublur/motionblur is (almost) the
    # identity: at most one tie of 15 pairs per image); every noise raises it at every level.
    assert acc["blur"] >= 14.5 / 15
    assert acc["noise"] == 0.0
    constant = accuracy(ScalarQuality(lambda x: torch.zeros(x.shape[0])), photos, groups, degradations="arniqa")
    assert constant == {**{g: 0.5 for g in groups}, "overall": 0.5}
