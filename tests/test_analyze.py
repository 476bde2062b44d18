"""tools/analyze.py: every figure's files, and each figure's numbers against an independent computation.

The tests that run the analysis are marked slow (each takes seconds on 2 CPU cores)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats

from iqa.analysis import drawn_curves, embed
from iqa.patches import IMAGENET_MEAN, IMAGENET_STD, grid_offsets
from iqa.runtime import UserError, safe_load
from iqa.scoring import CHECKPOINT_KINDS, ZeroShotModel, has_format, load_scorer, register_kind
from models.hyperiqa_swin import HyperIQASwin
from models.quality_encoder import zero_shot_score
from qualiclip_pretrain import arniqa
from qualiclip_pretrain.degradation_generator import DISTORTION_TYPES, SyntheticDegradation
from tests.helpers import assert_user_error, run_cli
from tests.scoring_files import make_image, write_stage1_pkl, write_stage2_checkpoint
from tools.analyze import get_args_parser, main

SIZE = (300, 240)  # landscape: resized to shorter side 384 -> 480x384 before degrading


def write_attention_checkpoint(path):
    """A nano attention-fusion best.pt whose stage weights differ per image (at init they are all 1/4)."""
    write_stage2_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    for key in ("stage_attention.mlp.2.weight", "stage_attention.mlp.2.bias"):
        ckpt["model"][key] = 0.3 * torch.randn(ckpt["model"][key].shape, generator=generator)
    torch.save(ckpt, path)


def write_datasets(folder):
    """A ``csv`` dataset (6 images) and a KADID-10k-layout one (5 images), MOS known."""
    csv_rows, kadid_rows = ["image,mos"], ["dist_img,ref_img,dmos,var"]
    (folder / "kadid" / "images").mkdir(parents=True)
    for k in range(6):
        make_image(*SIZE, seed=10 + k).save(folder / f"c{k}.png")
        csv_rows.append(f"c{k}.png,{1 + 0.7 * k:.1f}")
    for k in range(5):
        make_image(*SIZE, seed=20 + k).save(folder / "kadid" / "images" / f"I01_01_0{k + 1}.png")
        kadid_rows.append(f"I01_01_0{k + 1}.png,I01.png,{5 - 0.8 * k:.1f},0.1")
    (folder / "set.csv").write_text("\n".join(csv_rows) + "\n")
    (folder / "kadid" / "dmos.csv").write_text("\n".join(kadid_rows) + "\n")
    clean = folder / "clean"
    clean.mkdir()
    for k in range(3):
        make_image(*SIZE, seed=30 + k).save(clean / f"p{k}.png")
    return [f"csv={folder / 'set.csv'}", f"kadid-10k={folder / 'kadid'}"], clean


PATCH_NUM = 2  # grid crops per image for every checkpoint (--test_patch_num), to keep the test quick


def analyze(*argv):
    return main(get_args_parser().parse_args(["--device", "cpu", "--num_workers", "0", "--batch_size", "16",
                                              "--test_patch_num", str(PATCH_NUM), *map(str, argv)]))


def scorer_of(path):
    scorer = load_scorer(path)
    scorer.test_patch_num = PATCH_NUM
    return scorer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analyze")
    stage2, stage1 = folder / "best.pt", folder / "encoder.pkl"
    write_attention_checkpoint(stage2)
    write_stage1_pkl(stage1, crop_size=96, eval_resize=128)  # a small encoder input keeps the test quick
    datasets, clean = write_datasets(folder)
    return {"folder": folder, "stage2": stage2, "stage1": stage1, "datasets": datasets, "clean": clean}


@pytest.fixture(scope="module")
def run(files):
    """Every figure of both checkpoints on both datasets, and the JSON of each."""
    out = files["folder"] / "out"
    analyze("--checkpoint", files["stage2"], files["stage1"], "--labels", "hyper", "zero_shot", "--datasets",
            *files["datasets"], "--image_dir", files["clean"], "--num_images", 2, "--output_dir", out)
    read = {stem: json.loads((out / f"{stem}.json").read_text())
            for stem in ("levels", "attention", "feature_map", "pred_vs_mos")}
    return {**files, "out": out, **read}


def normalised_crops(path, resize, patch_size, patch_num):
    """A file's grid crops as the scorer takes them, computed here with PIL and numpy."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    image = image.resize((round(w * resize / min(w, h)), round(h * resize / min(w, h))), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    crops = [pixels[t:t + patch_size, left:left + patch_size]
             for t, left in grid_offsets(pixels.shape[0], pixels.shape[1], patch_size, patch_num)]
    x = (np.stack(crops) / 255 - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).float()


def dataset_paths(run):
    data = run["pred_vs_mos"]["hyper"]
    return [p for name in ("csv", "kadid-10k") for p in data[name]["images"]]


@pytest.mark.slow
def test_every_figure_is_written_and_decodes(run):
    out = run["out"]
    for stem in ("levels", "attention", "feature_map", "pred_vs_mos"):
        with Image.open(out / f"{stem}.png") as png:
            png.load()
            assert png.size[0] > 300 and png.size[1] > 200
    report = (out / "report.md").read_text()
    for png in ("levels.png", "attention.png", "feature_map.png", "pred_vs_mos.png"):
        assert f"]({png})" in report
    assert "No stage attention (left out): zero_shot." in report  # the Stage-1 encoder has none
    assert list(run["attention"]["checkpoints"]) == ["hyper"]
    assert json.loads((out / "args.json").read_text())["num_images"] == 2


@pytest.mark.slow
def test_level_curve_equals_scoring_the_degraded_images_directly(run):
    levels = run["levels"]
    assert len(levels["images"]) == 2 and all(p.startswith(str(run["clean"])) for p in levels["images"])
    for label, path in (("hyper", run["stage2"]), ("zero_shot", run["stage1"])):
        scorer = scorer_of(path)
        # JPEG and brightness of the PIL path are pixel-identical to the batched path the tool uses.
        for name in ("jpeg", "brightness"):
            degrader = SyntheticDegradation(name)
            expected = []
            for image_path in levels["images"]:
                clean = Image.open(image_path).convert("RGB").resize((480, 384), Image.BICUBIC)
                ladder = [clean] + [degrader.apply(clean, k) for k in range(5)]
                expected.append(scorer([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ladder]).numpy())
            expected = np.array(expected)
            curve = levels["checkpoints"][label][name]
            # float32 batching noise: relative, since the zero-shot log-odds are not bounded by 1
            np.testing.assert_allclose(curve["scores"], expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(curve["mean"], expected.mean(axis=0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(curve["std"], np.std(expected, axis=0, ddof=1), rtol=1e-4, atol=1e-5)
            rho = stats.spearmanr(expected.ravel(), -np.tile(np.arange(6), 2)).statistic
            assert curve["level_srcc"] == pytest.approx(rho, abs=1e-6)
        assert set(levels["checkpoints"][label]) == set(DISTORTION_TYPES)
    assert np.ptp(levels["checkpoints"]["hyper"]["brightness"]["mean"]) > 1e-3  # the levels really differ


@pytest.mark.slow
def test_level_figure_standardises_scores_of_different_meanings(run):
    levels = run["levels"]
    meanings = {label: scorer_of(path).score_meaning for label, path in (("hyper", run["stage2"]),
                                                                         ("zero_shot", run["stage1"]))}
    assert levels["score_meanings"] == meanings and len(set(meanings.values())) == 2
    drawn, ylabel = drawn_curves(levels)
    assert ylabel.startswith("standardised")
    for label, per_name in levels["checkpoints"].items():
        every = np.concatenate([np.ravel(curve["scores"]) for curve in per_name.values()])
        m, s = every.mean(), every.std(ddof=1)
        assert levels["standardised"][label]["mean"] == pytest.approx(m, rel=1e-9)
        assert levels["standardised"][label]["std"] == pytest.approx(s, rel=1e-9)
        for name, curve in per_name.items():
            scores = np.array(curve["scores"])
            np.testing.assert_allclose(drawn[label][name][0], ((scores - m) / s).mean(axis=0), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(drawn[label][name][1], ((scores - m) / s).std(axis=0, ddof=1), rtol=1e-5)
    report = (run["out"] / "report.md").read_text()
    assert all(meaning in report for meaning in meanings.values()) and "(score − m) / s" in report


@pytest.mark.slow
def test_attention_weights_equal_a_hand_forward(run):
    model = HyperIQASwin.from_checkpoint(safe_load(run["stage2"]), "best.pt").eval()
    mlp = model.stage_attention.mlp
    for name in ("csv", "kadid-10k"):
        entry = run["attention"]["checkpoints"]["hyper"][name]
        expected = []
        with torch.no_grad():
            for path in entry["images"]:
                last = model.backbone(normalised_crops(path, 256, 224, PATCH_NUM))[-1]
                hidden = F.gelu(last.mean(dim=(2, 3)) @ mlp[0].weight.T + mlp[0].bias)
                expected.append(torch.softmax(hidden @ mlp[2].weight.T + mlp[2].bias, dim=1).mean(dim=0).numpy())
        expected = np.array(expected)
        np.testing.assert_allclose(entry["weights"], expected, atol=1e-5)
        assert np.ptp(expected, axis=0).min() > 1e-3  # every stage's weight varies from image to image
        for s in range(4):
            rho = stats.spearmanr(expected[:, s], entry["mos"]).statistic
            assert entry["srcc_vs_mos"][s] == pytest.approx(rho, abs=1e-6)


@pytest.mark.slow
def test_feature_map_is_the_pca_of_the_pooled_backbone_features(run):
    model = HyperIQASwin.from_checkpoint(safe_load(run["stage2"]), "best.pt").eval()
    with torch.no_grad():
        pooled = [model.backbone(normalised_crops(p, 256, 224, PATCH_NUM))[-1].mean(dim=(2, 3)).mean(dim=0)
                  for p in dataset_paths(run)]
    features = torch.stack(pooled).double().numpy()
    centred = features - features.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    expected = u[:, :2] * s[:2]
    entry = run["feature_map"]["datasets"]["hyper"]
    points = np.array(entry["points"])
    signs = np.sign(np.sum(points * expected, axis=0))  # principal axes are defined up to sign
    np.testing.assert_allclose(points * signs, expected, atol=1e-3 * np.abs(expected).max())
    np.testing.assert_allclose(entry["explained_variance_ratio"], s[:2] ** 2 / np.sum(s ** 2), atol=1e-5)
    assert entry["dataset"] == ["csv"] * 6 + ["kadid-10k"] * 5
    synthetic = run["feature_map"]["synthetic"]["zero_shot"]
    # Each clean image once, then levels 1..5 of every type.
    assert len(synthetic["points"]) == 2 * (1 + 4 * 5)
    assert synthetic["type"][:2] == ["clean"] * 2 and synthetic["level"][2:4] == [1, 1]


@pytest.mark.slow
def test_pred_vs_mos_panels_match_scipy(run):
    for label, path in (("hyper", run["stage2"]), ("zero_shot", run["stage1"])):
        scorer = scorer_of(path)
        for name in ("csv", "kadid-10k"):
            entry = run["pred_vs_mos"][label][name]
            np.testing.assert_allclose(entry["score"], scorer.score_paths(entry["images"]).numpy(), atol=1e-6)
            assert entry["metrics"]["srcc"] == pytest.approx(stats.spearmanr(entry["score"], entry["mos"]).statistic)
            assert entry["metrics"]["plcc"] == pytest.approx(stats.pearsonr(entry["score"], entry["mos"]).statistic)
    assert run["pred_vs_mos"]["hyper"]["kadid-10k"]["mos"] == [5.0, 4.2, 3.4, 2.6, 1.8]


def test_tsne_is_seeded():
    features = np.random.default_rng(0).normal(size=(12, 8))
    first, ratio = embed(features, "tsne", 3)
    assert ratio is None and np.array(first).shape == (12, 2)
    assert embed(features, "tsne", 3)[0] == first


def test_refusals(files, tmp_path):
    run = files
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "args.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run"):
        analyze("--checkpoint", run["stage2"], "--image_dir", run["clean"], "--output_dir", earlier)
    with pytest.raises(UserError, match="missing.pt' does not exist"):
        analyze("--checkpoint", tmp_path / "missing.pt", "--image_dir", run["clean"], "--output_dir", tmp_path / "a")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="other.pt' is not a train_swin.py checkpoint"):
        analyze("--checkpoint", other, "--image_dir", run["clean"], "--output_dir", tmp_path / "b")
    with pytest.raises(UserError, match="none of .*encoder.pkl has stage attention"):
        analyze("--checkpoint", run["stage1"], "--datasets", *run["datasets"], "--figures", "attention",
                "--output_dir", tmp_path / "c")
    with pytest.raises(UserError, match="--figures pred_vs_mos needs labelled images"):
        analyze("--checkpoint", run["stage1"], "--image_dir", run["clean"], "--figures", "pred_vs_mos",
                "--output_dir", tmp_path / "d")
    with pytest.raises(UserError, match="--degrade_resize 40 is too small"):
        analyze("--checkpoint", run["stage1"], "--image_dir", run["clean"], "--degrade_resize", 40,
                "--output_dir", tmp_path / "e")
    assert not any((tmp_path / d).exists() for d in "abcde")  # nothing written before the refusal


@pytest.mark.slow
def test_arniqa_level_curves(files, tmp_path):
    run = files
    out = tmp_path / "arniqa"
    analyze("--checkpoint", run["stage1"], "--image_dir", run["clean"], "--num_images", 2, "--figures", "levels",
            "--arniqa", "--degrade_resize", 128, "--test_patch_num", 1, "--output_dir", out)
    data = json.loads((out / "levels_arniqa.json").read_text())
    assert data["groups"] == {k: list(v) for k, v in arniqa.DISTORTION_GROUPS.items()}
    # One checkpoint, one meaning: the figure draws the raw scores.
    assert data["standardised"] is None
    drawn, ylabel = drawn_curves(data)
    assert ylabel == "score (mean ± std)"
    np.testing.assert_array_equal(drawn["encoder.pkl"]["darken"][0], data["checkpoints"]["encoder.pkl"]["darken"]["mean"])
    with Image.open(out / "levels_arniqa.png") as png:
        png.load()
    scorer = load_scorer(run["stage1"])
    scorer.test_patch_num = 1
    assert data["degrade_resize"] == 128
    for image_path, row in zip(data["images"], data["checkpoints"]["encoder.pkl"]["darken"]["scores"]):
        clean = torch.from_numpy(np.array(Image.open(image_path).convert("RGB").resize((160, 128), Image.BICUBIC)))
        clean = clean.permute(2, 0, 1)
        ladder = [clean] + [(arniqa.distort(clean.float() / 255, "darken", k) * 255).round().to(torch.uint8)
                            for k in range(1, 6)]
        np.testing.assert_allclose(row, scorer(ladder).numpy(), rtol=1e-5, atol=1e-6)


class TinyEncoder(torch.nn.Module):
    """A stand-in for an encoder scored on whole images (as CLIP kinds are): conv, global average pool."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))

    def zero_shot_quality(self, x, text_features):
        return zero_shot_score(self(x), text_features)


@pytest.fixture
def whole_image_kind():
    """A checkpoint kind registered after iqa.analysis was written, scored on whole images."""
    @register_kind("test_whole_image", "a test whole-image encoder", has_format("test-whole-image/1"))
    def build(ckpt, source):
        encoder = TinyEncoder()
        encoder.load_state_dict(ckpt["encoder"])
        return ZeroShotModel(encoder, ckpt["text_features"]), {"resize": 0, "patch_size": None, "test_patch_num": 1,
                                                               "score_meaning": "score: a test"}

    yield
    del CHECKPOINT_KINDS["test_whole_image"]


@pytest.mark.slow
def test_a_kind_registered_later_is_analysed_without_changes(files, tmp_path, whole_image_kind):
    torch.manual_seed(0)
    encoder = TinyEncoder()
    path = tmp_path / "tiny.pt"
    torch.save({"format": "test-whole-image/1", "encoder": encoder.state_dict(),
                "text_features": F.normalize(torch.randn(2, 8), dim=1)}, path)
    out = tmp_path / "out"
    main(get_args_parser().parse_args(["--device", "cpu", "--num_workers", "0", "--checkpoint", str(path),
                                       "--datasets", files["datasets"][0], "--image_dir", str(files["clean"]),
                                       "--num_images", "2", "--figures", "levels", "feature_map",
                                       "--output_dir", str(out)]))
    levels = json.loads((out / "levels.json").read_text())
    scorer = load_scorer(path)
    clean = [torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((480, 384), Image.BICUBIC))).permute(2, 0, 1)
             for p in levels["images"]]
    np.testing.assert_allclose(np.array(levels["checkpoints"]["tiny.pt"]["brightness"]["scores"])[:, 0],
                               scorer(clean).numpy(), atol=1e-6)
    # The dataset feature map: PCA of the encoder's embeddings of the whole (native-size) images.
    entry = json.loads((out / "feature_map.json").read_text())["datasets"]["tiny.pt"]
    mean, std = np.array(IMAGENET_MEAN, dtype=np.float32), np.array(IMAGENET_STD, dtype=np.float32)
    with torch.no_grad():
        features = torch.cat([encoder(torch.from_numpy((np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
                                                        / 255 - mean) / std).permute(2, 0, 1)[None])
                              for p in entry["images"]]).double().numpy()
    u, s, _ = np.linalg.svd(features - features.mean(axis=0), full_matrices=False)
    expected, points = u[:, :2] * s[:2], np.array(entry["points"])
    np.testing.assert_allclose(points * np.sign(np.sum(points * expected, axis=0)), expected,
                               atol=1e-4 * np.abs(expected).max())


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    result = run_cli("tools/analyze.py", "--checkpoint", tmp_path / "nope.pt", "--image_dir", tmp_path,
                     "--output_dir", tmp_path / "out")
    assert_user_error(result, "nope.pt")
