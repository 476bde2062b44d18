"""QualiCLIP loss against a literal transcription of the formula in docs/method.md ("Loss")."""
import math

import pytest
import torch

from iqa.runtime import UserError
from qualiclip_pretrain.qualiclip_loss import QualiCLIPLoss, SimplifiedQualiCLIPLoss, build_loss


def reference_loss(image_features, text_features, all_pairs, m_r=0.05, m_c=0.0, l_c=1.0, l_p=1.0, l_n=1.0):
    """Nested Python loops over the formula, in float64 Python arithmetic."""
    img = image_features.detach().double().tolist()
    txt = text_features.detach().double().tolist()

    def cos(u, v):
        dot = sum(a * b for a, b in zip(u, v))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    B, A, L = len(img), len(img[0]), len(img[0][0])
    c = [[[[cos(img[b][a][l], txt[k]) for k in range(2)] for l in range(L)] for a in range(A)] for b in range(B)]
    pairs = [(l, m) for l in range(L) for m in range(l + 1, L) if all_pairs or m == l + 1]
    pos_terms, neg_terms, cons_terms = [], [], []
    for b in range(B):
        for a in range(A):
            for l, m in pairs:
                pos_terms.append(max(0.0, m_r - (c[b][a][l][0] - c[b][a][m][0])))
                neg_terms.append(max(0.0, m_r - (c[b][a][m][1] - c[b][a][l][1])))
        for l in range(L):
            for k in range(2):
                cons_terms.append(max(0.0, abs(c[b][0][l][k] - c[b][1][l][k]) - m_c))
    pos = sum(pos_terms) / len(pos_terms) if pos_terms else 0.0
    neg = sum(neg_terms) / len(neg_terms) if neg_terms else 0.0
    cons = sum(cons_terms) / len(cons_terms)
    return {"loss": l_c * cons + l_p * pos + l_n * neg, "cons": cons, "pos": pos, "neg": neg}


SETTINGS = [
    dict(),
    dict(margin_rank=0.0, margin_cons=0.02),
    dict(margin_rank=0.2, margin_cons=0.1, lambda_cons=0.5, lambda_pos=2.0, lambda_neg=0.25),
    dict(margin_rank=0.1, lambda_cons=0.0, lambda_neg=3.0),
]


def _features(B=3, L=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Shared component so cosines spread around 0 and the hinges are partly active.
    img = torch.randn(B, 2, L, D, generator=g) * torch.rand(B, 2, L, 1, generator=g).add(0.5)
    txt = torch.randn(2, D, generator=g) * 3.0
    return img, txt


@pytest.mark.parametrize("cls,all_pairs", [(QualiCLIPLoss, True), (SimplifiedQualiCLIPLoss, False)])
@pytest.mark.parametrize("kw", SETTINGS)
def test_matches_nested_loop_reference(cls, all_pairs, kw):
    img, txt = _features()
    got = cls(**kw)(img, txt)
    ref = reference_loss(img, txt, all_pairs, kw.get("margin_rank", 0.05), kw.get("margin_cons", 0.0),
                         kw.get("lambda_cons", 1.0), kw.get("lambda_pos", 1.0), kw.get("lambda_neg", 1.0))
    assert set(got) == {"loss", "cons", "pos", "neg"}
    for key in ref:
        assert got[key].dtype == torch.float32 and got[key].ndim == 0
        assert got[key].item() == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert ref["pos"] > 0 and ref["neg"] > 0 and ref["cons"] > 0  # the hinges were exercised


def test_full_and_simplified_differ_and_agree_for_two_levels():
    img, txt = _features(L=5, seed=1)
    full, simple = QualiCLIPLoss()(img, txt), SimplifiedQualiCLIPLoss()(img, txt)
    assert full["pos"].item() != pytest.approx(simple["pos"].item())
    assert full["cons"].item() == pytest.approx(simple["cons"].item())
    img2 = img[:, :, :2]
    full2, simple2 = QualiCLIPLoss()(img2, txt), SimplifiedQualiCLIPLoss()(img2, txt)
    for key in full2:
        assert torch.allclose(full2[key], simple2[key])


def _perfectly_ranked(B=4, L=5, D=6, seed=0):
    """Level l at angle θ_l from the positive anchor (e0) towards the negative one (e1)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.linspace(0.1, 1.4, L)  # cos falls and sin rises by > 0.1 per step
    base = torch.zeros(L, D)
    base[:, 0], base[:, 1] = torch.cos(theta), torch.sin(theta)
    scale = torch.rand(B, 1, L, 1, generator=g) * 5 + 0.1  # the loss normalises
    img = base.expand(B, 2, L, D) * scale
    txt = torch.zeros(2, D)
    txt[0, 0], txt[1, 1] = 2.0, 0.5
    return img, txt


@pytest.mark.parametrize("cls", [QualiCLIPLoss, SimplifiedQualiCLIPLoss])
def test_zero_for_perfectly_ranked_consistent_features(cls):
    img, txt = _perfectly_ranked()
    out = cls(margin_rank=0.05)(img, txt)
    for key in out:
        assert out[key].item() == pytest.approx(0.0, abs=1e-7), key
    flipped = cls()(img.flip(2), txt)  # strongest first: every pair violated
    assert flipped["pos"] > 0.1 and flipped["neg"] > 0.1 and flipped["cons"].item() == pytest.approx(0.0, abs=1e-7)
    swapped = img.clone()
    swapped[:, 1] = swapped[:, 1].roll(1, dims=1)  # crops disagree
    assert cls()(swapped, txt)["cons"] > 0.05


@pytest.mark.parametrize("cls", [QualiCLIPLoss, SimplifiedQualiCLIPLoss])
def test_gradients_flow_to_image_features(cls):
    img, txt = _features(seed=2)
    img.requires_grad_(True)
    out = cls()(img, txt)
    out["loss"].backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [QualiCLIPLoss, SimplifiedQualiCLIPLoss])
def test_single_level(cls):
    img, txt = _features(L=1, seed=3)
    img.requires_grad_(True)
    out = cls()(img, txt)
    assert out["pos"].item() == 0.0 and out["neg"].item() == 0.0
    assert torch.isfinite(out["loss"]) and out["loss"].item() == pytest.approx(out["cons"].item())
    ref = reference_loss(img, txt, cls is QualiCLIPLoss)
    assert out["loss"].item() == pytest.approx(ref["loss"], rel=1e-5)
    out["loss"].backward()
    assert torch.isfinite(img.grad).all()


def test_float32_under_autocast():
    img, txt = _features(seed=4)
    ref = QualiCLIPLoss()(img, txt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = QualiCLIPLoss()(img, txt)
    assert got["loss"].dtype == torch.float32 and torch.allclose(got["loss"], ref["loss"])
    half = QualiCLIPLoss()(img.bfloat16(), txt.bfloat16())
    assert half["loss"].dtype == torch.float32


@pytest.mark.parametrize("cls,all_pairs", [(QualiCLIPLoss, True), (SimplifiedQualiCLIPLoss, False)])
def test_prompt_pairs_average_the_per_pair_reference(cls, all_pairs):
    """(P, 2, D) text features: every term is the mean over the pairs of the single-pair reference."""
    img, _ = _features(seed=5)
    pairs = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(6)) * 3.0
    kw = dict(margin_rank=0.1, margin_cons=0.01, lambda_cons=0.5, lambda_neg=2.0)
    got = cls(**kw)(img, pairs)
    per_pair = [reference_loss(img, pairs[p], all_pairs, 0.1, 0.01, 0.5, 1.0, 2.0) for p in range(3)]
    for key in got:
        assert got[key].item() == pytest.approx(sum(r[key] for r in per_pair) / 3, rel=1e-5, abs=1e-6), key
    assert len({round(r["loss"], 6) for r in per_pair}) == 3  # the pairs really differ
    single = cls(**kw)(img, pairs[1:2])  # one pair as (1, 2, D) is the (2, D) case
    torch.testing.assert_close(single["loss"], cls(**kw)(img, pairs[1])["loss"])


def test_shape_checks():
    loss = SimplifiedQualiCLIPLoss()
    img, txt = _features()
    with pytest.raises(ValueError, match=r"\(B, 2, L, D\)"):
        loss(img[:, 0], txt)
    with pytest.raises(ValueError, match=r"\(B, 2, L, D\)"):
        loss(torch.randn(2, 3, 5, 8), txt)
    with pytest.raises(ValueError, match=r"\(2, D\)"):
        loss(img, torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"\(P, 2, D\)"):
        loss(img, torch.randn(4, 3, 8))
    with pytest.raises(ValueError, match="D=8.*D=7"):
        loss(img, torch.randn(2, 7))


def test_build_loss():
    assert type(build_loss("simplified")) is SimplifiedQualiCLIPLoss
    full = build_loss("full", margin_rank=0.1, lambda_neg=2.0)
    assert type(full) is QualiCLIPLoss and full.margin_rank == 0.1 and full.lambda_neg == 2.0
    with pytest.raises(UserError, match="--loss_type"):
        build_loss("pairwise")
