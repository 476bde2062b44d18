"""iqa.scoring: checkpoints of both stages as scorers, equal to what evaluation computes."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from iqa.datasets import Sample
from iqa.evaluation import EvalOptions, predict_images
from iqa.patches import DEFAULT_RESIZE, cache_images
from iqa.runtime import UserError, safe_load
from iqa.scoring import CHECKPOINT_KINDS, MIN_WHOLE_IMAGE_SIDE, Scorer, load_scorer, register_kind
from models.hyperiqa_swin import HyperIQASwin
from models.quality_encoder import QualityEncoder
from tests.scoring_files import STAGE1_ARGS, make_image, write_stage1_pkl, write_stage2_checkpoint, write_truncated_jpeg

SIZES = ((320, 240), (256, 300), (224, 224))  # landscape, portrait, already the patch size


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scoring")
    stage2, stage1 = folder / "best.pt", folder / "encoder.pkl"
    write_stage2_checkpoint(stage2)
    write_stage1_pkl(stage1)
    images = []
    for k, (w, h) in enumerate(SIZES):
        images.append(folder / f"img_{k}.png")  # lossless: the decoded file equals the PIL image
        make_image(w, h, seed=k).save(images[-1])
    return {"stage2": stage2, "stage1": stage1, "images": images}


def as_float_tensor(path):
    """A file as a (3, H, W) float tensor in [0, 1], the way a user would pass it."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def evaluation_scores(score_fn, paths, resize, patch_size, patch_num, batch_size=64):
    """What iqa.evaluation computes for these files: decode-once cache, grid crops, mean per image."""
    samples = [Sample(str(p), float("nan"), None, None) for p in paths]
    images = cache_images(samples, resize, patch_size, progress=False)
    return predict_images(score_fn, images, torch.device("cpu"), EvalOptions(patch_num, patch_size, batch_size),
                          progress=False)


def test_stage2_scorer_equals_evaluation(files):
    scorer = load_scorer(files["stage2"])
    assert (scorer.kind, scorer.resize, scorer.patch_size, scorer.test_patch_num, scorer.mos_bounds) == (
        "hyperiqa_swin", 256, 224, 3, (1.0, 5.0))
    model = HyperIQASwin.from_checkpoint(safe_load(files["stage2"]), "best.pt").eval()
    expected = evaluation_scores(model, files["images"], 256, 224, 3)

    scorer.model.train()  # a scorer scores in eval mode whatever state its model was left in (dropout 0.3)
    from_list = scorer([as_float_tensor(p) for p in files["images"]])
    assert from_list.shape == (3,) and from_list.dtype == torch.float64
    torch.testing.assert_close(from_list, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(scorer.score_paths(files["images"], batch_size=5), expected, rtol=0, atol=1e-6)
    assert len(set(expected.tolist())) == 3  # the images really score differently


def test_a_batch_tensor_and_uint8_images_score_the_same(files):
    scorer = load_scorer(files["stage2"])
    square = files["images"][2]
    batch = torch.stack([as_float_tensor(square), as_float_tensor(square).flip(-1)])
    scores = scorer(batch)
    torch.testing.assert_close(scores[0:1], scorer([as_float_tensor(square)]), rtol=0, atol=1e-7)
    torch.testing.assert_close(scorer((batch * 255).round().to(torch.uint8)), scores, rtol=0, atol=1e-7)
    assert not torch.isclose(scores[0], scores[1])  # the flipped image is another image


def test_images_are_resized_as_the_checkpoint_says(files):
    scorer = load_scorer(files["stage2"])
    image = make_image(320, 240, seed=0)
    prepared = scorer.prepare(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    # Shorter side 240 -> 256, aspect kept: 320 * 256 / 240 = 341.3 -> 341, PIL bicubic.
    expected = np.array(image.resize((341, 256), Image.BICUBIC))
    np.testing.assert_array_equal(prepared.permute(1, 2, 0).numpy(), expected)


def test_stage1_pkl_scores_zero_shot_as_evaluation(files):
    scorer = load_scorer(files["stage1"])
    assert (scorer.kind, scorer.resize, scorer.patch_size, scorer.test_patch_num, scorer.mos_bounds) == (
        "qualiclip_swin_encoder", STAGE1_ARGS["eval_resize"], STAGE1_ARGS["crop_size"], STAGE1_ARGS["eval_patch_num"],
        None)
    encoder, text = QualityEncoder.from_checkpoint(safe_load(files["stage1"]), "encoder.pkl")
    encoder.eval()

    def log_odds(x):  # computed here from the features and the anchors, not by the library
        unit = F.normalize(encoder(x), dim=-1)
        anchors = F.normalize(text, dim=-1)
        return 100 * (unit @ anchors[0] - unit @ anchors[1])

    expected = evaluation_scores(log_odds, files["images"], 240, 224, 2)
    scores = scorer([as_float_tensor(p) for p in files["images"]])
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert "log-odds" in scorer.score_meaning
    with pytest.raises(UserError, match="no MOS scale"):
        scorer.to_mos(scores)


def test_to_mos_maps_onto_the_training_range(files):
    scorer = load_scorer(files["stage2"])
    torch.testing.assert_close(scorer.to_mos(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([1.0, 2.0, 5.0]))
    assert scorer.to_mos(0.5) == pytest.approx(3.0)


@pytest.mark.parametrize("resize, expected", [([512, 384], DEFAULT_RESIZE), (0, 0), (300, 300)])
def test_stage2_resize_setting(tmp_path, resize, expected):
    path = tmp_path / "best.pt"
    write_stage2_checkpoint(path, resize=resize)
    assert load_scorer(path).resize == expected  # a fixed [w, h] is the training set's; others keep their aspect


def test_score_paths_names_an_unreadable_file_and_score_chunks_can_skip_it(files, tmp_path):
    bad = tmp_path / "bad.jpg"
    write_truncated_jpeg(bad)
    scorer = load_scorer(files["stage2"])
    paths = [files["images"][0], bad, files["images"][1]]
    with pytest.raises(UserError, match="cannot decode image .*bad.jpg"):
        scorer.score_paths(paths)
    chunks = list(scorer.score_chunks(paths, scorer.options(), chunk_size=2, skip_unreadable=True))
    assert [[path for path, _ in chunk] for chunk in chunks] == [paths[:2], paths[2:]]
    results = [result for chunk in chunks for _, result in chunk]
    assert isinstance(results[1], UserError) and "bad.jpg" in str(results[1])
    good = scorer.score_paths([paths[0], paths[2]])
    np.testing.assert_allclose([results[0], results[2]], good.numpy(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("images, message", [
    (torch.rand(3, 64, 64), "N, 3, H, W"),
    (torch.rand(2, 1, 64, 64), r"\(3, H, W\) RGB"),
    (torch.rand(1, 3, 64, 64) * 255, r"\[0, 1\]"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.int32), "uint8"),
])
def test_bad_image_tensors_are_refused(files, images, message):
    with pytest.raises(ValueError, match=message):
        load_scorer(files["stage2"])(images)


def test_other_files_are_refused_with_what_to_pass(files, tmp_path):
    state_dict = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, state_dict)
    with pytest.raises(UserError, match=r"is not a train_swin.py checkpoint .* or a Stage-1 encoder .*no 'format' key"):
        load_scorer(state_dict)
    with pytest.raises(UserError, match="is a Stage-1 encoder .pkl.*, not a train_swin.py checkpoint"):
        load_scorer(files["stage1"], kind="hyperiqa_swin")
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        load_scorer(files["stage2"], kind="resnet")

    ckpt = safe_load(files["stage2"])
    del ckpt["model"]["hyper_net.last_weight_fc.bias"]
    broken = tmp_path / "broken.pt"
    torch.save(ckpt, broken)
    with pytest.raises(UserError, match="does not fit the Swin-nano HyperIQA"):
        load_scorer(broken)
    with pytest.raises(UserError, match="is not a train_swin.py checkpoint"):
        HyperIQASwin.from_checkpoint({"format": "other/1"}, "x.pt")


def test_a_new_kind_registers_without_changing_load_scorer(files, tmp_path, monkeypatch):
    """A release file recognised by its keys (no 'format'), scored by the Swin-HyperIQA it holds."""
    monkeypatch.setattr("iqa.scoring.CHECKPOINT_KINDS", dict(CHECKPOINT_KINDS))
    ckpt = safe_load(files["stage2"])
    release = tmp_path / "release.pth"
    torch.save({"state_dict": ckpt["model"], "config": ckpt["args"]}, release)

    @register_kind("release", "a release file", lambda c: isinstance(c, dict) and set(c) == {"state_dict", "config"})
    def build(c, source):
        model = HyperIQASwin.from_checkpoint({"format": ckpt["format"], "model": c["state_dict"],
                                              "args": c["config"]}, source)
        return model, {"resize": 256, "patch_size": 224, "test_patch_num": 3, "score_meaning": "score: a test"}

    scorer = load_scorer(release)
    assert isinstance(scorer, Scorer) and scorer.kind == "release" and scorer.mos_bounds is None
    torch.testing.assert_close(scorer.score_paths(files["images"]), load_scorer(files["stage2"]).score_paths(
        files["images"]), rtol=0, atol=1e-7)


class MeanColour(torch.nn.Module):
    """A scorer model that needs the whole image: a squashed mean of its normalised red channel minus
    the mean of its bottom-right 8x8 corner (which a crop would miss)."""

    def forward(self, x):
        return torch.sigmoid(x[:, 0].mean(dim=(1, 2)) - x[:, 1, -8:, -8:].mean(dim=(1, 2)))


def test_whole_image_scorer_scores_each_full_image(files):
    scorer = Scorer(MeanColour(), kind="test", resize=0, patch_size=None, test_patch_num=1,
                    score_meaning="score: a test")
    assert scorer.min_side == MIN_WHOLE_IMAGE_SIDE
    paths = files["images"] + [files["images"][0]]  # three sizes, one of them twice
    expected = []
    for path in paths:
        pixels = np.array(Image.open(path).convert("RGB"), dtype=np.float64) / 255
        normalised = (pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        expected.append(1 / (1 + np.exp(-(normalised[..., 0].mean() - normalised[-8:, -8:, 1].mean()))))
    for batch_size in (1, 3):  # 1: one image per forward pass (each is larger than one 224x224 crop)
        np.testing.assert_allclose(scorer.score_paths(paths, batch_size=batch_size).numpy(), expected, atol=1e-6)
    sizes = []
    scorer.model.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    scorer.score_paths([files["images"][0]] * 5, batch_size=3)  # 320x240 = 1.53 crops: 3 * 224^2 // 76800 = 1
    scorer.score_paths([files["images"][2]] * 5, batch_size=3)  # 224x224: three per pass
    assert sizes == [1] * 5 + [3, 2]
    tiny = torch.zeros(3, 16, 24, dtype=torch.uint8)  # below a ResNet's stride: upscaled, aspect kept
    assert tuple(scorer.prepare(tiny).shape) == (3, MIN_WHOLE_IMAGE_SIDE, 48)


def test_evaluate_scores_a_whole_image_scorer_through_its_predict(files):
    from iqa.distributed import DistInfo
    from iqa.evaluation import evaluate, make_eval_set, predict_images
    from iqa.metrics import all_metrics

    scorer = Scorer(MeanColour(), kind="test", resize=0, patch_size=None, test_patch_num=1,
                    score_meaning="score: a test")
    assert scorer.predict is not predict_images
    samples = [Sample(str(p), mos, None, None) for p, mos in zip(files["images"], (3.0, 1.0, 2.0))]
    eval_set = make_eval_set("three", samples, 0, scorer.min_side, DistInfo())
    metrics, pred = evaluate(scorer.score, eval_set, DistInfo(), scorer.options(batch_size=2), predict=scorer.predict)
    np.testing.assert_allclose(pred, scorer.score_paths(files["images"]).numpy(), rtol=0, atol=1e-12)
    assert metrics == all_metrics(pred, [3.0, 1.0, 2.0])


def test_cross_dataset_table_marks_the_opinion_unaware_rows(files):
    from cross_dataset_test import mos_training, results_table

    training = {"best.pt": mos_training(load_scorer(files["stage2"])),
                "encoder.pkl": mos_training(load_scorer(files["stage1"]))}
    results = {"best.pt": {"spaq": {"srcc": 0.91234, "plcc": 0.9}},
               "encoder.pkl": {"spaq": {"srcc": -0.5, "plcc": 0.25}}}
    assert results_table(results, ["spaq"], training) == [
        "| checkpoint | MOS training | spaq SRCC/PLCC |", "|---|---|---|",
        "| best.pt | yes (Stage 2) | 0.9123 / 0.9000 |",
        "| encoder.pkl | none (opinion-unaware) | -0.5000 / 0.2500 |", "",
        "opinion-unaware: scored zero-shot against the checkpoint's prompts; no MOS of any dataset was used to train it."]
    assert results_table({"best.pt": results["best.pt"]}, ["spaq"], training)[-1].startswith("| best.pt")
