"""Files for the scoring tests: nano checkpoints of both stages in their real formats, small images."""
import numpy as np
import torch
from PIL import Image, ImageFilter

from models.hyperiqa_swin import CHECKPOINT_FORMAT, HyperIQASwin
from models.quality_encoder import QualityEncoder

# The train_swin.py args a Stage-2 checkpoint carries that scoring reads.  Dropout on, so a model
# left in train mode would give other (random) scores.
STAGE2_ARGS = {"model_size": "nano", "use_multiscale": True, "attention_fusion": True, "imagenet_pretrained": False,
               "backbone_weights": None, "drop_path_rate": 0.0, "dropout_rate": 0.3, "resize": 256,
               "patch_size": 224, "test_patch_num": 3}
STAGE1_ARGS = {"eval_resize": 240, "crop_size": 224, "eval_patch_num": 2}


def write_stage2_checkpoint(path, mos_bounds=(1.0, 5.0), seed=0, **overrides):
    """A train_swin.py best.pt of a random-init nano Swin-HyperIQA; returns its args."""
    args = {**STAGE2_ARGS, **overrides}
    torch.manual_seed(seed)
    model = HyperIQASwin(args["model_size"], use_multiscale=args["use_multiscale"],
                         attention_fusion=args["attention_fusion"], imagenet_pretrained=False,
                         dropout_rate=args["dropout_rate"])
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "args": args,
                "mos_bounds": list(mos_bounds), "epoch": 1}, path)
    return args


def write_stage1_pkl(path, seed=0, **overrides):
    """A pretrain_qualiclip.py .pkl of a random-init nano encoder with random prompt anchors."""
    torch.manual_seed(seed)
    encoder = QualityEncoder("nano", text_dim=16, imagenet_pretrained=False)
    text_features = torch.nn.functional.normalize(torch.randn(2, 16), dim=1)
    torch.save(encoder.checkpoint_dict(text_features, [("Good photo.", "Bad photo.")], {**STAGE1_ARGS, **overrides}),
               path)


def make_image(width, height, seed):
    """A smooth random RGB PIL image (blurred noise), so resizing and crops see real structure."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return noise.filter(ImageFilter.GaussianBlur(3))


def write_truncated_jpeg(path, seed=0):
    """A JPEG cut after half its bytes: the header reads, the pixel data do not."""
    make_image(320, 240, seed).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
