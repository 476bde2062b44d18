"""Frozen CLIP text anchors for Stage 1 (docs/method.md, "Text anchors"), through open_clip.

``compute_text_features`` encodes a prompt set once and returns a ``(2, D)`` tensor: row 0 the
"good" anchor, row 1 the "bad" one.  With several antonym pairs, each anchor is the normalised
mean of its normalised prompt features (the Swin encoder's anchors); ``per_pair=True`` keeps every
pair instead, ``(P, 2, D)`` (the CLIP image encoder's, as QualiCLIP scores against all 14
prompts).  Only the text tower is kept.  ``load_clip_model`` is the one loader of CLIP weights,
also used for the image tower (``models/clip_image_encoder.py``).

Where the CLIP weights come from:

* ``clip_weights`` an OpenAI TorchScript archive (how OpenAI distributes ``RN50.pt``):
  ``open_clip.load_openai_model`` rebuilds the model from it, QuickGELU included.
* ``clip_weights`` a plain state dict: loaded strictly into ``open_clip.create_model(clip_model)``;
  OpenAI weights saved that way need the ``-quickgelu`` name (e.g. ``RN50-quickgelu``).
* no ``clip_weights``: open_clip's ``openai`` tag from the local Hugging Face cache (downloaded
  when online).  Offline and not cached, this stops at once with the files to provide; it never
  falls back to a random text tower.  open_clip's own ERROR log line for that failure is dropped:
  the ``UserError`` says what happened and what to pass, and a caller may go on (the demo's
  random anchors), so the run must not print an ERROR line.
"""
import contextlib
import logging
import os
import zipfile

import torch
import torch.nn.functional as F

from iqa.runtime import UserError, safe_load

GOOD_BAD = [("Good photo.", "Bad photo.")]
PROMPT_SETS = {
    "good_bad": GOOD_BAD,
    # QualiCLIP's antonym pairs (Agnolucci et al., 2024).
    "qualiclip": [
        ("Good photo.", "Bad photo."),
        ("Sharp image.", "Blurry image."),
        ("Sharp edges.", "Blurry edges."),
        ("High-resolution image.", "Low-resolution image."),
        ("Noise-free image.", "Noisy image."),
        ("High-quality image.", "Low-quality image."),
        ("Good picture.", "Bad picture."),
    ],
    "seed": GOOD_BAD,  # good_bad's former name, still accepted (older commands, runs resumed from their args)
}

WEIGHTS_ADVICE = (
    "pass --clip_weights FILE (e.g. OpenAI's RN50.pt) or --text_features FILE (a (2, D) tensor or an "
    "earlier Stage-1 .pkl); online, open_clip downloads the weights into the Hugging Face cache ({cache})"
)


@torch.no_grad()
def encode_prompt_features(clip_model, tokenizer, pairs, device):
    """(positive, negative) prompt pairs -> (P, 2, D) unit prompt features, [:, 0] positive."""
    tokens = tokenizer([prompt for pair in pairs for prompt in pair]).to(device)
    return F.normalize(clip_model.encode_text(tokens).float(), dim=-1).view(len(pairs), 2, -1)


def encode_prompt_pairs(clip_model, tokenizer, pairs, device):
    """(positive, negative) prompt pairs -> (2, D) unit anchors, row 0 positive."""
    return F.normalize(encode_prompt_features(clip_model, tokenizer, pairs, device).mean(dim=0), dim=-1)


def _is_torchscript_archive(path):
    # torch.save zips hold data.pkl; TorchScript archives also hold constants.pkl.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(os.path.basename(name) == "constants.pkl" for name in archive.namelist())


def _create_model(clip_model, **kwargs):
    import open_clip  # imported when used: --text_features runs need no open_clip

    if clip_model not in open_clip.list_models():
        raise UserError(f"--clip_model '{clip_model}' is not an open_clip model (e.g. RN50, RN50-quickgelu, ViT-B-32)")
    return open_clip.create_model(clip_model, **kwargs)


def _load_from_file(clip_model, clip_weights):
    import open_clip

    if not os.path.isfile(clip_weights):
        raise UserError(f"--clip_weights '{clip_weights}' does not exist; check the path")
    if _is_torchscript_archive(clip_weights):
        try:
            return open_clip.load_openai_model(clip_weights, device="cpu")
        except (RuntimeError, KeyError) as err:
            raise UserError(f"--clip_weights '{clip_weights}' is a TorchScript archive but not an OpenAI CLIP "
                            f"model ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    state = safe_load(clip_weights, "--clip_weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # open_clip training checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--clip_weights '{clip_weights}' holds a {type(state).__name__}, not a CLIP state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = _create_model(clip_model, pretrained=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"--clip_weights '{clip_weights}' does not fit --clip_model {clip_model} "
                        f"({str(err).strip().splitlines()[0][:160]}); pass the matching --clip_model") from None
    return model


def _load_openai_pretrained(clip_model):
    import open_clip

    tag = open_clip.get_pretrained_cfg(clip_model, "openai")
    cache = _hf_cache_dir()
    if not tag:
        raise UserError(f"open_clip has no OpenAI weights for --clip_model '{clip_model}'; "
                        + WEIGHTS_ADVICE.format(cache=cache))
    try:
        with _open_clip_errors_dropped():
            # OpenAI trained with QuickGELU; open_clip's plain names would silently build nn.GELU.
            return _create_model(clip_model, pretrained="openai", force_quick_gelu=tag.get("quick_gelu", False))
    except UserError:
        raise
    except Exception as err:  # open_clip wraps hub/url failures in various exception types
        raise UserError(f"could not load OpenAI weights for CLIP '{clip_model}' (offline or not cached: "
                        f"{type(err).__name__}); " + WEIGHTS_ADVICE.format(cache=cache)) from None


@contextlib.contextmanager
def _open_clip_errors_dropped():
    """Drop ERROR records that open_clip logs on the root logger (it logs, then raises) while active."""
    import open_clip

    package = os.path.dirname(open_clip.__file__) + os.sep

    def keep(record):
        return record.levelno < logging.ERROR or not record.pathname.startswith(package)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _hf_cache_dir():
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def load_clip_model(clip_model="RN50", clip_weights=None):
    """The whole open_clip model (CPU, float32) from ``clip_weights`` or the cached OpenAI weights."""
    return _load_from_file(clip_model, clip_weights) if clip_weights else _load_openai_pretrained(clip_model)


def compute_text_features(prompt_set="good_bad", clip_model="RN50", clip_weights=None, device="cpu", per_pair=False):
    """Encode a prompt set with a frozen CLIP text tower -> (float32 CPU tensor, prompt pairs): the
    (2, D) anchors, or with ``per_pair`` the (P, 2, D) features of every pair."""
    if prompt_set not in PROMPT_SETS:
        raise UserError(f"prompt set '{prompt_set}' is not one of {', '.join(PROMPT_SETS)}")
    pairs = PROMPT_SETS[prompt_set]
    model = load_clip_model(clip_model, clip_weights)
    del model.visual  # only the text tower is used; free the image tower before moving to the device
    model = model.to(device).eval().requires_grad_(False)
    import open_clip

    tokenizer = open_clip.get_tokenizer(clip_model, context_length=model.context_length)
    encode = encode_prompt_features if per_pair else encode_prompt_pairs
    return encode(model, tokenizer, pairs, device).cpu(), [tuple(pair) for pair in pairs]


def load_text_features(path):
    """Anchors from ``torch.save`` of a tensor, of a dict with 'text_features' (a Stage-1 .pkl) or of
    QualiCLIP's release (its (14, D) 'prompts_features', read as 7 pairs) -> (2, D) or (P, 2, D)."""
    obj = safe_load(path, "--text_features")
    if isinstance(obj, dict):
        if "text_features" in obj:
            obj = obj["text_features"]
        elif isinstance(obj.get("prompts_features"), torch.Tensor) and obj["prompts_features"].shape[0] % 2 == 0:
            obj = obj["prompts_features"].reshape(-1, 2, obj["prompts_features"].shape[-1])
        else:
            raise UserError(f"--text_features '{path}' is a dict without a 'text_features' key; "
                            "pass a (2, D) tensor file, a Stage-1 .pkl or QualiCLIP's qualiclip.pth")
    if not (isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.dim() in (2, 3)
            and obj.shape[-2] == 2 and obj.shape[0] > 0):
        found = f"shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else f"a {type(obj).__name__}"
        raise UserError(f"--text_features '{path}' holds {found}; expected a (2, D) float tensor "
                        "(row 0 positive prompt, row 1 negative) or (P, 2, D) for P prompt pairs")
    return obj.float()
