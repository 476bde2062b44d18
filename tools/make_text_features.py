"""Compute the frozen CLIP text anchors once and save them for ``--text_features``.

Useful on clusters without network: run this where CLIP weights are available (or pass
``--clip_weights RN50.pt``), copy the small file, and pretrain with ``--text_features FILE``.

``--fallback_random D`` is for the offline demo only: when CLIP cannot be loaded it writes two
fixed random orthonormal D-dim anchors instead and marks the file as such (``'random': True``),
so that summaries can say the demo did not use CLIP.

    python tools/make_text_features.py --out text_features_rn50.pt --prompt_set qualiclip
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iqa import runtime  # noqa: E402
from iqa.runtime import UserError  # noqa: E402
from models.clip_text import PROMPT_SETS, compute_text_features  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("Save CLIP text anchors for --text_features")
    p.add_argument("--out", required=True, help="output file (torch.save of a dict with 'text_features')")
    p.add_argument("--prompt_set", choices=tuple(PROMPT_SETS), default="good_bad",
                   help="good_bad: 'Good photo.'/'Bad photo.' (alias: seed); qualiclip: QualiCLIP's 7 pairs")
    p.add_argument("--clip_model", default="RN50")
    p.add_argument("--clip_weights", default=None)
    p.add_argument("--fallback_random", type=int, default=0, metavar="D",
                   help="demo only: if CLIP is unavailable, write fixed random D-dim anchors instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return p


def random_anchors(dim, seed):
    """Two orthonormal random directions: a well-defined, reproducible stand-in for the demo."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator))
    return q.T.contiguous()


def main(args):
    if os.path.exists(args.out) and not args.force:
        print(f"{args.out} exists; keeping it (use --force to recompute)")
        return
    try:
        features, prompts = compute_text_features(args.prompt_set, args.clip_model, args.clip_weights)
        payload = {"text_features": features, "prompts": prompts, "clip_model": args.clip_model, "random": False}
    except UserError as err:
        if not args.fallback_random:
            raise
        print(f"note: {err}\nnote: writing fixed random {args.fallback_random}-d anchors (demo only)")
        payload = {"text_features": random_anchors(args.fallback_random, args.seed),
                   "prompts": [["<random anchor>", "<random anchor>"]], "clip_model": None, "random": True}
    runtime.atomic_torch_save(payload, args.out)
    print(f"text anchors {tuple(payload['text_features'].shape)} written to {args.out}")


if __name__ == "__main__":
    runtime.run_cli(main, get_args_parser().parse_args())
