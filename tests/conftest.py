"""Shared fixtures: small generated data and a helper to run the real CLIs."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_cli(*args, env=None, timeout=600, cwd=ROOT):
    """Run ``python <script> args...`` from the repository root; returns CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(result, *fragments):
    """Non-zero exit, a one-line 'error:' message containing ``fragments``, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


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
