"""Shared fixtures: small generated data (helpers for running the CLIs are in tests/helpers.py)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Small demo datasets in the real formats (KonIQ, SPAQ, KADID, AGIQA, LIVE-C)."""
    from tools.make_demo_data import build_demo

    out = tmp_path_factory.mktemp("demo") / "demo_data"
    build_demo(out, n_koniq=24, n_others=12, seed=0, size=(320, 240))
    return out


@pytest.fixture(scope="session")
def text_features_file(tmp_path_factory):
    """A (2, 64) anchor file standing in for CLIP features (tests never load CLIP weights)."""
    path = tmp_path_factory.mktemp("anchors") / "text_features.pt"
    generator = torch.Generator().manual_seed(0)
    torch.save(torch.nn.functional.normalize(torch.randn(2, 64, generator=generator), dim=1), path)
    return path
