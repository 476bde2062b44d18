"""Command line of ``cross_dataset_test.py``, kept out of the entry script so that tools which build or validate
its commands (``run_ablation.py``) use its own parser without importing the script."""
import argparse

from iqa.scoring import add_scoring_arguments


def get_args_parser():
    parser = argparse.ArgumentParser("Cross-dataset evaluation of Swin-HyperIQA checkpoints and Stage-1 encoders",
                                     add_help=True)
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH",
                        help="train_swin.py best.pt / last.pt, a Stage-1 .pkl (zero-shot) or QualiCLIP's qualiclip.pth")
    parser.add_argument("--datasets", nargs="+", required=True, metavar="NAME=ROOT",
                        help="datasets to score whole, e.g. spaq=/data/spaq kadid-10k=/data/kadid10k")
    parser.add_argument("--resize", type=int, default=None,
                        help="shorter side before cropping (default: the checkpoint's; CLIP encoders: 0, full "
                             "resolution)")
    add_scoring_arguments(parser)
    parser.add_argument("--output", default=None,
                        help="JSON path (default: cross_dataset_<timestamp>.json beside the first checkpoint)")
    return parser
