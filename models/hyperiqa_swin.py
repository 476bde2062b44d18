"""Swin-HyperIQA: HyperIQA (Su et al., CVPR 2020) with a timm Swin Transformer backbone.

Three parts on top of the four Swin stages (C, 2C, 4C, 8C channels at strides 4..32):

* LDA branches (local distortion aware): each stage -> 1x1 conv -> pool to a small grid ->
  linear, giving 16 + 16 + 16 + 176 = 224 dims, the input vector of the target network.
* Hyper input: stage 4, or (multi-scale) all four stages pooled to 7x7 and concatenated,
  optionally re-weighted per image by an attention over stages; then 1x1 convs to 112 channels.
* Hyper network: from the 7x7x112 hyper features, 3x3 convs emit the weights and linear layers
  on the pooled features emit the biases of a per-image target MLP 224->112->56->28->14->1
  (sigmoid after the first four layers), as in HyperIQA's reference code.  The target MLPs of
  the whole batch run as batched matmuls, one per layer.

``dropout_rate`` drops elements of the target input vector and of the 7x7 hyper features (the
two inputs of the hyper/target networks); the backbone uses ``drop_path_rate`` instead.
"""
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from iqa.runtime import UserError, require_format, safe_load
from models.quality_encoder import ENCODER_FORMAT
from models.swin_backbone import SwinBackbone, load_swin_weights

TARGET_SIZES = (224, 112, 56, 28, 14, 1)  # target MLP widths, input first
HYPER_CHANNELS = 112
HYPER_GRID = 7
# Per stage: 1x1-conv width (None = pool the stage directly), pooled grid, output dims.
# With a 224 input the grids equal HyperIQA's AvgPool2d(7, stride=7) on 56/28/14/7 maps.
LDA_CONFIG = ((16, 8, 16), (32, 4, 16), (64, 2, 16), (None, 1, 176))
CHECKPOINT_FORMAT = "swin-hyperiqa/1"  # the ``format`` of a train_swin.py best.pt / last.pt


class LDABranch(nn.Module):
    """One local-distortion-aware branch: stage map -> fixed-size vector."""

    def __init__(self, in_channels, reduced_channels, grid, out_dim):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, reduced_channels, 1, bias=False) if reduced_channels else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.fc = nn.Linear((reduced_channels or in_channels) * grid * grid, out_dim)

    def forward(self, x):
        return self.fc(self.pool(self.reduce(x)).flatten(1))


class StageAttention(nn.Module):
    """Per-image softmax weights over the stages, from the pooled last stage.

    The last layer starts at zero, so every stage starts with weight exactly 1/num_stages.
    """

    def __init__(self, in_channels, num_stages=4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, in_channels // 4), nn.GELU(),
                                 nn.Linear(in_channels // 4, num_stages))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, last_stage):
        return self.mlp(last_stage.mean(dim=(2, 3))).softmax(dim=-1)


class HyperNetwork(nn.Module):
    """7x7 hyper features -> [(weight (N, out, in), bias (N, out))] for every target layer."""

    def __init__(self, channels=HYPER_CHANNELS, grid=HYPER_GRID, sizes=TARGET_SIZES):
        super().__init__()
        self.grid = grid
        self.sizes = sizes
        # As in HyperIQA, the weight maps of all but the last layer come from a conv whose
        # (out_channels x 7 x 7) output is reshaped to (fan_out, fan_in).
        self.weight_convs = nn.ModuleList()
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
            if fan_in * fan_out % grid**2:
                raise ValueError(f"target layer {fan_in}->{fan_out} is not divisible into a {grid}x{grid} map")
            self.weight_convs.append(nn.Conv2d(channels, fan_in * fan_out // grid**2, 3, padding=1))
        self.last_weight_fc = nn.Linear(channels, sizes[-2] * sizes[-1])
        self.bias_fcs = nn.ModuleList(nn.Linear(channels, fan_out) for fan_out in sizes[1:])

    def forward(self, hyper_features):
        n = hyper_features.shape[0]
        pooled = hyper_features.mean(dim=(2, 3))
        weights = [conv(hyper_features).reshape(n, fan_out, fan_in)
                   for conv, fan_in, fan_out in zip(self.weight_convs, self.sizes[:-2], self.sizes[1:-1])]
        weights.append(self.last_weight_fc(pooled).view(n, self.sizes[-1], self.sizes[-2]))
        return [(w, fc(pooled)) for w, fc in zip(weights, self.bias_fcs)]


def apply_target_net(target_in, layers):
    """Run every image's own target MLP: (N, 224) x per-image layers -> (N,) float32.

    One batched matmul per layer.  Computed in float32 outside autocast: the MLP is tiny and
    its sigmoid chain is where bf16 rounding would show in the scores.
    """
    with torch.autocast(device_type=target_in.device.type, enabled=False):
        x = target_in.float().unsqueeze(-1)
        for i, (weight, bias) in enumerate(layers):
            x = torch.baddbmm(bias.float().unsqueeze(-1), weight.float(), x)
            if i < len(layers) - 1:
                x = torch.sigmoid(x)
    return x.view(-1)


class HyperIQASwin(nn.Module):
    def __init__(self, model_size="base", use_multiscale=True, attention_fusion=False, imagenet_pretrained=True,
                 backbone_weights=None, drop_path_rate=0.0, dropout_rate=0.0):
        super().__init__()
        if attention_fusion and not use_multiscale:
            raise UserError("--attention_fusion weights the four stages of the multi-scale input; "
                            "drop --no_multiscale or drop --attention_fusion")
        self.model_size = model_size
        self.use_multiscale = use_multiscale
        self.backbone = SwinBackbone(model_size, imagenet_pretrained, backbone_weights, drop_path_rate)
        channels = self.backbone.channels

        self.lda = nn.ModuleList(LDABranch(c, *cfg) for c, cfg in zip(channels, LDA_CONFIG))
        if use_multiscale:
            # Stages 1-3 are raw residual streams whose scale grows with depth (only stage 4
            # passes the final norm); normalising them lets no stage dominate the fusion.
            self.stage_norms = nn.ModuleList([LayerNorm2d(c) for c in channels[:-1]] + [nn.Identity()])
        self.stage_attention = StageAttention(channels[-1], len(channels)) if attention_fusion else None
        hyper_in = sum(channels) if use_multiscale else channels[-1]
        widths = [hyper_in, max(hyper_in // 2, HYPER_CHANNELS), max(hyper_in // 4, HYPER_CHANNELS), HYPER_CHANNELS]
        self.hyper_in_conv = nn.Sequential(*[
            layer for c_in, c_out in zip(widths[:-1], widths[1:])
            for layer in (nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True))
        ])
        self.dropout = nn.Dropout(dropout_rate)
        self.hyper_net = HyperNetwork()

    @classmethod
    def from_checkpoint(cls, ckpt, source):
        """The Swin-HyperIQA of a ``train_swin.py`` checkpoint dict, built from the args stored in it."""
        require_format(ckpt, CHECKPOINT_FORMAT, source, "a train_swin.py checkpoint",
                       "pass a best.pt or last.pt from a train_swin.py run")
        model = build_model(ckpt["args"], load_backbone=False)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise UserError(f"'{source}' does not fit the Swin-{ckpt['args']['model_size']} HyperIQA its own args "
                            f"describe ({str(err).splitlines()[0][:160]}); the checkpoint is corrupt") from None
        return model

    def fusion_weights(self, stages):
        """(N, 4) softmax weights over the stages (attention fusion only)."""
        return self.stage_attention(stages[-1])

    def stage_weights(self, x):
        """(N, 4) stage-attention weights the forward pass gives ImageNet-normalised crops ``x``
        (read-only, for analysis); a model without ``attention_fusion`` has none (ValueError)."""
        if self.stage_attention is None:
            raise ValueError("this model has no stage attention (it was built without attention_fusion)")
        return self.fusion_weights(self.backbone(x))

    def hyper_input(self, stages):
        """Stages -> (N, C_in, 7, 7) input of the 1x1 hyper convs."""
        if not self.use_multiscale:
            return F.adaptive_avg_pool2d(stages[-1], HYPER_GRID)
        pooled = [norm(F.adaptive_avg_pool2d(s, HYPER_GRID)) for norm, s in zip(self.stage_norms, stages)]
        if self.stage_attention is not None:
            # Scaled by the number of stages so that uniform weights leave the input unchanged.
            weights = self.fusion_weights(stages) * len(stages)
            pooled = [p * w.view(-1, 1, 1, 1) for p, w in zip(pooled, weights.unbind(dim=1))]
        return torch.cat(pooled, dim=1)

    def forward(self, x):
        stages = self.backbone(x)
        target_in = self.dropout(torch.cat([lda(s) for lda, s in zip(self.lda, stages)], dim=1))
        hyper_features = self.dropout(self.hyper_in_conv(self.hyper_input(stages)))
        return apply_target_net(target_in, self.hyper_net(hyper_features))

    # Lists, not generators: HyperIQA's reference code exhausted a parameter iterator.
    def encoder_parameters(self):
        return list(self.backbone.parameters())

    def head_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def load_encoder(self, state_dict, source):
        """Strictly load a timm Swin state dict into the backbone; returns the tensor count."""
        return load_swin_weights(self.backbone.swin, state_dict, source, self.model_size)

    def load_pretrained_encoder(self, path):
        """Load a Stage-1 ``.pkl`` or a bare timm Swin state dict; returns the tensor count."""
        ckpt = safe_load(path, "--pretrained_encoder")
        if isinstance(ckpt, dict) and ckpt.get("format") == ENCODER_FORMAT:
            if ckpt.get("model_size") != self.model_size:
                raise UserError(
                    f"--pretrained_encoder '{path}' was pretrained with Swin-{ckpt.get('model_size')} but "
                    f"--model_size is {self.model_size}; pass --model_size {ckpt.get('model_size')}"
                )
            return self.load_encoder(ckpt["encoder"], f"--pretrained_encoder {path}")
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return self.load_encoder(ckpt, f"--pretrained_encoder {path}")
        raise UserError(
            f"--pretrained_encoder '{path}' is not a Stage-1 checkpoint or Swin state dict; pass the .pkl "
            f"written by pretrain_qualiclip.py (format {ENCODER_FORMAT!r}) or a timm Swin state dict"
        )


def build_model(args, load_backbone=True):
    """Swin-HyperIQA from a train_swin args dict; ``load_backbone=False`` skips ImageNet/file weights
    (for a model whose weights come from a checkpoint next)."""
    return HyperIQASwin(
        args["model_size"],
        use_multiscale=args["use_multiscale"],
        attention_fusion=args["attention_fusion"],
        imagenet_pretrained=load_backbone and args["imagenet_pretrained"],
        backbone_weights=args["backbone_weights"] if load_backbone else None,
        drop_path_rate=args["drop_path_rate"],
        dropout_rate=args["dropout_rate"],
    )
