"""Swin-HyperIQA: outputs, attention fusion, batched target net, parameter groups, encoder loading."""
import pytest
import torch
import torch.nn.functional as F

from iqa.runtime import UserError
from models.hyperiqa_swin import TARGET_SIZES, HyperIQASwin, apply_target_net
from models.quality_encoder import QualityEncoder


def nano(**kwargs):
    return HyperIQASwin("nano", imagenet_pretrained=False, **kwargs)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("multiscale,attention", [(False, False), (True, False), (True, True)])
def test_output_shape_and_dtype(images, multiscale, attention):
    model = nano(use_multiscale=multiscale, attention_fusion=attention).eval()
    with torch.no_grad():
        scores = model(images)
        per_image = torch.cat([model(images[i:i + 1]) for i in range(2)])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    # Each image is scored by its own target net: batching must not mix images.
    torch.testing.assert_close(scores, per_image, atol=1e-5, rtol=1e-4)


def test_output_is_float32_under_bf16_autocast(images):
    model = nano().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images).dtype == torch.float32


def test_attention_fusion_needs_multiscale():
    with pytest.raises(UserError, match="--attention_fusion"):
        nano(use_multiscale=False, attention_fusion=True)


def test_attention_weights_uniform_at_init_and_normalised(images):
    model = nano(attention_fusion=True).eval()
    with torch.no_grad():
        stages = model.backbone(images)
        weights = model.fusion_weights(stages)
        torch.testing.assert_close(weights, torch.full((2, 4), 0.25))
        # At init the fused input equals plain multi-scale concatenation.
        fused = model.hyper_input(stages)
        attention, model.stage_attention = model.stage_attention, None
        plain = model.hyper_input(stages)
        model.stage_attention = attention
        torch.testing.assert_close(fused, plain)

        torch.nn.init.normal_(model.stage_attention.mlp[-1].weight, std=1.0)
        weights = model.fusion_weights(stages)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    assert (weights - 0.25).abs().max() > 1e-3
    assert (weights > 0).all()


def test_hyper_network_emits_target_layer_shapes():
    model = nano()
    layers = model.hyper_net(torch.randn(3, 112, 7, 7))
    assert [tuple(w.shape) for w, _ in layers] == [(3, o, i) for i, o in zip(TARGET_SIZES[:-1], TARGET_SIZES[1:])]
    assert [tuple(b.shape) for _, b in layers] == [(3, o) for o in TARGET_SIZES[1:]]


def test_batched_target_net_equals_per_image_loop():
    torch.manual_seed(1)
    layers = nano().hyper_net(torch.randn(4, 112, 7, 7))
    target_in = torch.randn(4, 224)
    expected = []
    for n in range(4):
        h = target_in[n]
        for i, (w, b) in enumerate(layers):
            h = F.linear(h, w[n], b[n])
            h = torch.sigmoid(h) if i < len(layers) - 1 else h
        expected.append(h)
    torch.testing.assert_close(apply_target_net(target_in, layers), torch.cat(expected), atol=1e-5, rtol=1e-4)


def test_parameter_groups_partition_the_model():
    model = nano(attention_fusion=True)
    encoder = {id(p) for p in model.encoder_parameters()}
    head = {id(p) for p in model.head_parameters()}
    everything = {id(p) for p in model.parameters()}
    assert encoder and head and not encoder & head
    assert encoder | head == everything
    assert encoder == {id(p) for p in model.backbone.swin.parameters()}
    assert {id(p) for p in model.stage_attention.parameters()} <= head


def test_dropout_only_in_training(images):
    model = nano(dropout_rate=0.5)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(images), model(images))
        model.train()
        torch.manual_seed(2)
        first = model(images)
        assert not torch.allclose(first, model(images))


def test_gradients_reach_backbone_and_hyper_net(images):
    model = nano(attention_fusion=True)
    model(images).sum().backward()
    for name, param in [("backbone", model.backbone.swin.patch_embed.proj.weight),
                        ("first stage", model.backbone.swin.layers[0].blocks[0].attn.qkv.weight),
                        ("lda", model.lda[0].fc.weight),
                        ("hyper weights", model.hyper_net.weight_convs[0].weight),
                        ("hyper biases", model.hyper_net.bias_fcs[-1].weight),
                        ("attention", model.stage_attention.mlp[-1].weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.fixture(scope="module")
def stage1_nano():
    torch.manual_seed(3)
    return QualityEncoder("nano", text_dim=16, imagenet_pretrained=False)


def test_load_pretrained_encoder_from_stage1_pkl_and_bare_state_dict(stage1_nano, tmp_path):
    saved = stage1_nano.checkpoint_dict(torch.randn(2, 16), [("Good photo.", "Bad photo.")], {})
    pkl, bare = tmp_path / "stage1.pkl", tmp_path / "swin.pth"
    torch.save(saved, pkl)
    torch.save(saved["encoder"], bare)
    for path in (pkl, bare):
        model = nano()
        assert model.load_pretrained_encoder(str(path)) == len(saved["encoder"])
        loaded = model.backbone.swin.state_dict()
        assert loaded.keys() == saved["encoder"].keys()
        for key, tensor in saved["encoder"].items():
            assert torch.equal(loaded[key], tensor), key


def test_load_pretrained_encoder_size_mismatch(tmp_path):
    tiny = QualityEncoder("tiny", text_dim=16, imagenet_pretrained=False)
    pkl, bare = tmp_path / "tiny.pkl", tmp_path / "tiny_swin.pth"
    ckpt = tiny.checkpoint_dict(torch.randn(2, 16), [], {})
    torch.save(ckpt, pkl)
    torch.save(ckpt["encoder"], bare)
    model = nano()
    with pytest.raises(UserError) as err:
        model.load_pretrained_encoder(str(pkl))
    assert "--model_size" in str(err.value) and "--pretrained_encoder" in str(err.value) and "tiny" in str(err.value)
    with pytest.raises(UserError, match="does not fit a Swin-nano"):
        model.load_pretrained_encoder(str(bare))


@pytest.mark.parametrize("content", [{"model": "not tensors"}, {"format": "other/1", "encoder": {}}, [1, 2]])
def test_load_pretrained_encoder_rejects_other_files(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(UserError, match="not a Stage-1 checkpoint or Swin state dict"):
        nano().load_pretrained_encoder(str(path))
