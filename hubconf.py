"""torch.hub entry points: this repository's checkpoints as image scorers (``iqa.scoring.Scorer``).

    scorer = torch.hub.load("path/to/this/repo", "hyperiqa_swin", checkpoint="runs/x/best.pt", source="local")
    scores = scorer(images)        # (N, 3, H, W) RGB in [0, 1], or a list of (3, H, W) -> (N,) scores
    mos = scorer.to_mos(scores)    # on the training dataset's MOS scale
    print(scorer.score_meaning)    # what the scores of this kind are

Each entry point loads a local file (nothing is downloaded) and refuses a file of another kind.
"""
from iqa.scoring import load_scorer

dependencies = ["torch", "timm", "open_clip"]


def hyperiqa_swin(checkpoint, device="cpu"):
    """Swin-HyperIQA of a ``train_swin.py`` best.pt / last.pt -> ``Scorer``: ``scorer(images)`` gives the
    model's score in [0, 1] (the training MOS range rescaled), ``scorer.to_mos`` maps it back to MOS,
    ``scorer.score_paths(files)`` scores image files."""
    return load_scorer(checkpoint, device, kind="hyperiqa_swin")


def qualiclip_swin_encoder(checkpoint, device="cpu"):
    """Stage-1 QualiCLIP-style Swin encoder of a ``pretrain_qualiclip.py`` .pkl -> ``Scorer`` giving the
    zero-shot log-odds 100 x (cos_pos - cos_neg) (unbounded; the probability of the positive prompt
    saturates at 1.0 for a trained encoder); no MOS scale."""
    return load_scorer(checkpoint, device, kind="qualiclip_swin_encoder")


def qualiclip_clip_encoder(checkpoint, device="cpu"):
    """Stage-1 CLIP image encoder of a ``pretrain_qualiclip.py --encoder clip`` .pkl -> ``Scorer`` giving
    QualiCLIP's score in [0, 1] on the whole image (mean over the prompt pairs); no MOS scale."""
    return load_scorer(checkpoint, device, kind="qualiclip_clip_encoder")


def qualiclip_release(checkpoint, device="cpu"):
    """QualiCLIP's released ``qualiclip.pth`` (a local copy) -> ``Scorer`` computing its inference: the
    whole image, CLIP RN50 without the attention pool's positional embedding, the 7 prompt pairs."""
    return load_scorer(checkpoint, device, kind="qualiclip_release")
