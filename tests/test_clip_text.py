"""CLIP text anchors: prompt averaging, loading from files, offline failure, stored features.

A tiny random-init open_clip model (registered from a temporary config) stands in for RN50.
"""
import copy
import json
import os
import subprocess
import sys
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F

from iqa.runtime import UserError
from models.clip_text import PROMPT_SETS, compute_text_features, encode_prompt_pairs, load_text_features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "test-tiny-clip"
# Widths of 64 with one head each: what open_clip infers when rebuilding an OpenAI archive.
TINY_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    config = tmp_path_factory.mktemp("clip_config") / f"{TINY}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None).eval()
    # fp16-representable weights: OpenAI archives are rebuilt through fp16, which is then exact.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model, open_clip.get_tokenizer(TINY)


def encode_one_by_one(model, tokenizer, prompts):
    with torch.no_grad():
        return torch.cat([F.normalize(model.encode_text(tokenizer([p])), dim=-1) for p in prompts])


def test_prompt_sets():
    assert PROMPT_SETS["seed"] == [("Good photo.", "Bad photo.")]
    pairs = PROMPT_SETS["qualiclip"]
    assert len(pairs) == 7 and pairs[0] == ("Good photo.", "Bad photo.")
    assert ("Noise-free image.", "Noisy image.") in pairs


def test_single_pair_equals_direct_encode(tiny_clip):
    model, tokenizer = tiny_clip
    anchors = encode_prompt_pairs(model, tokenizer, PROMPT_SETS["seed"], "cpu")
    direct = encode_one_by_one(model, tokenizer, ["Good photo.", "Bad photo."])
    assert anchors.shape == (2, 16)
    torch.testing.assert_close(anchors, direct, atol=1e-5, rtol=1e-4)


def test_several_pairs_average_normalised_features(tiny_clip):
    model, tokenizer = tiny_clip
    pairs = PROMPT_SETS["qualiclip"]
    anchors = encode_prompt_pairs(model, tokenizer, pairs, "cpu")
    expected = torch.stack([
        F.normalize(encode_one_by_one(model, tokenizer, [pair[k] for pair in pairs]).mean(0), dim=0)
        for k in (0, 1)
    ])
    torch.testing.assert_close(anchors, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(anchors.norm(dim=1), torch.ones(2))
    seed = encode_prompt_pairs(model, tokenizer, PROMPT_SETS["seed"], "cpu")
    assert not torch.allclose(anchors, seed, atol=1e-3)


def test_clip_weights_state_dict(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    features, prompts = compute_text_features("qualiclip", TINY, str(path))
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert prompts == PROMPT_SETS["qualiclip"]
    torch.testing.assert_close(features, encode_prompt_pairs(model, tokenizer, prompts, "cpu"))


def test_clip_weights_openai_torchscript_archive(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    # OpenAI's archives hold the causal mask as a traced constant, not as a state-dict entry.
    openai_like = copy.deepcopy(model)
    mask = openai_like._buffers.pop("attn_mask")
    openai_like.attn_mask = mask
    path = tmp_path / "tiny_openai.pt"
    traced = torch.jit.trace_module(openai_like, {"encode_text": (tokenizer(["Good photo."]),)})
    torch.jit.save(traced, str(path))
    features, _ = compute_text_features("seed", TINY, str(path))
    torch.testing.assert_close(features, encode_prompt_pairs(model, tokenizer, PROMPT_SETS["seed"], "cpu"),
                               atol=1e-5, rtol=1e-4)


def test_clip_weights_errors(tiny_clip, tmp_path):
    model, _ = tiny_clip
    state = model.state_dict()
    state.pop("ln_final.weight")
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match="--clip_weights .* does not fit --clip_model"):
        compute_text_features("seed", TINY, str(path))
    with pytest.raises(UserError, match="--clip_model 'no-such-clip'"):
        compute_text_features("seed", "no-such-clip", str(path))
    with pytest.raises(UserError, match="does not exist"):
        compute_text_features("seed", TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="prompt set"):
        compute_text_features("nonsense", TINY, str(path))


def test_offline_without_weights_fails_fast_naming_both_flags(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), XDG_CACHE_HOME=str(tmp_path))
    script = (
        "from iqa.runtime import UserError\n"
        "from models.clip_text import compute_text_features\n"
        "try:\n    compute_text_features('seed', 'RN50')\n"
        "except UserError as err:\n    print('USER_ERROR', err)\n    raise SystemExit(3)\n"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stdout.split("USER_ERROR", 1)[1]
    assert "--clip_weights" in message and "--text_features" in message and "RN50.pt" in message
    assert str(tmp_path / "hf_home") in message
    assert elapsed < 20


def test_load_text_features(tmp_path):
    features = torch.randn(2, 16)
    torch.save(features, tmp_path / "t.pt")
    torch.save({"format": "qualiclip-swin-encoder/1", "text_features": features}, tmp_path / "stage1.pkl")
    torch.testing.assert_close(load_text_features(tmp_path / "t.pt"), features, atol=0, rtol=0)
    torch.testing.assert_close(load_text_features(tmp_path / "stage1.pkl"), features, atol=0, rtol=0)

    torch.save(torch.randn(3, 16), tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"--text_features .*shape \(3, 16\).*\(2, D\)"):
        load_text_features(tmp_path / "bad.pt")
    torch.save({"encoder": {}}, tmp_path / "no_key.pt")
    with pytest.raises(UserError, match="without a 'text_features' key"):
        load_text_features(tmp_path / "no_key.pt")
