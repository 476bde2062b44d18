"""Stage-1 CLIP image encoder (``pretrain_qualiclip.py --encoder clip``) and QualiCLIP's released weights.

QualiCLIP (Agnolucci et al., 2024) fine-tunes the image tower of CLIP RN50 and keeps the text
tower frozen.  ``ClipImageEncoder`` wraps an open_clip ResNet image tower with the interface of
``models.quality_encoder.QualityEncoder``: ``forward`` (features in the CLIP embedding space),
``score(x, text_features)``, ``checkpoint_dict`` / ``from_checkpoint``, so the Stage-1 epoch, its
zero-shot evaluation and the level ranking use it unchanged.

As QualiCLIP's inference (``miccunifi/QualiCLIP``, ``hubconf.py`` and ``clip/model.py``):

* the attention pool runs **without** its positional embedding, so any input size works (the
  whole image at full resolution);
* features and the prompt features are L2-normalised, logits are 100 · cosine, a softmax is taken
  inside each (positive, negative) pair and the score is the mean over the pairs of the positive
  probability (``models.quality_encoder.zero_shot_score`` with (P, 2, D) prompt features).

Input: like every model here, ImageNet-normalised images (``iqa.patches.to_model_input``); the
first step maps them to CLIP's own mean/std (a per-channel affine), so the data path is shared
with the Swin encoder.

Two files load here: our Stage-1 ``.pkl`` (``ENCODER_FORMAT``) and QualiCLIP's release
``qualiclip.pth``: the state dict of OpenAI CLIP RN50 with every key prefixed ``clip_model.``,
plus ``prompts_features``, the (14, 1024) unit features of the 7 prompt pairs (positive first).
"""
import torch
import torch.nn.functional as F
from torch import nn

from iqa.patches import IMAGENET_MEAN, IMAGENET_STD
from iqa.runtime import UserError, checkpoint_format, safe_load
from models.quality_encoder import stage1_checkpoint, zero_shot_score

# open_clip (and models.clip_text, which imports it) is imported where a tower is built: it takes
# seconds to import, and iqa.scoring imports this module for every checkpoint kind.

ENCODER_FORMAT = "qualiclip-clip-encoder/1"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RELEASE_PREFIX = "clip_model."
RELEASE_VISUAL_PREFIX = RELEASE_PREFIX + "visual."


def is_release(ckpt):
    """Is ``ckpt`` QualiCLIP's released state dict (``clip_model.``-prefixed CLIP + ``prompts_features``)?"""
    return (isinstance(ckpt, dict) and isinstance(ckpt.get("prompts_features"), torch.Tensor)
            and any(isinstance(k, str) and k.startswith(RELEASE_VISUAL_PREFIX) for k in ckpt))


def resnet_image_tower(clip_model):
    """A randomly initialised open_clip ResNet image tower of ``clip_model`` (e.g. RN50)."""
    import open_clip
    from open_clip.model import CLIPVisionCfg
    from open_clip.modified_resnet import ModifiedResNet

    if clip_model not in open_clip.list_models():
        raise UserError(f"--clip_model '{clip_model}' is not an open_clip model (e.g. RN50, RN101, RN50x4)")
    config = open_clip.get_model_config(clip_model)
    vision = CLIPVisionCfg(**config["vision_cfg"])
    if not isinstance(vision.layers, (list, tuple)):
        raise UserError(f"--clip_model '{clip_model}' has a ViT image tower; --encoder clip needs a ResNet one "
                        f"(RN50, RN101, RN50x4, ...), whose attention pool QualiCLIP runs without positional embedding")
    return ModifiedResNet(vision.layers, config["embed_dim"], vision.width * 32 // vision.head_width,
                          vision.image_size, vision.width)


def attention_pool(pool, feature_map):
    """CLIP's attention pool without its positional embedding: the mean token attends to itself and
    to every position of ``feature_map`` (N, C, H, W) -> (N, output_dim)."""
    tokens = feature_map.flatten(2).permute(2, 0, 1)                  # (HW, N, C)
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens])    # (HW+1, N, C), mean token first
    pooled, _ = F.multi_head_attention_forward(
        query=tokens[:1], key=tokens, value=tokens, embed_dim_to_check=tokens.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=pool.training, need_weights=False)
    return pooled[0]


class ClipImageEncoder(nn.Module):
    """An open_clip ResNet image tower scored as QualiCLIP scores; input ImageNet-normalised."""

    def __init__(self, clip_model="RN50", visual=None):
        super().__init__()
        self.clip_model = clip_model
        self.visual = visual if visual is not None else resnet_image_tower(clip_model)
        if not hasattr(self.visual, "attnpool"):  # open_clip's ModifiedResNet; a ViT tower has none
            raise UserError(f"--clip_model '{clip_model}' has a {type(self.visual).__name__} image tower; "
                            f"--encoder clip needs a ResNet one (RN50, RN101, RN50x4, ...)")
        # Kept (the release format holds it) but never used: frozen, so that every trained parameter gets a
        # gradient (DistributedDataParallel requires it) and the optimizer leaves it as loaded.
        self.visual.attnpool.positional_embedding.requires_grad_(False)
        # ImageNet-normalised -> CLIP-normalised: x * scale + shift, per channel.
        imagenet_mean, imagenet_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        self.register_buffer("input_scale", (imagenet_std / clip_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((imagenet_mean - clip_mean) / clip_std).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def output_dim(self):
        return self.visual.output_dim

    @classmethod
    def create(cls, clip_model="RN50", clip_weights=None, pretrained=True, init_from=None):
        """The encoder to train: the image tower of ``init_from`` (a QualiCLIP release or a Stage-1 CLIP
        .pkl), else of ``clip_weights`` / the cached OpenAI weights, else (``pretrained=False``) random."""
        if init_from is not None:
            return cls.from_file(init_from, "--init_from")[0]
        if not pretrained:
            return cls(clip_model)
        from models.clip_text import load_clip_model

        return cls(clip_model, load_clip_model(clip_model, clip_weights).visual.float())

    def forward(self, x):
        v = self.visual
        x = (x * self.input_scale + self.input_shift).to(v.conv1.weight.dtype)
        feature_map = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        return attention_pool(v.attnpool, feature_map)

    def score(self, x, text_features):
        """QualiCLIP's score in [0, 1] against (P, 2, D) prompt features (or (2, D) anchors)."""
        return zero_shot_score(self(x), text_features)

    def zero_shot_quality(self, x, text_features):
        """The score evaluation correlates with MOS: QualiCLIP's own (``score``), so that numbers stay
        comparable with its published ones."""
        return self.score(x, text_features)

    def checkpoint_dict(self, text_features, prompts, args_dict, train_images=()):
        """The Stage-1 ``.pkl`` content (``models.quality_encoder.stage1_checkpoint``); ``visual`` is the
        open_clip image tower's state dict."""
        return stage1_checkpoint({"format": ENCODER_FORMAT, "clip_model": self.clip_model, "visual": self.visual},
                                 text_features, prompts, args_dict, train_images)

    @classmethod
    def from_checkpoint(cls, ckpt, source):
        """A Stage-1 CLIP ``.pkl`` or QualiCLIP's release dict -> ``(model, (P, 2, D) prompt features)``."""
        if is_release(ckpt):
            visual = {k[len(RELEASE_VISUAL_PREFIX):]: v for k, v in ckpt.items() if k.startswith(RELEASE_VISUAL_PREFIX)}
            prompts = ckpt["prompts_features"].float()
            if prompts.dim() != 2 or prompts.shape[0] % 2:
                raise UserError(f"'{source}' has prompts_features of shape {tuple(prompts.shape)}; QualiCLIP's "
                                f"are (14, D), 7 (positive, negative) pairs")
            clip_model, text_features = "RN50", prompts.reshape(-1, 2, prompts.shape[-1])
        elif isinstance(ckpt, dict) and ckpt.get("format") == ENCODER_FORMAT:
            visual, clip_model, text_features = ckpt["visual"], ckpt["clip_model"], ckpt["text_features"].float()
        else:
            raise UserError(f"'{source}' is neither a Stage-1 CLIP encoder .pkl (format {ENCODER_FORMAT!r}) nor "
                            f"QualiCLIP's qualiclip.pth (found {checkpoint_format(ckpt)!r})")
        model = cls(clip_model)
        try:
            model.visual.load_state_dict({k: v.float() for k, v in visual.items()})
        except RuntimeError as err:
            raise UserError(f"'{source}' does not hold a {clip_model} image tower "
                            f"({str(err).strip().splitlines()[0][:160]})") from None
        if text_features.shape[-1] != model.output_dim:
            raise UserError(f"'{source}': prompt features of dimension {text_features.shape[-1]} do not fit the "
                            f"{model.output_dim}-d image features of {clip_model}")
        return model, text_features

    @classmethod
    def from_file(cls, path, flag):
        """``from_checkpoint`` of a file (``flag`` names it in errors)."""
        return cls.from_checkpoint(safe_load(path, flag), path)
