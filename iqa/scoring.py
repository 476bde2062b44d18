"""Inference: a checkpoint of either stage as a scorer of images (used by ``predict.py``,
``cross_dataset_test.py`` and ``hubconf.py``).

    from iqa.scoring import load_scorer
    scorer = load_scorer("runs/x/best.pt")            # or a Stage-1 .pkl, scored zero-shot
    scores = scorer(images)                           # (N, 3, H, W) RGB in [0, 1] -> (N,) scores
    print(scorer.score_meaning)                       # what the scores are: see the kinds below
    scores = scorer.score_paths(["a.jpg", "b.png"])   # decoded with iqa.datasets.load_rgb
    mos = scorer.to_mos(scores)                       # Stage 2 only: back to its training MOS scale

A score is computed as evaluation computes it (``iqa.evaluation.predict_images``): the image as
8-bit RGB, resized as the checkpoint says (PIL), cut into the checkpoint's grid crops,
ImageNet-normalised, scored in eval mode under ``torch.inference_mode``, averaged over crops.
CLIP image encoders (QualiCLIP's released ``qualiclip.pth`` and ``pretrain_qualiclip.py --encoder
clip`` .pkl files) are scored as QualiCLIP's own inference scores: the whole image at full
resolution (``patch_size`` None), no crops (``predict_whole_images``).

The score of each kind: a Stage-2 checkpoint's output on its [0, 1] training scale; a Stage-1 Swin
encoder's zero-shot log-odds ``100 * (cos_pos - cos_neg)`` (unbounded; ``sigmoid`` of it is the
positive prompt's probability for one prompt pair), because that probability saturates to exactly
1.0 for a trained Swin encoder and ties every image; a CLIP image encoder's QualiCLIP probability
in [0, 1], as QualiCLIP's inference computes it.

What a file is comes from its content, not its name: ``CHECKPOINT_KINDS`` maps a kind's name to
how it is recognised and built, and ``register_kind`` adds one (e.g. another release format,
recognised by its keys) without changing ``load_scorer`` or its callers.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from iqa.datasets import Sample
from iqa.evaluation import DEFAULT_TEST_PATCH_NUM, EvalOptions, predict_images
from iqa.patches import DEFAULT_RESIZE, decode_threads, load_resized, resize_rgb, to_model_input
from iqa.runtime import UserError, autocast, check_writable_path, safe_load
from models.clip_image_encoder import ENCODER_FORMAT as CLIP_ENCODER_FORMAT
from models.clip_image_encoder import ClipImageEncoder, is_release
from models.hyperiqa_swin import CHECKPOINT_FORMAT, HyperIQASwin
from models.quality_encoder import ENCODER_FORMAT, QualityEncoder
from models.swin_backbone import NATIVE_IMG_SIZE

DEFAULT_BATCH_SIZE = 64
CHUNK_SIZE = 256          # images decoded at a time by score_paths, so a long list never sits in memory at once
# What each kind's scores are (Scorer.score_meaning), printed by predict.py beside its CSV.
TRAINING_SCALE_MEANING = "score: the model's output on its [0, 1] training scale (higher = better)"
LOG_ODDS_MEANING = ("score: zero-shot log-odds 100 x (cos_pos - cos_neg), unbounded, mean over the prompt pairs "
                    "(higher = better; with one pair, sigmoid(score) is the positive prompt's probability)")
PROBABILITY_MEANING = "score: QualiCLIP's probability of the positive prompts, in [0, 1] (higher = better)"
MIN_WHOLE_IMAGE_SIDE = 32  # whole-image scoring upscales a smaller image: a ResNet's total stride, one feature position


def other_dataset_resize(resize):
    """The resize a model trained at ``resize`` scores other datasets' images at: a fixed
    [width, height] belongs to the dataset it was set for (``--protocol hyperiqa``'s KonIQ-10k size),
    so other images keep their aspect at the default shorter side."""
    return DEFAULT_RESIZE if isinstance(resize, (list, tuple)) else resize


def predict_whole_images(score_fn, images, device, opts, progress=False, desc="score"):
    """One score per whole uint8 image (no crops) -> (len(images),) float64 CPU tensor.  Images of one
    size go through ``score_fn`` together, as many as hold the pixels of ``opts.batch_size`` 224×224
    crops (at least one), so ``--batch_size`` bounds the memory as it does for crops."""
    by_size = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(index)
    batches = []
    for (_, height, width), indices in by_size.items():
        per_batch = max(1, opts.batch_size * NATIVE_IMG_SIZE ** 2 // (height * width))
        batches += [indices[start:start + per_batch] for start in range(0, len(indices), per_batch)]
    scores = torch.empty(len(images), dtype=torch.float64)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            x = to_model_input(torch.stack([images[i] for i in batch]), device, opts.channels_last)
            with autocast(device, opts.amp):
                scores[batch] = score_fn(x).double().cpu()
    return scores


class ZeroShotModel(nn.Module):
    """A Stage-1 encoder with its prompt anchors: normalised crops -> the encoder's ``zero_shot_quality``."""

    def __init__(self, encoder, text_features):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("text_features", text_features)

    def forward(self, x):
        return self.encoder.zero_shot_quality(x, self.text_features)


class Scorer:
    """A model and the settings evaluation scores it with; ``kind`` names its checkpoint kind.

    ``resize`` (shorter side, 0 = native, or a fixed [width, height]), ``patch_size`` and
    ``test_patch_num`` (grid crops per image) are plain attributes: change them to score otherwise.
    ``patch_size`` None: the whole image is scored (no crops; ``test_patch_num`` is 1).
    ``mos_bounds``: the (lo, hi) training MOS range a Stage-2 score in [0, 1] stands for, else None.
    ``score_meaning``: one line saying what the scores are (their scale), for people reading them.
    """

    def __init__(self, model, *, kind, resize, patch_size, test_patch_num, mos_bounds=None, score_meaning):
        self.model = model.eval()
        self.kind = kind
        self.score_meaning = score_meaning
        self.resize = resize
        self.patch_size = patch_size
        self.test_patch_num = test_patch_num
        self.mos_bounds = None if mos_bounds is None else (float(mos_bounds[0]), float(mos_bounds[1]))
        self.device = torch.device("cpu")

    def to(self, device):
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @property
    def min_side(self):
        """The shortest side an image is resized to at least: the patch, or for whole images a ResNet's stride."""
        return self.patch_size or MIN_WHOLE_IMAGE_SIDE

    def score(self, crops):
        """ImageNet-normalised N×3×S×S crops -> N scores (the callable ``iqa.evaluation.evaluate`` takes)."""
        return self.model(crops)

    def options(self, batch_size=DEFAULT_BATCH_SIZE, amp=None, num_workers=0):
        """The ``EvalOptions`` of this scorer's crops; ``batch_size`` counts crops (whole images when
        ``patch_size`` is None)."""
        return EvalOptions(self.test_patch_num, self.patch_size, batch_size, amp, num_workers=num_workers)

    @property
    def predict(self):
        """How images become scores: averaged grid crops, or whole images when ``patch_size`` is None
        (the ``predict`` argument of ``iqa.evaluation.evaluate``)."""
        return predict_whole_images if self.patch_size is None else predict_images

    def score_images(self, images, opts, progress=False):
        """Decoded, already resized uint8 3×H×W images -> (N,) float64 scores."""
        self.model.eval()
        return self.predict(self.score, images, self.device, opts, progress=progress, desc="score")

    def __call__(self, images, batch_size=DEFAULT_BATCH_SIZE, amp=None):
        """``images``: an (N, 3, H, W) tensor or a list of (3, H, W) tensors, RGB, float in [0, 1]
        (quantised to 8 bits as a decoded file is) or uint8 -> (N,) float64 scores."""
        if isinstance(images, torch.Tensor) and images.dim() != 4:
            raise ValueError(f"images must be (N, 3, H, W) or a list of (3, H, W) tensors, got shape "
                             f"{tuple(images.shape)}")
        return self.score_images([self.prepare(image) for image in images], self.options(batch_size, amp))

    def prepare(self, image):
        """One (3, H, W) RGB tensor -> the resized uint8 image evaluation would crop."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image must be a (3, H, W) RGB tensor, got shape {tuple(image.shape)}")
        if image.is_floating_point():
            low, high = image.min().item(), image.max().item()
            if low < 0 or high > 1:
                raise ValueError(f"float images must be RGB in [0, 1] (not 0..255, not ImageNet-normalised); "
                                 f"got values in [{low:g}, {high:g}]")
            image = (image * 255).round().to(torch.uint8)
        elif image.dtype != torch.uint8:
            raise ValueError(f"images must be float in [0, 1] or uint8, got {image.dtype}")
        pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
        return resize_rgb(pil, self.resize, self.min_side)

    def read(self, path):
        """Decode and resize one file as evaluation does -> uint8 tensor (``UserError`` if it does not decode)."""
        return load_resized(Sample(os.fspath(path), float("nan"), None, None), self.resize, self.min_side)

    def score_chunks(self, paths, opts, *, chunk_size=CHUNK_SIZE, skip_unreadable=False, progress=False):
        """Score ``paths`` ``chunk_size`` files at a time; yields each chunk's ``[(path, result)]`` in order,
        ``result`` the score (float) or, with ``skip_unreadable``, the ``UserError`` its decoding raised
        (otherwise that error stops the iteration)."""
        def read_or_error(path):
            try:
                return self.read(path)
            except UserError as err:
                return err

        with ThreadPoolExecutor(decode_threads()) as pool:
            for start in range(0, len(paths), chunk_size):
                chunk = list(paths[start:start + chunk_size])
                decoded = list(tqdm(pool.map(read_or_error, chunk), total=len(chunk), desc="decode",
                                    disable=not progress, leave=False))
                errors = [d for d in decoded if isinstance(d, UserError)]
                if errors and not skip_unreadable:
                    raise errors[0]
                images = [d for d in decoded if not isinstance(d, UserError)]
                scores = iter(self.score_images(images, opts, progress).tolist() if images else [])
                yield [(path, d if isinstance(d, UserError) else next(scores)) for path, d in zip(chunk, decoded)]

    def score_paths(self, paths, batch_size=DEFAULT_BATCH_SIZE, *, amp=None, num_workers=0, chunk_size=CHUNK_SIZE,
                    progress=False):
        """Image files -> (N,) float64 scores in order; a file that does not decode is a ``UserError`` naming it."""
        opts = self.options(batch_size, amp, num_workers)
        scores = [score for chunk in self.score_chunks(paths, opts, chunk_size=chunk_size, progress=progress)
                  for _, score in chunk]
        return torch.tensor(scores, dtype=torch.float64)

    def to_mos(self, scores):
        """Scores in [0, 1] (float, array or tensor) -> the training MOS scale: lo + score·(hi − lo)."""
        if self.mos_bounds is None:
            raise UserError(f"a {self.kind} checkpoint's scores have no MOS scale (only a train_swin.py "
                            f"checkpoint knows its training MOS range)")
        lo, hi = self.mos_bounds
        return lo + scores * (hi - lo)


# ----------------------------------------------------------------------------- checkpoint kinds

@dataclass(frozen=True)
class CheckpointKind:
    """``matches(ckpt)``: is the loaded object of this kind; ``build(ckpt, source)``: -> (model on CPU,
    dict of the ``Scorer`` settings: resize, patch_size, test_patch_num, score_meaning, mos_bounds)."""
    name: str
    description: str          # what the user should pass, for error messages
    matches: Callable
    build: Callable


CHECKPOINT_KINDS = {}


def register_kind(name, description, matches):
    """Decorator registering ``build`` as checkpoint kind ``name``; kinds are tried in registration order."""
    def register(build):
        CHECKPOINT_KINDS[name] = CheckpointKind(name, description, matches, build)
        return build
    return register


def has_format(value):
    return lambda ckpt: isinstance(ckpt, dict) and ckpt.get("format") == value


@register_kind("hyperiqa_swin", "a train_swin.py checkpoint (best.pt / last.pt)", has_format(CHECKPOINT_FORMAT))
def build_hyperiqa_swin(ckpt, source):
    args = ckpt["args"]
    return HyperIQASwin.from_checkpoint(ckpt, source), {
        "resize": other_dataset_resize(args["resize"]), "patch_size": args["patch_size"],
        "test_patch_num": args["test_patch_num"], "mos_bounds": ckpt["mos_bounds"],
        "score_meaning": TRAINING_SCALE_MEANING,
    }


@register_kind("qualiclip_swin_encoder", "a Stage-1 encoder .pkl from pretrain_qualiclip.py (scored zero-shot)",
               has_format(ENCODER_FORMAT))
def build_qualiclip_swin_encoder(ckpt, source):
    encoder, text_features = QualityEncoder.from_checkpoint(ckpt, source)
    args = ckpt.get("args", {})
    # Scored as Stage 1 validated it: its resize, crop size and number of grid crops.
    return ZeroShotModel(encoder, text_features), {
        "resize": args.get("eval_resize", args.get("resize", DEFAULT_RESIZE)),
        "patch_size": args.get("crop_size", NATIVE_IMG_SIZE),
        "test_patch_num": args.get("eval_patch_num", DEFAULT_TEST_PATCH_NUM),
        "score_meaning": LOG_ODDS_MEANING,
    }


@register_kind("qualiclip_release", "QualiCLIP's released qualiclip.pth", is_release)
@register_kind("qualiclip_clip_encoder", "a Stage-1 CLIP encoder .pkl from pretrain_qualiclip.py --encoder clip",
               has_format(CLIP_ENCODER_FORMAT))
def build_clip_image_encoder(ckpt, source):
    encoder, text_features = ClipImageEncoder.from_checkpoint(ckpt, source)
    # QualiCLIP's inference: the full-resolution image, all prompt pairs.
    return ZeroShotModel(encoder, text_features), {"resize": 0, "patch_size": None, "test_patch_num": 1,
                                                   "score_meaning": PROBABILITY_MEANING}


def load_scorer(path, device="cpu", kind=None):
    """The ``Scorer`` of a checkpoint file on ``device``; ``kind`` (a ``CHECKPOINT_KINDS`` name) refuses
    any other kind."""
    if kind is not None and kind not in CHECKPOINT_KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(CHECKPOINT_KINDS)}")
    ckpt = safe_load(path)
    found = next((k for k in CHECKPOINT_KINDS.values() if k.matches(ckpt)), None)
    wanted = [CHECKPOINT_KINDS[kind]] if kind is not None else list(CHECKPOINT_KINDS.values())
    if found is None or found not in wanted:
        expected = " or ".join(k.description for k in wanted)
        if found is not None:
            raise UserError(f"'{path}' is {found.description}, not {expected}; pass that, or load this file "
                            f"as {found.name!r}")
        if isinstance(ckpt, dict):
            content = f"format {ckpt['format']!r}" if "format" in ckpt else "no 'format' key"
        else:
            content = f"a {type(ckpt).__name__}"
        raise UserError(f"'{path}' is not {expected} ({content}); pass one of those")
    model, settings = found.build(ckpt, path)
    return Scorer(model, kind=found.name, **settings).to(device)


# ----------------------------------------------------------------------------- command-line helpers

def add_scoring_arguments(parser):
    """The flags ``predict.py`` and ``cross_dataset_test.py`` share."""
    parser.add_argument("--test_patch_num", type=int, default=None, help="crops per image (default: the checkpoint's)")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="crops per forward pass (CLIP encoders: whole images of one size holding at most "
                             "that many 224x224 crops' pixels)")
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))


def check_scoring_arguments(args):
    if args.batch_size < 1 or (args.test_patch_num is not None and args.test_patch_num < 1):
        raise UserError("--batch_size and --test_patch_num must be at least 1")


def check_new_output(path, flag="--output", advice="choose a new path"):
    """Refuse an existing ``path``, or one that cannot be created, before any work."""
    if os.path.exists(path):
        raise UserError(f"{flag} '{path}' already exists; {advice}")
    check_writable_path(path, flag)
