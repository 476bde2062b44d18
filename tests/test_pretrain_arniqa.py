"""Stage 1 with ARNIQA's degradation model: compositions, their batched application, the CLI."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from iqa.patches import IMAGENET_MEAN, IMAGENET_STD
from iqa.runtime import UserError
from qualiclip_pretrain import arniqa
from qualiclip_pretrain.degradation_generator import cuda_jpeg, degrade_batch
from qualiclip_pretrain.engine import prepare_batch
from qualiclip_pretrain.pretrain_dataset import PretrainDataset, resolve_degrade_on
from tests.helpers import assert_user_error, run_cli

CROP = 64
GROUPS = list(arniqa.DISTORTION_GROUPS)
# Groups whose distortions draw no random numbers (jpeg: the codecs, computed in the workers).
DETERMINISTIC_GROUPS = ["jpeg", "brightness_change", "sharpness_contrast"]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A smooth textured photo stand-in (values 40..215), big enough for two 64-pixel crops."""
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.uniform(40, 215, (12, 15, 3)), np.ones((8, 8, 1)))
    path = tmp_path_factory.mktemp("clean") / "img.png"
    Image.fromarray(smooth.astype(np.uint8)).save(path)
    return str(path)


def steps_of(composition):
    return [arniqa.DISTORTIONS[i] for i in composition.tolist() if i != arniqa.NO_DISTORTION]


def clean_crops(path, count, seed, epoch=0, levels=3):
    """uint8 (2, L, 3, S, S) clean crops of items 0..count-1: the original model in device mode draws the
    crop offsets first from the same (seed, epoch, index) generator and leaves blur rows clean."""
    dataset = PretrainDataset([path] * count, CROP, ["blur"], levels, "device", seed)
    dataset.set_epoch(epoch)
    return [dataset[i]["crops"] for i in range(count)]


def by_hand(crops, names, levels, generator=None):
    """``names`` applied in order to uint8 (2, L, 3, S, S) crops with ``arniqa.distort``, level j at
    levels[j]; every level of a step starts from the same generator state. -> 0..255 rounded."""
    x = crops.float() / 255
    for name in names:
        state = generator.get_state() if generator is not None else None
        for j, level in enumerate(levels):
            if generator is not None:
                generator.set_state(state)
            x[:, j] = arniqa.distort(x[:, j], name, level, generator)
    return (x * 255).round()


def pixels(model_input):
    """Normalised model input back to 0..255 values."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((model_input * std + mean) * 255).round()


# ----------------------------------------------------------------------------- compositions

def test_compositions_draw_1_to_n_distinct_groups_in_random_order():
    lengths, firsts = set(), set()
    for seed in range(400):
        composition = arniqa.draw_composition(np.random.default_rng(seed), GROUPS, 4)
        names = steps_of(composition)
        groups = [arniqa.GROUP_OF[name] for name in names]
        assert 1 <= len(names) <= 4 and len(set(groups)) == len(groups)
        assert composition.shape == (7,) and (composition[len(names):] == arniqa.NO_DISTORTION).all()
        lengths.add(len(names))
        firsts.add(groups[0])
    assert lengths == {1, 2, 3, 4} and firsts == set(GROUPS)
    subset = ["noise", "blur"]
    drawn = {arniqa.GROUP_OF[name] for seed in range(50)
             for name in steps_of(arniqa.draw_composition(np.random.default_rng(seed), subset, 2))}
    assert drawn == set(subset)
    same = [arniqa.draw_composition(np.random.default_rng([3, 1, 4]), GROUPS, 4) for _ in range(2)]
    assert torch.equal(*same)


def test_dataset_compositions_are_seeded_by_seed_epoch_and_index(image_path):
    def compositions(seed, epoch, **kw):
        dataset = PretrainDataset([image_path] * 12, CROP, num_levels=2, seed=seed, degradations="arniqa", **kw)
        dataset.set_epoch(epoch)
        return [dataset[i]["composition"] for i in range(12)]

    first = compositions(5, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, compositions(5, 0)))
    assert not all(torch.equal(a, b) for a, b in zip(first, compositions(5, 1)))
    assert not all(torch.equal(a, b) for a, b in zip(first, compositions(6, 0)))
    for composition in compositions(5, 2, arniqa_groups=["noise", "blur", "jpeg"], max_distortions=2):
        groups = [arniqa.GROUP_OF[name] for name in steps_of(composition)]
        assert 1 <= len(groups) <= 2 and set(groups) <= {"noise", "blur", "jpeg"}
        assert len(set(groups)) == len(groups)


# ----------------------------------------------------------------------------- applying them

def test_device_path_equals_distort_by_hand_on_both_crops_and_all_levels(image_path):
    """One image: prepare_batch applies its composition to both crops at every level, in order,
    each level replaying the step's generator state."""
    levels = [0, 2, 4]
    groups = [g for g in GROUPS if g != "jpeg"]  # no codec: the worker leaves the crops clean
    for index in range(40):
        dataset = PretrainDataset([image_path] * 40, CROP, num_levels=3, seed=1, degradations="arniqa",
                                  arniqa_groups=groups)
        item = dataset[index]
        names = steps_of(item["composition"])
        if len(names) >= 2 and set(names) & arniqa.RANDOM_DISTORTIONS:
            break
    else:
        pytest.fail("no composition of 2+ steps with a random distortion among 40 items")
    crops = clean_crops(image_path, index + 1, seed=1)[index]
    assert item["worker_steps"] == 0 and torch.equal(item["crops"], crops)
    batch = default_collate([item])
    args = argparse.Namespace(degrade_on="device", channels_last=False)
    images, shape = prepare_batch(batch, levels, args, torch.device("cpu"), torch.Generator().manual_seed(11))
    assert shape == (1, 2, 3)
    expected = by_hand(crops, names, [1, 3, 5], torch.Generator().manual_seed(11))
    assert torch.equal(pixels(images).view(2, 3, 3, CROP, CROP), expected)
    # the composition really changed every level, and more at level 5 than at level 1
    change = (expected - crops.float()).abs().mean(dim=(0, 2, 3, 4))
    assert change[0] > 0 and change[2] > change[0]


def test_batched_images_and_worker_codecs_equal_distort_by_hand(image_path):
    """Several images with different compositions in one batch: each equals its own composition by
    hand; a codec and the steps before it are applied in the worker, the rest on the device."""
    count, levels = 16, [0, 2, 4]
    dataset = PretrainDataset([image_path] * count, CROP, num_levels=3, seed=2, degradations="arniqa",
                              arniqa_groups=DETERMINISTIC_GROUPS, max_distortions=3)
    items = [dataset[i] for i in range(count)]
    clean = clean_crops(image_path, count, seed=2)
    codec_items = 0
    for item in items:
        names = steps_of(item["composition"])
        codec = [s for s, name in enumerate(names) if name in arniqa.CODECS]
        assert item["worker_steps"] == (codec[0] + 1 if codec else 0)
        codec_items += bool(codec)
    assert 0 < codec_items < count
    args = argparse.Namespace(degrade_on="device", channels_last=False)
    images, _ = prepare_batch(default_collate(items), levels, args, torch.device("cpu"), torch.Generator())
    got = pixels(images).view(count, 2, 3, 3, CROP, CROP)
    worker = PretrainDataset([image_path] * count, CROP, num_levels=3, seed=2, degradations="arniqa",
                             arniqa_groups=DETERMINISTIC_GROUPS, max_distortions=3, degrade_on="worker")
    for i, item in enumerate(items):
        expected = by_hand(clean[i], steps_of(item["composition"]), [1, 3, 5])
        assert torch.equal(got[i], expected), steps_of(item["composition"])
        # the worker path applies the same composition to the same crops
        worker_item = worker[i]
        assert torch.equal(worker_item["composition"], item["composition"])
        assert worker_item["worker_steps"] == len(steps_of(item["composition"]))
        assert torch.equal(worker_item["crops"].float(), expected)


def test_worker_steps_end_at_the_codec_the_workers_compute(image_path):
    def composition(*names):
        out = torch.full((7,), arniqa.NO_DISTORTION)
        out[:len(names)] = torch.tensor([arniqa.DISTORTIONS.index(name) for name in names])
        return out

    def steps(names, **kw):
        dataset = PretrainDataset([image_path], CROP, degradations="arniqa", **kw)
        return dataset.worker_steps(composition(*names))

    assert steps(["gaublur", "jpeg", "whitenoise"]) == 2
    assert steps(["gaublur", "jpeg2000"]) == 2
    assert steps(["gaublur", "whitenoise"]) == 0
    assert steps(["gaublur", "jpeg", "whitenoise"], jpeg_on="cuda") == 0  # nvjpeg on the device
    assert steps(["gaublur", "jpeg2000", "whitenoise"], jpeg_on="cuda") == 2
    assert steps(["gaublur", "jpeg", "whitenoise"], degrade_on="worker") == 3
    with pytest.raises(UserError, match="--jpeg_on cuda needs --degrade_on device"):
        PretrainDataset([image_path], CROP, degrade_on="worker", jpeg_on="cuda")


def test_levels_share_their_random_draws():
    """White noise on mid-grey: every level is the same unit field times its own standard deviation."""
    grey = torch.full((2, 5, 3, 32, 32), 0.5)
    out = arniqa.distort_levels(grey, "whitenoise", [1, 2, 3, 4, 5], torch.Generator().manual_seed(0))
    fields = [(out[:, j] - 0.5) / np.sqrt(v) for j, v in enumerate(arniqa.LEVEL_PARAMS["whitenoise"])]
    inside = (out > 0).all(1) & (out < 1).all(1)  # unclipped pixels at every level
    for field in fields[1:]:
        assert torch.allclose(field[inside], fields[0][inside], atol=1e-4)
    assert abs(float(fields[0].std()) - 1) < 0.05
    # the two crops draw different fields
    assert abs(np.corrcoef(fields[0][0].flatten(), fields[0][1].flatten())[0, 1]) < 0.1


# ----------------------------------------------------------------------------- settings

def test_degrade_on_auto_is_device_on_cuda_and_worker_on_cpu():
    assert resolve_degrade_on("auto", torch.device("cpu")) == "worker"
    assert resolve_degrade_on("auto", torch.device("cuda", 0)) == "device"
    assert resolve_degrade_on("device", torch.device("cpu")) == "device"
    assert resolve_degrade_on("worker", "cuda") == "worker"
    with pytest.raises(UserError, match="--degrade_on 'gpu'"):
        resolve_degrade_on("gpu", "cpu")


def parsed(*flags):
    from pretrain_qualiclip import check_args, get_args_parser

    args = get_args_parser().parse_args(["--image_dir", "imgs", "--device", "cpu", *flags])
    check_args(args)
    return args


def test_check_args_fills_and_checks_the_degradation_flags():
    args = parsed()
    assert (args.degradations, args.degrade_on, args.jpeg_on) == ("original", "worker", "worker")
    assert args.arniqa_groups is None and args.max_distortions is None
    args = parsed("--degradations", "arniqa")
    assert args.arniqa_groups == GROUPS and args.max_distortions == 4
    args = parsed("--degradations", "arniqa", "--arniqa_groups", "noise,blur", "--degrade_on", "device")
    assert args.arniqa_groups == ["blur", "noise"] and args.max_distortions == 2 and args.degrade_on == "device"
    for flags, fragment in [
        (["--degradations", "arniqa", "--arniqa_groups", "rain"], "--arniqa_groups"),
        (["--degradations", "arniqa", "--max_distortions", "8"], "--max_distortions must be an integer in 1..7"),
        (["--degradations", "arniqa", "--distortion_types", "blur"], "--arniqa_groups"),
        (["--max_distortions", "2"], "--degradations arniqa only"),
        (["--degradations", "arniqa", "--crop_size", "32"], "noneccpatch"),
        (["--jpeg_on", "cuda"], "--jpeg_on cuda needs a CUDA GPU"),
    ]:
        with pytest.raises(UserError, match=fragment):
            parsed(*flags)


def test_cuda_jpeg_refuses_cpu_images_in_one_line():
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(UserError, match=r"--jpeg_on cuda\) needs a CUDA device.*use --jpeg_on worker"):
        cuda_jpeg(images, [85, 85])
    with pytest.raises(UserError, match="needs a CUDA device"):
        degrade_batch(images, torch.tensor([1, 1]), torch.tensor([0, 1]), jpeg="cuda")
    with pytest.raises(UserError, match="needs a CUDA device"):
        arniqa.distort_levels(images.float().unsqueeze(1) / 255, "jpeg", [3], jpeg="cuda")
    with pytest.raises(ValueError, match="uint8"):
        cuda_jpeg(images.float(), [85, 85])


# ----------------------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli_arniqa_run_records_its_choice_and_per_group_level_ranking(tmp_path, text_features_file):
    folder = tmp_path / "clean"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    save_dir = tmp_path / "run"
    result = run_cli("pretrain_qualiclip.py", "--image_dir", folder, "--text_features", text_features_file,
                     "--epochs", "1", "--save_dir", save_dir, "--model_size", "nano", "--no_imagenet_pretrained",
                     "--batch_size", "2", "--num_workers", "0", "--crop_size", "64", "--num_levels", "2",
                     "--resize", "80", "--heldout_fraction", "0.2", "--level_eval_images", "1",
                     "--degradations", "arniqa", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    stored = json.loads((save_dir / "args.json").read_text())
    assert (stored["degradations"], stored["degrade_on"], stored["max_distortions"]) == ("arniqa", "worker", 4)
    assert stored["arniqa_groups"] == GROUPS
    ckpt = torch.load(save_dir / "swin_nano_qualiclip_pretrained.pkl", weights_only=True)
    assert ckpt["args"]["degradations"] == "arniqa" and ckpt["args"]["arniqa_groups"] == GROUPS
    ranking = json.loads((save_dir / "results.json").read_text())["level_ranking_accuracy"]
    assert set(ranking) == {*GROUPS, "overall"}
    assert all(0 <= value <= 1 for value in ranking.values())
    assert ranking["overall"] == pytest.approx(np.mean([ranking[g] for g in GROUPS]))


@pytest.mark.slow
def test_cli_jpeg_on_cuda_without_a_gpu_is_a_one_line_error(tmp_path, text_features_file):
    result = run_cli("pretrain_qualiclip.py", "--image_dir", tmp_path, "--text_features", text_features_file,
                     "--save_dir", tmp_path / "run", "--device", "cpu", "--jpeg_on", "cuda")
    assert_user_error(result, "--jpeg_on cuda needs a CUDA GPU")
    assert not (tmp_path / "run").exists()


def test_guide_is_another_name_of_the_original_degradations():
    import pretrain_qualiclip

    args = pretrain_qualiclip.get_args_parser().parse_args(["--degradations", "guide", "--device", "cpu"])
    pretrain_qualiclip.check_args(args)
    assert args.degradations == "original"
