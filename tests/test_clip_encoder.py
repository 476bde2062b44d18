"""The CLIP image encoder and QualiCLIP's release format, against QualiCLIP's inference done by hand.

The release file is written here in its real layout (OpenAI RN50 keys prefixed ``clip_model.``,
plus a (14, 1024) ``prompts_features``) with random RN50 weights; the expected scores come from
open_clip's ResNet trunk and an attention pool without positional embedding written out in
float64 below, not from ``models/clip_image_encoder.py``.  Images are tiny (64 px), but a random
RN50 still takes seconds per test on 2 cores: all but the pure-tensor test are marked slow.
"""
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from PIL import Image
from scipy import stats

from iqa.runtime import UserError, safe_load
from iqa.scoring import load_scorer
from models.clip_image_encoder import CLIP_MEAN, CLIP_STD, ENCODER_FORMAT, ClipImageEncoder, resnet_image_tower
from models.clip_text import PROMPT_SETS
from models.quality_encoder import zero_shot_logits, zero_shot_score
from tests.helpers import ROOT, assert_user_error, run_cli, write_small_train_split
from tests.scoring_files import make_image

RN50_HEADS = 32  # OpenAI RN50: width 64 * 32 // 64


def random_rn50():
    """open_clip's RN50 image tower, random, with every part of the trunk active: open_clip zero-inits the
    last BatchNorm of each block, and the BatchNorm statistics are measured on images (else the random
    activations vanish and every image gets the same score); the positional embedding is made huge, so
    using it would show."""
    torch.manual_seed(0)
    visual = ModifiedResNet([3, 4, 6, 3], 1024, RN50_HEADS, 224, 64)
    calibration = torch.stack([torch.from_numpy(np.array(make_image(64, 64, seed=100 + k))).permute(2, 0, 1)
                               for k in range(8)]).float() / 255
    with torch.no_grad():
        for name, param in visual.named_parameters():
            if name.endswith("bn3.weight"):
                param.fill_(0.5)
        visual.attnpool.positional_embedding.normal_(0, 30)
        for module in visual.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average over the calibration pass
                module.reset_running_stats()
        visual.train()
        visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(calibration)))))
    return visual.eval()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qualiclip")
    visual = random_rn50()
    prompts = F.normalize(torch.randn(14, 1024, generator=torch.Generator().manual_seed(1)), dim=-1)
    state = {f"clip_model.visual.{k}": v for k, v in visual.state_dict().items()}
    # a few of the text tower's keys (the rest would only make the file 250 MB larger; scoring ignores them)
    state.update({"clip_model.logit_scale": torch.tensor(math.log(100.0)),
                  "clip_model.positional_embedding": torch.randn(77, 512),
                  "clip_model.text_projection": torch.randn(512, 1024), "prompts_features": prompts})
    path = folder / "qualiclip.pth"
    torch.save(state, path)
    images = []
    for k, (w, h) in enumerate(((64, 64), (96, 64), (64, 64))):
        images.append(folder / f"img_{k}.png")
        make_image(w, h, seed=k).save(images[-1])
    return {"path": path, "visual": visual, "prompts": prompts, "images": images}


def qualiclip_by_hand(visual, prompts, image, pos_embedding=False):
    """QualiCLIP's inference on one uint8 (3, H, W) image: CLIP normalisation of the whole image,
    open_clip's trunk, attention pool (mean token as query) in float64, 100 * cosine, softmax per
    pair, mean of the positive probabilities."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    x = ((image.float() / 255 - mean) / std)[None]
    with torch.no_grad():
        fmap = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
    pool = {k: v.double() for k, v in visual.attnpool.state_dict().items()}
    tokens = fmap[0].flatten(1).t().double()
    tokens = torch.cat([tokens.mean(0, keepdim=True), tokens])
    if pos_embedding:
        tokens = tokens + pool["positional_embedding"][:tokens.shape[0]]
    q = (tokens[0] @ pool["q_proj.weight"].t() + pool["q_proj.bias"]).view(RN50_HEADS, -1)
    k = (tokens @ pool["k_proj.weight"].t() + pool["k_proj.bias"]).view(len(tokens), RN50_HEADS, -1)
    v = (tokens @ pool["v_proj.weight"].t() + pool["v_proj.bias"]).view(len(tokens), RN50_HEADS, -1)
    attention = ((k * q).sum(-1) / math.sqrt(q.shape[-1])).softmax(dim=0)       # (tokens, heads)
    pooled = (attention[..., None] * v).sum(0).reshape(-1)
    feature = pooled @ pool["c_proj.weight"].t() + pool["c_proj.bias"]
    cosine = F.normalize(prompts.double(), dim=-1) @ (feature / feature.norm())
    return float((100 * cosine).view(-1, 2).softmax(dim=-1)[:, 0].mean())


def as_uint8(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def expected_scores(release, paths):
    return torch.tensor([qualiclip_by_hand(release["visual"], release["prompts"], as_uint8(p)) for p in paths],
                        dtype=torch.float64)


@pytest.mark.slow
def test_release_scores_as_qualiclip_inference(release):
    scorer = load_scorer(release["path"])
    assert (scorer.kind, scorer.resize, scorer.patch_size, scorer.mos_bounds) == ("qualiclip_release", 0, None, None)
    expected = expected_scores(release, release["images"])
    torch.testing.assert_close(scorer.score_paths(release["images"], batch_size=2), expected, rtol=0, atol=1e-4)
    from_tensors = scorer([as_uint8(p).float() / 255 for p in release["images"]])
    torch.testing.assert_close(from_tensors, expected, rtol=0, atol=1e-4)
    # the test can tell: with the positional embedding, or on a crop, the scores differ
    with_position = qualiclip_by_hand(release["visual"], release["prompts"], as_uint8(release["images"][0]), True)
    assert abs(with_position - expected[0].item()) > 1e-3
    crop = as_uint8(release["images"][1])[:, :, :64]
    assert abs(qualiclip_by_hand(release["visual"], release["prompts"], crop) - expected[1].item()) > 1e-3


@pytest.mark.slow
def test_clip_stage1_pkl_round_trip_and_kind(release, tmp_path):
    encoder, text_features = ClipImageEncoder.from_checkpoint(safe_load(release["path"]), "qualiclip.pth")
    torch.testing.assert_close(text_features, release["prompts"].view(7, 2, 1024), rtol=0, atol=0)
    pkl = tmp_path / "clip_RN50_qualiclip_pretrained.pkl"
    torch.save(encoder.checkpoint_dict(text_features, PROMPT_SETS["qualiclip"], {"crop_size": 64}, ["a.jpg"]), pkl)
    ckpt = torch.load(pkl, weights_only=True)
    assert ckpt["format"] == ENCODER_FORMAT and ckpt["clip_model"] == "RN50" and ckpt["train_images"] == ["a.jpg"]
    scorer = load_scorer(pkl, kind="qualiclip_clip_encoder")
    assert (scorer.kind, scorer.patch_size) == ("qualiclip_clip_encoder", None)
    torch.testing.assert_close(scorer.score_paths(release["images"]), expected_scores(release, release["images"]),
                               rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="is QualiCLIP's released qualiclip.pth, not a Stage-1 CLIP encoder .pkl"):
        load_scorer(release["path"], kind="qualiclip_clip_encoder")
    hub = torch.hub.load(ROOT, "qualiclip_release", checkpoint=str(release["path"]), source="local")
    assert hub.kind == "qualiclip_release"
    torch.testing.assert_close(hub.score_paths(release["images"][:1]), scorer.score_paths(release["images"][:1]),
                               rtol=0, atol=1e-6)


@pytest.mark.slow
def test_encoder_takes_imagenet_normalised_input(release):
    """forward maps ImageNet normalisation to CLIP's: the same score as CLIP-normalised pixels by hand."""
    encoder, text_features = ClipImageEncoder.from_checkpoint(safe_load(release["path"]), "qualiclip.pth")
    images = torch.randint(0, 256, (2, 3, 64, 96), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    imagenet = (images / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        got = encoder.eval().score(imagenet, text_features)
    expected = torch.tensor([qualiclip_by_hand(release["visual"], release["prompts"], image) for image in images])
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_every_trained_parameter_gets_a_gradient():
    """What DistributedDataParallel needs: the unused positional embedding is frozen, the rest all learn."""
    encoder = ClipImageEncoder("RN50").train()
    encoder.score(torch.randn(4, 3, 64, 64), torch.randn(7, 2, 1024)).sum().backward()
    trained = {name: p for name, p in encoder.named_parameters() if p.requires_grad}
    assert set(dict(encoder.named_parameters())) - set(trained) == {"visual.attnpool.positional_embedding"}
    assert all(p.grad is not None for p in trained.values())


def test_zero_shot_logits_and_score_with_prompt_pairs():
    generator = torch.Generator().manual_seed(3)
    features, pairs = torch.randn(5, 8, generator=generator), torch.randn(3, 2, 8, generator=generator)
    f = features.double().numpy()
    t = pairs.double().numpy()
    cos = np.einsum("nd,pkd->npk", f / np.linalg.norm(f, axis=1, keepdims=True),
                    t / np.linalg.norm(t, axis=2, keepdims=True))
    logits = 100 * cos
    prob = np.exp(logits[..., 0]) / np.exp(logits).sum(-1)
    np.testing.assert_allclose(zero_shot_score(features, pairs).numpy(), prob.mean(1), atol=1e-5)
    np.testing.assert_allclose(zero_shot_logits(features, pairs).numpy(), logits.mean(1), atol=1e-3)
    # one pair as (2, D) or (1, 2, D): the same two-way softmax
    torch.testing.assert_close(zero_shot_score(features, pairs[0]), zero_shot_score(features, pairs[:1]))


@pytest.mark.slow
def test_refusals(release, tmp_path):
    with pytest.raises(UserError, match="ViT image tower.*ResNet"):
        resnet_image_tower("ViT-B-32")
    with pytest.raises(UserError, match="not an open_clip model"):
        resnet_image_tower("RN5")
    state = safe_load(release["path"])
    state["clip_model.visual.conv1.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(UserError, match="'bad.pth' does not hold a RN50 image tower"):
        ClipImageEncoder.from_checkpoint(state, "bad.pth")
    with pytest.raises(UserError, match="neither a Stage-1 CLIP encoder .pkl .* nor QualiCLIP's qualiclip.pth"):
        ClipImageEncoder.from_checkpoint({"format": "other/1"}, "x.pkl")


@pytest.mark.slow
def test_predict_cli_on_the_release(release, tmp_path):
    output = tmp_path / "scores.csv"
    proc = run_cli("predict.py", "--checkpoint", release["path"], "--input", release["images"][0].parent,
                   "--output", output, "--device", "cpu", "--num_workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(output) as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [p.name for p in release["images"]] and "mos" not in rows[0]
    expected = expected_scores(release, release["images"])
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected.numpy(), atol=1e-4)
    assert json.loads((tmp_path / "scores.csv.json").read_text())["kind"] == "qualiclip_release"


@pytest.mark.slow
def test_cross_dataset_opinion_unaware_table(release, demo_root, tmp_path):
    output = tmp_path / "cross.json"
    proc = run_cli("cross_dataset_test.py", "--checkpoint", release["path"], "--datasets",
                   f"kadid-10k={demo_root / 'kadid-10k'}", "--resize", "64", "--device", "cpu", "--num_workers", "0",
                   "--amp", "off", "--output", output)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(output.read_text())[str(release["path"])]["kadid-10k"]
    table = (tmp_path / "cross.md").read_text()
    assert "| MOS training |" in table and "none (opinion-unaware)" in table and "kadid-10k SRCC/PLCC" in proc.stdout
    assert f"{metrics['srcc']:.4f} / {metrics['plcc']:.4f}" in table
    # the same SRCC from scores computed by hand on the images as the CLI resized them (shorter side 64, bicubic)
    from iqa.datasets import read_index

    samples = read_index("kadid-10k", str(demo_root / "kadid-10k"))
    hand = []
    for sample in samples:
        image = Image.open(sample.path).convert("RGB")
        w, h = image.size
        image = image.resize((round(w * 64 / min(w, h)), round(h * 64 / min(w, h))), Image.BICUBIC)
        hand.append(qualiclip_by_hand(release["visual"], release["prompts"],
                                      torch.from_numpy(np.array(image)).permute(2, 0, 1)))
    assert metrics["n"] == len(samples)
    assert metrics["srcc"] == pytest.approx(stats.spearmanr(hand, [s.mos for s in samples])[0], abs=1e-6)


@pytest.mark.slow
def test_pretrain_clip_encoder_from_scratch_and_from_the_release(release, demo_root, tmp_path):
    # two training images: one step per run (a step of a random RN50 takes seconds on 2 CPU cores)
    split = write_small_train_split(demo_root / "koniq-10k", tmp_path / "split.json")
    common = ("pretrain_qualiclip.py", "--encoder", "clip", "--data_root", demo_root / "koniq-10k", "--epochs", "1",
              "--split_file", tmp_path / "split.json", "--batch_size", "2", "--num_levels", "2", "--crop_size", "64",
              "--resize", "64", "--eval_patch_num", "1", "--level_eval_images", "2", "--distortion_types", "blur",
              "noise", "--num_workers", "0", "--device", "cpu", "--amp", "off", "--log_every", "1")
    scratch = tmp_path / "scratch"
    proc = run_cli(*common, "--no_imagenet_pretrained", "--text_features", release["path"], "--save_dir", scratch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkl = scratch / "clip_RN50_qualiclip_pretrained.pkl"
    ckpt = torch.load(pkl, weights_only=True)
    assert ckpt["format"] == ENCODER_FORMAT and ckpt["text_features"].shape == (7, 2, 1024)
    assert sorted(ckpt["train_images"]) == sorted(f"512x384/{name}" for name in split["train"])
    results = json.loads((scratch / "results.json").read_text())
    assert set(results["level_ranking_accuracy"]) == {"blur", "noise", "overall"}
    assert -1 <= results["zero_shot_val"]["srcc"] <= 1
    assert load_scorer(pkl).kind == "qualiclip_clip_encoder"

    # from the release: its image tower and its prompt features; a tiny LR keeps the weights near it
    tuned = tmp_path / "tuned"
    proc = run_cli(*common, "--init_from", release["path"], "--lr", "1e-9", "--min_lr", "1e-9", "--no_eval",
                   "--level_eval_images", "0", "--save_dir", tuned)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tuned / "clip_RN50_qualiclip_pretrained.pkl", weights_only=True)
    torch.testing.assert_close(ckpt["text_features"], release["prompts"].view(7, 2, 1024), rtol=0, atol=0)
    start = release["visual"].state_dict()
    for key in ("conv1.weight", "layer3.2.conv2.weight", "attnpool.c_proj.weight"):
        torch.testing.assert_close(ckpt["visual"][key], start[key], rtol=0, atol=1e-6)
    assert json.loads((tuned / "args.json").read_text())["prompt_set"] == "qualiclip"

    proc = run_cli(*common, "--encoder", "swin", "--init_from", release["path"], "--save_dir", tmp_path / "bad")
    assert_user_error(proc, "--init_from", "--encoder clip")
