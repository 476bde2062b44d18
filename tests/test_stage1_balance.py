"""Stage 1's --all_types_per_image and --clean_level: every type's ladder on the same crops, the clean
crop as the mildest level; checked against scipy / PIL on the pixels, in the workers and on the device."""
import argparse
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import default_collate

from iqa.patches import IMAGENET_MEAN, IMAGENET_STD
from iqa.runtime import UserError
from pretrain_qualiclip import check_args, get_args_parser
from qualiclip_pretrain.degradation_generator import DISTORTION_TYPES, LEVEL_PARAMS, parse_type_weights
from qualiclip_pretrain.engine import RunContext, pcgrad_backward, prepare_batch
from qualiclip_pretrain.pretrain_dataset import PretrainDataset
from qualiclip_pretrain.qualiclip_loss import build_loss
from tests.helpers import run_cli

CROP = 32
TYPES = ["blur", "jpeg", "noise"]
LEVELS = [0, 2, 4]  # --num_levels 3


def textured_image(path, seed=0, size=(80, 60)):
    """Smooth random texture in 60..190: blur changes it, and noise up to σ 25 rarely clips."""
    rng = np.random.default_rng(seed)
    array = ndimage.gaussian_filter(rng.uniform(0, 255, (size[1], size[0], 3)), (1.5, 1.5, 0))
    array = 60 + 130 * (array - array.min()) / (array.max() - array.min())
    Image.fromarray(array.round().astype(np.uint8)).save(path)
    return str(path)


def expected_blur(clean, sigma):
    """scipy's Gaussian (mirror borders, truncate 4) of a (3, S, S) uint8 crop, rounded as an 8-bit image."""
    blurred = ndimage.gaussian_filter(clean.numpy().astype(np.float64), (0, sigma, sigma), mode="mirror", truncate=4)
    return np.clip(np.rint(blurred), 0, 255)


def expected_jpeg(clean, quality):
    buffer = io.BytesIO()
    Image.fromarray(clean.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality, subsampling=2)
    return np.asarray(Image.open(buffer).convert("RGB")).transpose(2, 0, 1).astype(np.float64)


def check_ladders(ladders, clean_crops, type_names):
    """``ladders`` (T, 2, 1 + L, 3, S, S) pixel values: clean level first, then each type at LEVELS."""
    for ladder, name in zip(ladders, type_names):
        for view, clean in zip(ladder, clean_crops):
            assert np.array_equal(view[0], clean.numpy()), name
            for row, level in zip(view[1:], LEVELS):
                param = LEVEL_PARAMS[name][level]
                if name == "blur":
                    assert np.abs(row - expected_blur(clean, param)).max() <= 1, param
                elif name == "jpeg":
                    assert np.array_equal(row, expected_jpeg(clean, param)), param
                else:
                    residual = (row - clean.numpy()) / param
                    assert abs(residual.std() - 1) < 0.1, param
            if name == "noise":
                # one field per crop, the levels differ only in σ (within rounding; clipped pixels left out)
                unclipped = ((view[1:] > 0) & (view[1:] < 255)).all(axis=0)
                fields = [(row - clean.numpy())[unclipped] / LEVEL_PARAMS["noise"][level]
                          for row, level in zip(view[1:], LEVELS)]
                assert np.abs(fields[0] - fields[-1]).max() <= 0.5 / 5 + 0.5 / 25 + 1e-9


def clean_crops_of(paths, seed, index=0):
    """The two clean crops of image ``index`` that a dataset of ``seed`` cuts (offsets are drawn first,
    whatever the flags)."""
    return PretrainDataset(paths, CROP, ["blur"], 3, "device", seed)[index]["crops"][:, 0]


def test_worker_items_carry_every_type_on_the_same_crops_after_the_clean_one(tmp_path):
    path = textured_image(tmp_path / "img.png")
    dataset = PretrainDataset([path], CROP, TYPES, 3, "worker", seed=4, all_types=True, clean_level=True)
    item = dataset[0]
    assert item["crops"].shape == (3, 2, 4, 3, CROP, CROP) and item["crops"].dtype == torch.uint8
    assert item["distortion_type"].tolist() == [DISTORTION_TYPES.index(name) for name in TYPES]
    check_ladders(item["crops"].numpy().astype(np.float64), clean_crops_of([path], 4), TYPES)


def test_device_batch_degrades_every_level_but_the_clean_one(tmp_path):
    paths = [textured_image(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    dataset = PretrainDataset(paths, CROP, TYPES, 3, "device", seed=7, all_types=True, clean_level=True)
    batch = default_collate([dataset[0], dataset[1]])
    args = argparse.Namespace(degrade_on="device", channels_last=False, clean_level=True)
    images, shape = prepare_batch(batch, LEVELS, args, torch.device("cpu"), torch.Generator().manual_seed(0))
    # B images x T types ladders, image-major, as the loss's batch axis
    assert shape == (2 * 3, 2, 4) and images.shape == (2 * 3 * 2 * 4, 3, CROP, CROP)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    pixels = ((images.double() * std + mean) * 255).round().numpy().reshape(2, 3, 2, 4, 3, CROP, CROP)
    for i in range(len(paths)):
        check_ladders(pixels[i], clean_crops_of(paths, 7, i), TYPES)


def test_single_type_items_gain_only_the_clean_level(tmp_path):
    path = textured_image(tmp_path / "img.png")
    plain = PretrainDataset([path], CROP, TYPES, 3, "worker", seed=2)[0]
    with_clean = PretrainDataset([path], CROP, TYPES, 3, "worker", seed=2, clean_level=True)[0]
    # same draws: the same type and the same degraded levels, behind the clean crops
    assert with_clean["distortion_type"] == plain["distortion_type"]
    assert with_clean["crops"].shape == (2, 4, 3, CROP, CROP)
    assert torch.equal(with_clean["crops"][:, 1:], plain["crops"])
    assert torch.equal(with_clean["crops"][:, 0], clean_crops_of([path], 2))


def test_curriculum_epochs_carry_only_the_curriculum_ladders(tmp_path):
    path = textured_image(tmp_path / "img.png")
    dataset = PretrainDataset([path], CROP, TYPES, 2, "device", seed=1, curriculum_types=["noise"],
                              curriculum_epochs=1, all_types=True)
    assert dataset[0]["distortion_type"].tolist() == [DISTORTION_TYPES.index("noise")]
    dataset.set_epoch(1)
    assert dataset[0]["crops"].shape == (3, 2, 2, 3, CROP, CROP)


def test_arniqa_refuses_the_original_models_ladder_flags(tmp_path):
    path = textured_image(tmp_path / "img.png")
    for flags in ({"all_types": True}, {"clean_level": True}):
        with pytest.raises(UserError, match="--degradations original"):
            PretrainDataset([path], CROP, degradations="arniqa", **flags)


@pytest.mark.parametrize("loss_type", ["simplified", "full"])
def test_ladder_weights_scale_each_ladders_ranking_terms(loss_type):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 2, 5, 16, generator=generator, requires_grad=True)
    text = torch.randn(2, 16, generator=generator)
    loss = build_loss(loss_type, lambda_cons=0.0)
    weights = torch.tensor([1.0, 0.0, 2.5, 0.25])
    weighted = loss(features, text, weights)
    # the unweighted loss of each ladder alone, weighted and averaged over the 4 ladders
    alone = [loss(features[b:b + 1].detach(), text) for b in range(4)]
    for term in ("pos", "neg"):
        expected = sum(float(w) * float(parts[term]) for w, parts in zip(weights, alone)) / 4
        assert weighted[term].item() == pytest.approx(expected, rel=1e-6)
    assert loss(features, text, torch.ones(4))["loss"].item() == pytest.approx(loss(features, text)["loss"].item())
    weighted["loss"].backward()
    assert float(features.grad[1].abs().max()) == 0 and float(features.grad[0].abs().max()) > 0
    with pytest.raises(ValueError, match="ladder_weights"):
        loss(features, text, torch.ones(3))


def test_type_weights_are_named_non_negative_weights_of_the_trained_types():
    assert parse_type_weights(["noise=0.25", "blur=2"], ["blur", "noise"]) == {"noise": 0.25, "blur": 2.0}
    assert parse_type_weights({"noise": 0.5}, ["noise"]) == {"noise": 0.5} and parse_type_weights(None, ["blur"]) == {}
    for bad in (["jpeg=1"], ["noise=-1"], ["noise"], ["noise=x"], ["noise=1", "noise=2"]):
        with pytest.raises(UserError, match="--type_weights"):
            parse_type_weights(bad, ["blur", "noise"])
    args = get_args_parser().parse_args(["--degradations", "arniqa", "--type_weights", "noise=0.5"])
    with pytest.raises(UserError, match="--type_weights"):
        check_args(args)


def type_gradients(model, images, shape, types, loss_fn, text):
    """Each type's gradient of its share of the batch loss, the batch's loss, and the full-batch gradient."""
    params = list(model.parameters())
    ladders = images.view(*shape, *images.shape[1:])
    per_type = {}
    for kind in types.unique().tolist():
        rows = (types == kind).nonzero().flatten()
        loss = loss_fn(model(ladders[rows].flatten(0, 2)).view(len(rows), *shape[1:], -1), text)["loss"]
        grads = torch.autograd.grad(loss * len(rows) / shape[0], params)
        per_type[kind] = np.concatenate([g.flatten().numpy() for g in grads]).astype(np.float64)
    full = loss_fn(model(images).view(*shape, -1), text)
    full_grad = np.concatenate([g.flatten().numpy() for g in torch.autograd.grad(full["loss"], params)])
    return per_type, full, full_grad


def test_pcgrad_projects_conflicting_type_gradients_apart():
    """Over six seeds, some with conflicting and some with agreeing blur and noise gradients: the step is
    their sum, each first projected onto the normal plane of the other where they conflict."""
    conflicts = set()
    for seed in range(6):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 8))
        text = torch.randn(2, 8)
        loss_fn = build_loss("simplified", lambda_cons=0.5)
        shape, types = (4, 2, 3), torch.tensor([0, 2, 2, 0])
        images = torch.randn(4 * 2 * 3, 3, 8, 8)
        per_type, full, full_grad = type_gradients(model, images, shape, types, loss_fn, text)
        blur, noise = per_type[0], per_type[2]
        assert np.allclose(blur + noise, full_grad, atol=1e-6)  # the shares add up to the batch's gradient
        run = RunContext(argparse.Namespace(device=torch.device("cpu")), None, [0, 2, 4], None)
        parts, features = pcgrad_backward(model, images, shape, types, loss_fn, text, lambda loss: loss, run)
        result = np.concatenate([p.grad.flatten().numpy() for p in model.parameters()]).astype(np.float64)
        dot = blur @ noise
        conflicts.add(bool(dot < 0))
        expected = blur + noise
        if dot < 0:
            expected = blur - dot / (noise @ noise) * noise + noise - dot / (blur @ blur) * blur
        assert np.allclose(result, expected, atol=1e-6), seed
        assert parts["loss"].item() == pytest.approx(full["loss"].item(), rel=1e-6)
        assert features.shape == (24, 8)
    assert conflicts == {True, False}


@pytest.mark.slow
def test_cli_trains_on_all_types_with_the_clean_level(tmp_path, text_features_file):
    images = tmp_path / "clean"
    images.mkdir()
    for i in range(4):
        textured_image(images / f"{i}.png", seed=i, size=(96, 80))
    save_dir = tmp_path / "run"
    result = run_cli("pretrain_qualiclip.py", "--image_dir", images, "--text_features", text_features_file,
                     "--save_dir", save_dir, "--epochs", "1", "--model_size", "nano", "--no_imagenet_pretrained",
                     "--batch_size", "2", "--num_workers", "0", "--crop_size", "64", "--num_levels", "3",
                     "--distortion_types", "blur", "noise", "--all_types_per_image", "--clean_level",
                     "--heldout_fraction", "0.25", "--type_weights", "blur=0", "noise=0", "--lambda_cons", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    args = json.loads((save_dir / "args.json").read_text())
    assert args["all_types_per_image"] is True and args["clean_level"] is True
    assert args["type_weights"] == {"blur": 0.0, "noise": 0.0}
    record = json.loads((save_dir / "log.jsonl").read_text().splitlines()[0])
    # every ladder weighted 0 and no consistency term: the training loss is exactly 0
    assert record["train_loss"] == record["train_pos"] == record["train_neg"] == 0
    assert set(record["level_ranking_accuracy"]) == {"blur", "noise", "overall"}
