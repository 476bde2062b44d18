"""Stage-1 quality encoder: Swin backbone + projection head into the CLIP text space.

The encoder maps an image to a vector comparable with the frozen CLIP prompt anchors
(``models/clip_text.py``).  ``score`` turns that comparison into CLIP's probability of the
positive prompt, in [0, 1]; ``zero_shot_quality`` is what Stage-1 validation, cross-dataset tests
and ``predict.py`` correlate with MOS: the log-odds of that probability.  The projection head is
free to move the features far from both anchors, and once the log-odds pass about 17 the
probability is exactly 1.0 in float32 for every image (measured: 32-81 on the demo's crops after
15 epochs), so images tie and their ranking is lost; the log-odds order the images as the
probability does (for one prompt pair) without the ties.  ``checkpoint_dict`` /
``from_checkpoint`` define the Stage-1 ``.pkl`` (docs/formats.md): a plain dict of tensors and
strings that loads with ``torch.load(weights_only=True)`` and whose ``encoder`` entry is a timm
Swin state dict with timm's own key names, so Stage 2 (or plain timm) can load it directly.
"""
import torch
import torch.nn.functional as F
from torch import nn

from iqa.runtime import UserError, require_format
from models.swin_backbone import SwinBackbone, load_swin_weights

ENCODER_FORMAT = "qualiclip-swin-encoder/1"
# CLIP's logit scale: turns cosine similarities into a sharp two-way softmax.
CLIP_LOGIT_SCALE = 100.0


def prompt_pair_logits(image_features, text_features):
    """100 * cosine to every prompt (float32): ``(..., P, 2)`` for ``(P, 2, D)`` anchors (P antonym pairs,
    positive first), ``(..., 1, 2)`` for ``(2, D)``."""
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.to(image_features), dim=-1).reshape(-1, 2, image_features.shape[-1])
    return CLIP_LOGIT_SCALE * torch.einsum("...d,pkd->...pk", image_features, text_features)


def zero_shot_logits(image_features, text_features):
    """100 * [cos_pos, cos_neg] (float32, shape (..., 2)): CLIP's logits against the two anchors; with
    (P, 2, D) anchors their mean over the pairs (so ``[..., 0] - [..., 1]`` is the mean log-odds)."""
    return prompt_pair_logits(image_features, text_features).mean(dim=-2)


def zero_shot_log_odds(image_features, text_features):
    """100 * (cos_pos - cos_neg) (float32, shape (...)): the log-odds of the positive prompt, i.e.
    ``logit(zero_shot_score)`` for (2, D) anchors; with (P, 2, D) anchors the mean over the pairs."""
    logits = zero_shot_logits(image_features, text_features)
    return logits[..., 0] - logits[..., 1]


def zero_shot_score(image_features, text_features):
    """softmax(100 * [cos_pos, cos_neg])[..., 0]: probability of the positive prompt, in [0, 1]; with
    (P, 2, D) anchors the softmax is taken inside each pair and the probabilities averaged (QualiCLIP's
    inference)."""
    return prompt_pair_logits(image_features, text_features).softmax(dim=-1)[..., 0].mean(dim=-1)


def stage1_checkpoint(own, text_features, prompts, args_dict, train_images=()):
    """A Stage-1 ``.pkl`` dict: plain containers of CPU tensors, strings and numbers.

    ``own``: the encoder's own entries (modules become CPU state dicts); every encoder adds its prompt
    features, prompts, flags and ``train_images``, the names of the images trained on (relative to the
    data root), so that Stage 2 can refuse to validate or test on any of them.
    """
    entries = {key: ({k: v.detach().cpu() for k, v in value.state_dict().items()}
                     if isinstance(value, nn.Module) else value) for key, value in own.items()}
    return {**entries, "text_features": text_features.detach().float().cpu(),
            "prompts": [list(pair) for pair in prompts], "args": dict(args_dict), "train_images": list(train_images)}


class QualityEncoder(nn.Module):
    """Swin -> global average pool of the last stage -> MLP projection to ``text_dim``."""

    def __init__(self, model_size="base", text_dim=1024, imagenet_pretrained=True, backbone_weights=None,
                 proj_hidden=None, drop_path_rate=0.0, img_size=224):
        super().__init__()
        self.model_size = model_size
        self.backbone = SwinBackbone(model_size, imagenet_pretrained, backbone_weights, drop_path_rate, img_size)
        features = self.backbone.num_features
        proj_hidden = proj_hidden or features
        self.projection = nn.Sequential(
            nn.Linear(features, proj_hidden),
            nn.GELU(),
            nn.Linear(proj_hidden, text_dim),
        )

    def forward(self, x):
        last_stage = self.backbone(x)[-1]
        return self.projection(last_stage.mean(dim=(2, 3)))

    def score(self, x, text_features):
        """Zero-shot quality in [0, 1] against the (2, D) prompt anchors (row 0 positive) or (P, 2, D) pairs."""
        return zero_shot_score(self(x), text_features)

    def zero_shot_quality(self, x, text_features):
        """The score evaluation correlates with MOS: the log-odds (``zero_shot_log_odds``), which do not
        saturate to ties as the probability does (see the module docstring)."""
        return zero_shot_log_odds(self(x), text_features)

    def checkpoint_dict(self, text_features, prompts, args_dict, train_images=()):
        """The Stage-1 ``.pkl`` content (see ``stage1_checkpoint``): the timm Swin and the projection head."""
        return stage1_checkpoint({"format": ENCODER_FORMAT, "model_size": self.model_size,
                                  "encoder": self.backbone.swin, "projection": self.projection},
                                 text_features, prompts, args_dict, train_images)

    @classmethod
    def from_checkpoint(cls, ckpt, source):
        """Rebuild the encoder of a Stage-1 checkpoint dict -> ``(model, text_features)``."""
        require_format(ckpt, ENCODER_FORMAT, source, "a Stage-1 encoder checkpoint",
                       "pass a .pkl written by pretrain_qualiclip.py")
        projection = ckpt["projection"]
        text_features = ckpt["text_features"].float()
        model = cls(ckpt["model_size"], text_dim=text_features.shape[-1], imagenet_pretrained=False,
                    proj_hidden=projection["0.weight"].shape[0], img_size=ckpt.get("args", {}).get("crop_size", 224))
        load_swin_weights(model.backbone.swin, ckpt["encoder"], source, ckpt["model_size"])
        try:
            model.projection.load_state_dict(projection)
        except RuntimeError as err:
            raise UserError(f"'{source}' has a projection head that does not fit its own encoder "
                            f"({str(err).splitlines()[0][:160]}); the checkpoint is corrupt") from None
        return model, text_features
