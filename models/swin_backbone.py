"""timm Swin Transformer backbone giving the four stages as NCHW feature maps.

Sizes: ``nano`` (random init, tests/demo only), ``nano48`` (``nano`` 1.5× as wide, random init: on
the demo its Stage 1 ranks JPEG better than ``nano``'s, docs/stage1_notes.md), ``tiny``, ``small``,
``base``.  The backbone's
``swin`` attribute is a plain timm ``SwinTransformer`` with ``num_classes=0``, so its state
dict has timm's own key names and loads into ``timm.create_model(name, num_classes=0)``.
"""
import os

import timm
import torch
from torch import nn

from iqa.runtime import UserError, safe_load

SWIN_CONFIGS = {
    "nano": dict(name="swin_tiny_patch4_window7_224", embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    "nano48": dict(name="swin_tiny_patch4_window7_224", embed_dim=48, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    "tiny": dict(name="swin_tiny_patch4_window7_224"),
    "small": dict(name="swin_small_patch4_window7_224"),
    "base": dict(name="swin_base_patch4_window7_224"),
}
MODEL_SIZES = tuple(SWIN_CONFIGS)
RANDOM_INIT_SIZES = ("nano", "nano48")  # no ImageNet weights exist for these

OFFLINE_ADVICE = (
    "pass --backbone_weights FILE (a timm Swin-{size} state dict, .pth/.safetensors) or "
    "--no_imagenet_pretrained for random init; online, timm downloads '{name}' into the HF cache"
)


NATIVE_IMG_SIZE = 224


def create_swin(model_size, drop_path_rate=0.0, img_size=NATIVE_IMG_SIZE):
    """A random-init timm Swin of ``model_size`` without classifier head, for ``img_size`` inputs.

    Other input sizes (a multiple of 32) keep the 7×7 windows (``always_partition``), so the
    parameters have the same shapes at every size and checkpoints move freely between them.
    """
    if model_size not in SWIN_CONFIGS:
        raise UserError(f"--model_size '{model_size}' is not one of {', '.join(MODEL_SIZES)}")
    if img_size % 32:
        raise UserError(f"input size {img_size} must be a multiple of 32 for Swin (e.g. 224)")
    cfg = dict(SWIN_CONFIGS[model_size])
    name = cfg.pop("name")
    if img_size != NATIVE_IMG_SIZE:
        cfg.update(img_size=img_size, always_partition=True)
    return timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **cfg)


def read_state_dict(path):
    """Load a state dict from ``.safetensors`` or a ``torch.save`` file (weights_only)."""
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise UserError(f"--backbone_weights '{path}' does not exist; check the path")
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"cannot read --backbone_weights '{path}': {err}") from None
    obj = safe_load(path, "backbone weights")
    for key in ("encoder", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def load_swin_weights(swin, state_dict, source, model_size):
    """Strictly load backbone weights (a classifier head, if any, is dropped).

    Returns the number of tensors loaded.  Missing keys or shape mismatches are user errors:
    a Swin of another size must never be half-loaded silently.
    """
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"'{source}' is not a state dict of tensors; expected a timm Swin-{model_size} checkpoint")
    state_dict = {k.removeprefix("module.").removeprefix("swin."): v for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    own = swin.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if wrong_shape or missing:
        detail = (f"{len(wrong_shape)} tensors of another shape (e.g. {wrong_shape[0]}: "
                  f"{tuple(state_dict[wrong_shape[0]].shape)} vs {tuple(own[wrong_shape[0]].shape)})"
                  if wrong_shape else f"{len(missing)} tensors missing (e.g. {missing[0]})")
        raise UserError(
            f"'{source}' does not fit a Swin-{model_size}: {detail}; was it saved for another --model_size?"
        )
    # Buffers such as relative_position_index are rebuilt by timm; only those may be unexpected.
    if any(not k.endswith(("relative_position_index", "attn_mask")) for k in unexpected):
        bad = next(k for k in unexpected if not k.endswith(("relative_position_index", "attn_mask")))
        raise UserError(f"'{source}' has keys a Swin-{model_size} does not (e.g. {bad}); is it a Swin checkpoint?")
    swin.load_state_dict({k: state_dict[k] for k in own})
    return len(own)


class SwinBackbone(nn.Module):
    """Swin encoder returning ``[stage1, stage2, stage3, stage4]`` NCHW features.

    Channels are (C, 2C, 4C, 8C) at strides 4..32; the last stage passes through the final
    LayerNorm, as in timm's ``forward_features``.
    """

    def __init__(self, model_size="base", imagenet_pretrained=True, weights_file=None, drop_path_rate=0.0,
                 img_size=NATIVE_IMG_SIZE):
        super().__init__()
        self.model_size = model_size
        self.swin = create_swin(model_size, drop_path_rate, img_size)
        if weights_file:
            load_swin_weights(self.swin, read_state_dict(weights_file), weights_file, model_size)
        elif imagenet_pretrained:
            self._load_imagenet()
        embed = self.swin.embed_dim
        self.channels = [embed, embed * 2, embed * 4, embed * 8]

    def _load_imagenet(self):
        name = SWIN_CONFIGS[self.model_size]["name"]
        if self.model_size in RANDOM_INIT_SIZES:
            raise UserError(f"Swin-{self.model_size} has no ImageNet weights (random init only); "
                            "add --no_imagenet_pretrained")
        try:
            pretrained = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as err:
            raise UserError(
                f"could not load ImageNet weights for '{name}' ({type(err).__name__}); "
                + OFFLINE_ADVICE.format(size=self.model_size, name=name)
            ) from None
        self.swin.load_state_dict(pretrained.state_dict())

    @property
    def num_features(self):
        return self.channels[-1]

    def forward(self, x):
        return self.swin.forward_intermediates(x, norm=True, intermediates_only=True)
