"""QualiCLIP-style ranking + consistency loss (docs/method.md, "Loss").

Inputs: ``image_features`` ``(B, 2, L, D)`` — B images, 2 overlapping crops, L degradation
levels ordered mildest → strongest — and ``text_features`` ``(2, D)`` (row 0 the positive
prompt, row 1 the negative prompt) or ``(P, 2, D)``, P antonym pairs, positive first. Both are
L2-normalised here. With ``c[b,a,l,k] = cos(image_features[b,a,l], text_features[k])``::

    L_pos  = mean over b, a, l<l'  of  max(0, m_r − (c[b,a,l,0]  − c[b,a,l',0]))
    L_neg  = mean over b, a, l<l'  of  max(0, m_r − (c[b,a,l',1] − c[b,a,l,1]))
    L_cons = mean over b, l, k     of  max(0, |c[b,0,l,k] − c[b,1,l,k]| − m_c)
    L      = λ_c·L_cons + λ_p·L_pos + λ_n·L_neg

``QualiCLIPLoss`` ranks all pairs l < l'; ``SimplifiedQualiCLIPLoss`` only adjacent pairs
(l' = l + 1). Both share one implementation that differs only in the pair set. With P prompt
pairs every term is computed per pair as above and averaged over the pairs (one tensor op, no
loop); P = 1 is exactly the ``(2, D)`` case. Cosines are
computed in float32 as elementwise products (no autocast, no TF32 matmul). With L = 1 there
are no pairs and the ranking terms are 0.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from iqa.runtime import UserError

LOSS_TYPES = ("simplified", "full")


def quality_cosines(image_features, text_features):
    """``c[..., k] = cos(image_features[...], text_features[k])`` in float32, shape ``(*, K)``; for
    ``(P, 2, D)`` text features ``c[..., p, k]``, shape ``(*, P, 2)``."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    for _ in range(txt.dim() - 1):
        img = img.unsqueeze(-2)
    return (img * txt).sum(-1)


class _RankingConsistencyLoss(nn.Module):
    """Shared implementation; subclasses only choose the level pairs (l, l') with l < l'."""

    def __init__(self, margin_rank=0.05, margin_cons=0.0, lambda_cons=1.0, lambda_pos=1.0, lambda_neg=1.0):
        super().__init__()
        self.margin_rank = float(margin_rank)
        self.margin_cons = float(margin_cons)
        self.lambda_cons = float(lambda_cons)
        self.lambda_pos = float(lambda_pos)
        self.lambda_neg = float(lambda_neg)

    def extra_repr(self):
        return (f"margin_rank={self.margin_rank}, margin_cons={self.margin_cons}, "
                f"lambda_cons={self.lambda_cons}, lambda_pos={self.lambda_pos}, lambda_neg={self.lambda_neg}")

    def level_pairs(self, num_levels, device):
        """Two index tensors ``(first, second)`` of the ranked pairs, first (milder) < second."""
        raise NotImplementedError

    @staticmethod
    def _check(image_features, text_features):
        if not isinstance(image_features, torch.Tensor) or not isinstance(text_features, torch.Tensor):
            raise TypeError("image_features and text_features must be tensors")
        if image_features.ndim != 4 or image_features.shape[1] != 2:
            raise ValueError(
                f"image_features must have shape (B, 2, L, D) (images, 2 crops, levels, features), "
                f"got {tuple(image_features.shape)}"
            )
        if text_features.ndim not in (2, 3) or text_features.shape[-2] != 2 or text_features.shape[0] == 0:
            raise ValueError(
                f"text_features must have shape (2, D) (row 0 positive, row 1 negative prompt) or (P, 2, D) "
                f"(P antonym pairs), got {tuple(text_features.shape)}"
            )
        if image_features.shape[-1] != text_features.shape[-1]:
            raise ValueError(
                f"feature dimensions differ: image_features D={image_features.shape[-1]}, "
                f"text_features D={text_features.shape[-1]}"
            )
        if image_features.shape[0] == 0 or image_features.shape[2] == 0:
            raise ValueError(f"image_features has an empty batch or level axis: {tuple(image_features.shape)}")

    def forward(self, image_features, text_features):
        self._check(image_features, text_features)
        device = image_features.device
        amp_off = (torch.autocast(device.type, enabled=False)
                   if torch.amp.is_autocast_available(device.type) else contextlib.nullcontext())
        with amp_off:
            # (B, 2, L, P, 2): the prompt pairs as one more axis that every mean below also averages
            c = quality_cosines(image_features, text_features.to(device).reshape(-1, 2, text_features.shape[-1]))
            cons = F.relu((c[:, 0] - c[:, 1]).abs() - self.margin_cons).mean()

            first, second = self.level_pairs(c.shape[2], device)
            if first.numel():
                c_first, c_second = c.index_select(2, first), c.index_select(2, second)  # (B, 2, pairs, P, 2)
                pos = F.relu(self.margin_rank - (c_first[..., 0] - c_second[..., 0])).mean()
                neg = F.relu(self.margin_rank - (c_second[..., 1] - c_first[..., 1])).mean()
            else:
                pos = neg = c.new_zeros(())
            loss = self.lambda_cons * cons + self.lambda_pos * pos + self.lambda_neg * neg
        return {"loss": loss, "cons": cons, "pos": pos, "neg": neg}


class QualiCLIPLoss(_RankingConsistencyLoss):
    """Ranking over all level pairs l < l' (L(L−1)/2 pairs)."""

    def level_pairs(self, num_levels, device):
        pairs = torch.triu_indices(num_levels, num_levels, offset=1, device=device)
        return pairs[0], pairs[1]


class SimplifiedQualiCLIPLoss(_RankingConsistencyLoss):
    """Ranking over adjacent levels only, l' = l + 1 (L−1 pairs); the default ``--loss_type``."""

    def level_pairs(self, num_levels, device):
        first = torch.arange(max(num_levels - 1, 0), device=device)
        return first, first + 1


def build_loss(loss_type="simplified", **kwargs):
    """``'simplified'`` -> :class:`SimplifiedQualiCLIPLoss`, ``'full'`` -> :class:`QualiCLIPLoss`."""
    classes = {"simplified": SimplifiedQualiCLIPLoss, "full": QualiCLIPLoss}
    if loss_type not in classes:
        raise UserError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return classes[loss_type](**kwargs)


__all__ = ["QualiCLIPLoss", "SimplifiedQualiCLIPLoss", "build_loss", "quality_cosines", "LOSS_TYPES"]
