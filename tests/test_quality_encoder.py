"""QualityEncoder: shapes, zero-shot score, Stage-1 checkpoint round trip and timm compatibility."""
import pytest
import torch
import torch.nn.functional as F

from iqa.runtime import UserError
from models.quality_encoder import ENCODER_FORMAT, QualityEncoder
from models.swin_backbone import create_swin

TEXT_DIM = 16


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return QualityEncoder("nano", text_dim=TEXT_DIM, imagenet_pretrained=False, proj_hidden=24).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_forward_gives_one_feature_per_image(encoder, images):
    with torch.no_grad():
        features = encoder(images)
        single = encoder(images[1:2])
    assert features.shape == (2, TEXT_DIM)
    # In eval mode an image's features do not depend on the rest of the batch.
    torch.testing.assert_close(features[1], single[0], atol=1e-5, rtol=1e-4)


def test_score_is_two_way_softmax(encoder, images):
    text = torch.randn(2, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scores = encoder.score(images, text)
        features = encoder(images)
    cos_pos = F.cosine_similarity(features, text[0:1], dim=-1)
    cos_neg = F.cosine_similarity(features, text[1:2], dim=-1)
    expected = torch.exp(100 * cos_pos) / (torch.exp(100 * cos_pos) + torch.exp(100 * cos_neg))
    assert scores.shape == (2,)
    assert ((scores >= 0) & (scores <= 1)).all()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


def test_zero_shot_quality_is_the_log_odds_and_keeps_the_order_the_probability_loses(encoder, images):
    """Anchors along the features' own directions give log-odds far past float32's softmax: every
    probability is exactly 1.0 (a tie), the log-odds still tell the images apart."""
    with torch.no_grad():
        features = encoder(images)
        unit = F.normalize(features, dim=-1)
        # positive anchor: between the two feature directions (nearer the first); negative: orthogonal to both
        negative = torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(5))
        basis = torch.linalg.qr(torch.stack([unit[0], unit[1], negative], dim=1)).Q
        text = torch.stack([0.7 * unit[0] + 0.3 * unit[1], basis[:, 2]])
        quality = encoder.zero_shot_quality(images, text)
        scores = encoder.score(images, text)
    cos_pos = F.cosine_similarity(features, text[0:1], dim=-1)
    expected = 100 * (cos_pos - F.cosine_similarity(features, text[1:2], dim=-1))
    torch.testing.assert_close(quality, expected, atol=1e-4, rtol=1e-5)
    assert (quality > 17).all() and (scores == 1.0).all()
    assert quality[0] != quality[1]


def test_checkpoint_round_trip(encoder, images, tmp_path):
    text = torch.randn(2, TEXT_DIM)
    prompts = [("Good photo.", "Bad photo.")]
    path = tmp_path / "enc.pkl"
    torch.save(encoder.checkpoint_dict(text, prompts, {"epochs": 3}), path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == ENCODER_FORMAT and ckpt["model_size"] == "nano"
    assert ckpt["prompts"] == [["Good photo.", "Bad photo."]] and ckpt["args"] == {"epochs": 3}

    restored, restored_text = QualityEncoder.from_checkpoint(ckpt, str(path))
    restored.eval()
    torch.testing.assert_close(restored_text, text, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), encoder(images), atol=0, rtol=0)


def test_encoder_state_dict_loads_into_plain_timm_swin(encoder, images):
    ckpt = encoder.checkpoint_dict(torch.randn(2, TEXT_DIM), [], {})
    swin = create_swin("nano").eval()
    swin.load_state_dict(ckpt["encoder"], strict=True)
    with torch.no_grad():
        pooled = swin(images)  # timm: final norm + global average pool, no head
        torch.testing.assert_close(pooled, encoder.backbone(images)[-1].mean(dim=(2, 3)), atol=1e-5, rtol=1e-4)


def test_from_checkpoint_rejects_other_formats():
    with pytest.raises(UserError, match="not a Stage-1 encoder checkpoint"):
        QualityEncoder.from_checkpoint({"format": "something-else/2"}, "other.pkl")
    with pytest.raises(UserError, match="not a Stage-1 encoder checkpoint"):
        QualityEncoder.from_checkpoint({"patch_embed.proj.weight": torch.zeros(1)}, "bare.pth")


def test_nano48_is_nano_at_one_and_a_half_times_the_width(tmp_path):
    """``nano48``: nano's depths and heads at embed_dim 48; random init only; its Stage-1 .pkl
    restores as nano48 and fits a Stage-2 nano48 but not a nano."""
    from models.hyperiqa_swin import HyperIQASwin
    from models.swin_backbone import SwinBackbone

    torch.manual_seed(0)
    wide = QualityEncoder("nano48", text_dim=TEXT_DIM, imagenet_pretrained=False)
    narrow = create_swin("nano")
    assert wide.backbone.channels == [48, 96, 192, 384]
    assert [len(stage.blocks) for stage in wide.backbone.swin.layers] == [len(s.blocks) for s in narrow.layers]
    assert [stage.blocks[0].attn.num_heads for stage in wide.backbone.swin.layers] == [1, 2, 4, 8]
    with pytest.raises(UserError, match="Swin-nano48 has no ImageNet weights.*--no_imagenet_pretrained"):
        SwinBackbone("nano48", imagenet_pretrained=True)

    path = tmp_path / "swin_nano48_qualiclip_pretrained.pkl"
    torch.save(wide.checkpoint_dict(torch.randn(2, TEXT_DIM), [], {}), path)
    restored, _ = QualityEncoder.from_checkpoint(torch.load(path, weights_only=True), str(path))
    assert restored.model_size == "nano48" and restored.backbone.channels[0] == 48
    assert HyperIQASwin("nano48", imagenet_pretrained=False).load_pretrained_encoder(str(path)) == len(
        restored.backbone.swin.state_dict())
    with pytest.raises(UserError, match="--model_size"):
        HyperIQASwin("nano", imagenet_pretrained=False).load_pretrained_encoder(str(path))
