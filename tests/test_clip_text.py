"""CLIP text anchors: prompt averaging, loading from files, offline failure (no ERROR line from
open_clip), the seed alias of good_bad, stored features.

A tiny random-init open_clip model (registered from a temporary config) stands in for RN50.
"""
import copy
import json
import logging
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F

from iqa.runtime import UserError
from models.clip_text import PROMPT_SETS, compute_text_features, encode_prompt_pairs, load_text_features
from qualiclip_pretrain import args as pretrain_args
from tests.helpers import run_cli
from tools import make_text_features
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
    assert PROMPT_SETS["good_bad"] == [("Good photo.", "Bad photo.")]
    pairs = PROMPT_SETS["qualiclip"]
    assert len(pairs) == 7 and pairs[0] == ("Good photo.", "Bad photo.")
    assert ("Noise-free image.", "Noisy image.") in pairs


def test_single_pair_equals_direct_encode(tiny_clip):
    model, tokenizer = tiny_clip
    anchors = encode_prompt_pairs(model, tokenizer, PROMPT_SETS["good_bad"], "cpu")
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
    seed = encode_prompt_pairs(model, tokenizer, PROMPT_SETS["good_bad"], "cpu")
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
    features, _ = compute_text_features("good_bad", TINY, str(path))
    torch.testing.assert_close(features, encode_prompt_pairs(model, tokenizer, PROMPT_SETS["good_bad"], "cpu"),
                               atol=1e-5, rtol=1e-4)


def test_clip_weights_errors(tiny_clip, tmp_path):
    model, _ = tiny_clip
    state = model.state_dict()
    state.pop("ln_final.weight")
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match="--clip_weights .* does not fit --clip_model"):
        compute_text_features("good_bad", TINY, str(path))
    with pytest.raises(UserError, match="--clip_model 'no-such-clip'"):
        compute_text_features("good_bad", "no-such-clip", str(path))
    with pytest.raises(UserError, match="does not exist"):
        compute_text_features("good_bad", TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="prompt set"):
        compute_text_features("nonsense", TINY, str(path))


def test_seed_is_an_alias_of_good_bad(tiny_clip, tmp_path):
    model, _ = tiny_clip
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    features, prompts = compute_text_features("seed", TINY, str(path))
    expected, expected_prompts = compute_text_features("good_bad", TINY, str(path))
    assert prompts == expected_prompts == [("Good photo.", "Bad photo.")]
    torch.testing.assert_close(features, expected, atol=0, rtol=0)
    for parser, required in ((pretrain_args.get_args_parser(), []),
                             (make_text_features.get_args_parser(), ["--out", "x.pt"])):
        assert parser.parse_args([*required, "--prompt_set", "seed"]).prompt_set == "seed"
        with pytest.raises(SystemExit):
            parser.parse_args([*required, "--prompt_set", "good-bad"])
    assert make_text_features.get_args_parser().parse_args(["--out", "x.pt"]).prompt_set == "good_bad"


@pytest.mark.parametrize("encoder, expected", [("swin", "good_bad"), ("clip", "qualiclip")])
def test_pretrain_prompt_set_default_follows_the_encoder(encoder, expected):
    args = pretrain_args.get_args_parser().parse_args(["--encoder", encoder])
    pretrain_args.check_encoder_args(args)
    assert args.prompt_set == expected
    args = pretrain_args.get_args_parser().parse_args(["--encoder", encoder, "--prompt_set", "seed"])
    pretrain_args.check_encoder_args(args)
    assert args.prompt_set == "seed"


def test_per_pair_features_keep_every_pair(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    features, prompts = compute_text_features("qualiclip", TINY, str(path), per_pair=True)
    assert features.shape == (7, 2, 16) and prompts == PROMPT_SETS["qualiclip"]
    expected = encode_one_by_one(model, tokenizer, [p for pair in prompts for p in pair]).view(7, 2, 16)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)
    averaged, _ = compute_text_features("qualiclip", TINY, str(path))
    torch.testing.assert_close(averaged, F.normalize(expected.mean(0), dim=-1), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_offline_without_weights_fails_fast_naming_both_flags(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "XDG_CACHE_HOME": str(tmp_path)}
    script = (
        "from iqa.runtime import UserError\n"
        "from models.clip_text import compute_text_features\n"
        "try:\n    compute_text_features('good_bad', 'RN50')\n"
        "except UserError as err:\n    print('USER_ERROR', err)\n    raise SystemExit(3)\n"
    )
    start = time.monotonic()
    result = run_cli("-c", script, env=env, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stdout.split("USER_ERROR", 1)[1]
    assert "--clip_weights" in message and "--text_features" in message and "RN50.pt" in message
    assert str(tmp_path / "hf_home") in message
    assert "ERROR" not in result.stderr, result.stderr  # open_clip's own log line is not printed
    assert elapsed < 20


def failing_download(cfg, **kwargs):
    raise RuntimeError("no network in this test")


def test_failed_download_logs_no_error_and_the_fallback_run_prints_none(monkeypatch, caplog, capfd, tmp_path):
    import open_clip.factory

    monkeypatch.setattr(open_clip.factory, "download_pretrained", failing_download)
    caplog.set_level(logging.INFO)
    # open_clip itself logs the failure at ERROR (what the demo used to print) ...
    with pytest.raises(RuntimeError, match="no network"):
        open_clip.create_model("RN50", pretrained="openai")
    assert [r.levelname for r in caplog.records if "Failed to download" in r.getMessage()] == ["ERROR"]
    caplog.clear()
    # ... our loader raises the UserError without it, and the filter is gone afterwards
    with pytest.raises(UserError, match="could not load OpenAI weights for CLIP 'RN50'.*--clip_weights"):
        compute_text_features("good_bad", "RN50")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert logging.getLogger().filters == []
    capfd.readouterr()
    # the demo's call: falls back to random anchors, says so in a note, no ERROR line anywhere
    out = tmp_path / "anchors.pt"
    make_text_features.main(make_text_features.get_args_parser().parse_args(
        ["--out", str(out), "--fallback_random", "8"]))
    printed = capfd.readouterr()
    assert "note: could not load OpenAI weights" in printed.out and "random 8-d anchors" in printed.out
    assert "ERROR" not in printed.out + printed.err
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    payload = torch.load(out, weights_only=True)
    assert payload["random"] is True and payload["text_features"].shape == (2, 8)


def test_load_text_features(tmp_path):
    features = torch.randn(2, 16)
    torch.save(features, tmp_path / "t.pt")
    torch.save({"format": "qualiclip-swin-encoder/1", "text_features": features}, tmp_path / "stage1.pkl")
    torch.testing.assert_close(load_text_features(tmp_path / "t.pt"), features, atol=0, rtol=0)
    torch.testing.assert_close(load_text_features(tmp_path / "stage1.pkl"), features, atol=0, rtol=0)

    pairs = torch.randn(7, 2, 16)
    torch.save(pairs, tmp_path / "pairs.pt")
    torch.testing.assert_close(load_text_features(tmp_path / "pairs.pt"), pairs, atol=0, rtol=0)
    # QualiCLIP's release: 14 prompt features, positive and negative alternating
    torch.save({"clip_model.visual.conv1.weight": torch.zeros(1), "prompts_features": pairs.reshape(14, 16)},
               tmp_path / "qualiclip.pth")
    torch.testing.assert_close(load_text_features(tmp_path / "qualiclip.pth"), pairs, atol=0, rtol=0)

    torch.save(torch.randn(3, 16), tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"--text_features .*shape \(3, 16\).*\(2, D\)"):
        load_text_features(tmp_path / "bad.pt")
    torch.save(torch.randn(7, 3, 16), tmp_path / "bad_pairs.pt")
    with pytest.raises(UserError, match=r"shape \(7, 3, 16\).*\(P, 2, D\)"):
        load_text_features(tmp_path / "bad_pairs.pt")
    torch.save({"encoder": {}}, tmp_path / "no_key.pt")
    with pytest.raises(UserError, match="without a 'text_features' key"):
        load_text_features(tmp_path / "no_key.pt")
