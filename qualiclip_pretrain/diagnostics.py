"""Label-free checks that Stage 1 learns: level-ranking accuracy and feature spread.

``level_ranking_accuracy``: held-out clean images (never trained on) are degraded at every level
of each distortion type; a quality encoder that learned what Stage 1 teaches scores a milder
version higher. For each image and type the clean crop (level 0) and its five degraded versions
(levels 1..5, ``LEVEL_PARAMS``) form 6 versions and 15 pairs l < l'; the accuracy is the fraction
of pairs with score(l) > score(l'), ties counting one half, so a constant score gives 0.5
(chance) and a perfect one 1.0. The clean crop is included: it is milder than any degraded one,
and it is what a quality model meets most. Versions are ordered by the zero-shot score's
log-odds, ``100 * (cos_pos - cos_neg)``, which orders exactly like
``softmax(100 * [cos_pos, cos_neg])[0]`` but does not saturate to a tie at 0 or 1 in float32.
With ``degradations='arniqa'`` the keys are ARNIQA's groups: per image and group, one distortion
of the group (a seeded choice) at levels 1..5 (``arniqa.distort_levels``: the random draws are
shared by the levels, so they differ only in intensity).

``feature_spread``: the total variance of the L2-normalised projected features across a batch,
``1 - ||mean_i f_i / ||f_i||| |^2`` (the sum over dimensions of the per-dimension variance of
unit vectors). It is 0 when every input maps to the same direction, the loss's trivial solution
(consistency perfect, every ranking difference exactly 0), and near 1 for directions spread
over the sphere.
"""
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from iqa.datasets import load_rgb
from iqa.patches import resized_size, to_model_input
from iqa.runtime import UserError, autocast
from models.quality_encoder import zero_shot_log_odds
from qualiclip_pretrain import arniqa
from qualiclip_pretrain.degradation_generator import NUM_LEVELS, SyntheticDegradation
from qualiclip_pretrain.pretrain_dataset import pil_to_uint8_tensor

# Below this epoch-mean spread the features are treated as collapsing; see README, Stage 1 notes.
COLLAPSE_SPREAD = 0.02


def feature_spread(features):
    """``1 - ||mean of the L2-normalised rows||^2`` of ``features`` (..., D), in [0, 1]; float32."""
    unit = torch.nn.functional.normalize(features.detach().float().reshape(-1, features.shape[-1]), dim=-1)
    return 1.0 - unit.mean(dim=0).square().sum()


def collapse_warning(spread):
    """The warning line for an epoch-mean feature spread below ``COLLAPSE_SPREAD``, else None."""
    if spread >= COLLAPSE_SPREAD:
        return None
    return (f"warning: feature spread {spread:.4f} < {COLLAPSE_SPREAD}: the projected features are collapsing onto "
            f"one direction (the loss's trivial solution, which training does not leave again); "
            f"see README, 'Why Stage 1 collapsed'")


def choose_images(paths, max_images, seed):
    """At most ``max_images`` of ``paths``, a seeded choice kept in the input order."""
    paths = list(paths)
    if max_images < 1:
        raise UserError(f"--level_eval_images must be >= 1 (or 0 to skip the level ranking), got {max_images}")
    if len(paths) <= max_images:
        return paths
    keep = np.random.default_rng(seed).choice(len(paths), size=max_images, replace=False)
    return [paths[i] for i in sorted(keep)]


def centre_crop(path, resize, crop_size):
    """The image, shorter side resized to ``resize`` (0 = native, never below the crop), centre-cropped."""
    image = load_rgb(path)
    size = resized_size(*image.size, resize, crop_size)
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - crop_size) // 2, (size[1] - crop_size) // 2
    return image.crop((left, top, left + crop_size, top + crop_size))


def degradation_ladders(path, distortion_types, resize, crop_size, seed, degradations="original"):
    """uint8 ``(T, 1 + NUM_LEVELS, 3, S, S)``: per type (or ARNIQA group), the clean centre crop then
    levels 1..5. ``seed``: a sequence of ints for the random draws (e.g. run seed and image index)."""
    crop = centre_crop(path, resize, crop_size)
    clean = pil_to_uint8_tensor(crop)
    ladders = []
    for t, name in enumerate(distortion_types):
        # Seeded per (image, type): the draws do not depend on batching or on the other images.
        rng = np.random.default_rng([*seed, t])
        if degradations == "arniqa":
            choices = arniqa.DISTORTION_GROUPS[name]
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            levels = list(range(1, NUM_LEVELS + 1))
            versions = arniqa.distort_levels(clean.float().div(255).expand(1, NUM_LEVELS, -1, -1, -1),
                                             choices[int(rng.integers(len(choices)))], levels, generator)
            degraded = (versions[0] * 255).round().to(torch.uint8)
        else:
            degrader = SyntheticDegradation(name, NUM_LEVELS, rng=rng)
            degraded = torch.stack([pil_to_uint8_tensor(im) for im in degrader(crop)])
        ladders.append(torch.cat([clean.unsqueeze(0), degraded]))
    return torch.stack(ladders)


def pairwise_order_accuracy(scores):
    """``scores`` (N, V), versions mildest first -> fraction of pairs l < l' with
    scores[:, l] > scores[:, l'], ties counting one half."""
    first, second = torch.triu_indices(scores.shape[1], scores.shape[1], offset=1)
    diff = scores[:, first] - scores[:, second]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@torch.no_grad()
def level_ranking_accuracy(model, text_features, image_paths, distortion_types, *, crop_size, resize=384,
                           batch_size=32, device="cpu", amp_dtype=None, channels_last=False, seed=0,
                           progress=True, degradations="original"):
    """Fraction of correctly ordered degradation-level pairs per distortion type, and ``overall``
    (their mean); see the module docstring. With ``degradations='arniqa'``, ``distortion_types`` are
    ARNIQA group names and the keys too. ``model`` maps normalised images to features; it is run in
    eval mode and put back into its previous mode afterwards."""
    if not image_paths:
        raise UserError("level-ranking accuracy needs at least one held-out image")
    device = torch.device(device)
    text_features = text_features.to(device)
    types = list(distortion_types)
    versions = len(types) * (1 + NUM_LEVELS)
    images_per_batch = max(1, batch_size // versions)
    log_odds = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(image_paths), images_per_batch), desc="level ranking",
                          disable=not progress, leave=False):
            chunk = image_paths[start:start + images_per_batch]
            crops = torch.stack([degradation_ladders(path, types, resize, crop_size, (seed, start + i), degradations)
                                 for i, path in enumerate(chunk)])
            with autocast(device, amp_dtype):
                features = model(to_model_input(crops.flatten(0, 2), device, channels_last))
            log_odds.append(zero_shot_log_odds(features, text_features).double().cpu().view(len(chunk), len(types), -1))
    finally:
        model.train(was_training)
    log_odds = torch.cat(log_odds)
    accuracy = {name: pairwise_order_accuracy(log_odds[:, t]) for t, name in enumerate(types)}
    accuracy["overall"] = float(np.mean(list(accuracy.values())))
    return accuracy


__all__ = ["COLLAPSE_SPREAD", "collapse_warning", "feature_spread", "level_ranking_accuracy", "choose_images",
           "pairwise_order_accuracy"]
