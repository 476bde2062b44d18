"""Stage-2 training and evaluation of Swin-HyperIQA (DESIGN §4.2).

``HyperIQASolver`` fine-tunes on MOS rescaled to [0, 1] with the MOS range of the training split
only (val/test MOS never leak into the targets), under either ``--protocol``:

* differential learning rates: the Swin encoder at ``--lr`` (or ``--lr_encoder_pretrained``
  when starting from a Stage-1 encoder), everything else at ``--lr × --lr_ratio``; AdamW; the
  schedule steps per optimizer step and (cosine) ends at 1% of each group's own LR;
* model selection on the **validation** split (best SRCC, early stopping with ``--patience``);
  the test split is evaluated once training ends, with the selected weights (``test``) and the
  last ones (``test_last``), so it can never influence the choice;
* ``last.pt`` every epoch and ``best.pt`` at each improvement hold everything ``--resume``
  needs: model, optimizer, scheduler, scaler, epoch, args (dict), rng (``runtime.rng_state()``
  of every rank, a list), best ({epoch, val}), history (the ``log.jsonl`` records), plus
  mos_bounds and format.  The crops of an epoch depend only on (seed, epoch), so a resumed
  run continues exactly where an uninterrupted one would be;
* DDP under torchrun (rank 0 writes), AMP, channels-last, ``torch.compile``, gradient
  accumulation; the loss is only read back from the device every ``--log_every`` steps.

``load_scorer`` turns a checkpoint of either stage into a scorer for ``iqa.evaluation`` (shared
with ``cross_dataset_test.py`` and ``predict.py``).  Val/test predictions are reported on the
training MOS scale (a score p becomes lo + p·(hi − lo) with the training split's range, so they
may fall slightly outside the val/test MOS range) with the raw ``rmse`` in MOS units;
cross-dataset sets report ``rmse_logistic`` only (see ``iqa.evaluation``).
"""
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from iqa import plots
from iqa.datasets import label_column, mos_bounds, normalize_mos, split_source
from iqa.evaluation import EvalOptions, evaluate, make_eval_set, make_loader, save_eval_outputs
from iqa.patches import DEFAULT_RESIZE, TrainPatchDataset, cache_images, decode_threads
from iqa.runtime import (
    UserError, all_reduce_mean, amp_dtype, append_jsonl, atomic_torch_save, atomic_write_json, autocast, barrier,
    cosine_schedule, first_nonfinite_parameter, make_adamw, make_grad_scaler, rng_state, safe_load, seed_everything,
    set_rng_state, to_model_input, write_jsonl,
)
from models.hyperiqa_swin import HyperIQASwin
from models.quality_encoder import ENCODER_FORMAT, QualityEncoder

CHECKPOINT_FORMAT = "swin-hyperiqa/1"
PATCH_SIZE = 224          # the Swin backbones take 224×224 inputs
DEFAULT_TEST_PATCH_NUM = 10
FINAL_LR_RATIO = 0.01     # cosine ends at 1% of each group's LR
STEP_LR_GAMMA = 0.1
LOSSES = {
    "l1": F.l1_loss,
    "l2": F.mse_loss,
    "mse": F.mse_loss,
    # Huber; beta 0.1 because targets live on [0, 1] (beta 1 would be a halved MSE everywhere).
    "smooth_l1": lambda pred, target: F.smooth_l1_loss(pred, target, beta=0.1),
}
SCHEDULERS = ("cosine", "constant", "step")


class NonFiniteLossError(UserError):
    """The training loss became NaN/inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- model

def build_model(args, load_backbone=True):
    """Swin-HyperIQA from a train_swin args dict; ``load_backbone=False`` skips ImageNet/file weights
    (for a model whose weights come from a checkpoint next)."""
    return HyperIQASwin(
        args["model_size"],
        use_multiscale=args["use_multiscale"],
        attention_fusion=args["attention_fusion"],
        imagenet_pretrained=load_backbone and args["imagenet_pretrained"],
        backbone_weights=args["backbone_weights"] if load_backbone else None,
        drop_path_rate=args["drop_path_rate"],
        dropout_rate=args["dropout_rate"],
    )


def model_from_checkpoint(ckpt, source):
    """The Swin-HyperIQA of a ``train_swin.py`` checkpoint dict, built from the args stored in it."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format", "no 'format' key") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"'{source}' is not a train_swin.py checkpoint (format {found!r}, expected "
                        f"{CHECKPOINT_FORMAT!r}); pass a best.pt or last.pt from a train_swin.py run")
    model = build_model(ckpt["args"], load_backbone=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UserError(f"'{source}' does not fit the Swin-{ckpt['args']['model_size']} HyperIQA its own args "
                        f"describe ({str(err).splitlines()[0][:160]}); the checkpoint is corrupt") from None
    return model


@dataclass
class Scorer:
    """Anything that maps a normalised N×3×224×224 batch to N quality scores, with its eval settings."""
    score: Callable
    kind: str                 # "stage2" (Swin-HyperIQA) or "stage1" (zero-shot QualityEncoder)
    resize: int
    patch_size: int
    test_patch_num: int
    mos_bounds: Optional[tuple] = None


def other_dataset_resize(resize):
    """The resize a model trained at ``resize`` scores other datasets' images at: a fixed
    [width, height] belongs to the dataset it was set for (``--protocol hyperiqa``'s KonIQ-10k size),
    so other images keep their aspect at the default shorter side."""
    return DEFAULT_RESIZE if isinstance(resize, (list, tuple)) else resize


def load_scorer(path, device):
    """A ``train_swin.py`` checkpoint (.pt) or a Stage-1 encoder (.pkl) as a ``Scorer`` on ``device``."""
    ckpt = safe_load(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == ENCODER_FORMAT:
        encoder, text_features = QualityEncoder.from_checkpoint(ckpt, path)
        encoder.to(device).eval()
        text_features = text_features.to(device)
        # Scored as Stage 1 validated it: its resize, crop size and number of grid crops.
        args = ckpt.get("args", {})
        resize = args.get("eval_resize", args.get("resize", DEFAULT_RESIZE))
        return Scorer(lambda x: encoder.score(x, text_features), "stage1", resize, args.get("crop_size", PATCH_SIZE),
                      args.get("eval_patch_num", DEFAULT_TEST_PATCH_NUM))
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    args = ckpt["args"]
    return Scorer(model, "stage2", other_dataset_resize(args["resize"]), args["patch_size"], args["test_patch_num"],
                  tuple(ckpt["mos_bounds"]))


def param_groups(model, args):
    """Encoder at ``--lr`` (``--lr_encoder_pretrained`` with ``--pretrained_encoder`` or ``--match_pretrained_lr``);
    the rest at lr × ratio."""
    encoder, head = model.encoder_parameters(), model.head_parameters()
    grouped = {id(p) for p in encoder} | {id(p) for p in head}
    if len(grouped) != len(encoder) + len(head) or grouped != {id(p) for p in model.parameters()}:
        raise ValueError("encoder_parameters() and head_parameters() must split the model's parameters exactly")
    encoder_lr = args.lr_encoder_pretrained if args.pretrained_encoder or args.match_pretrained_lr else args.lr
    return [
        {"name": "encoder", "params": encoder, "lr": encoder_lr},
        {"name": "head", "params": head, "lr": args.lr * args.lr_ratio},
    ]


def make_scheduler(optimizer, kind, total_steps, steps_per_epoch, step_epochs):
    """Per-optimizer-step schedule: cosine to 1%, constant, or ×0.1 every ``step_epochs`` epochs."""
    if kind == "cosine":
        return cosine_schedule(optimizer, total_steps, FINAL_LR_RATIO)
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if kind == "step":
        period = max(1, step_epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: STEP_LR_GAMMA ** (step // period))
    raise UserError(f"--lr_scheduler '{kind}' is not one of {', '.join(SCHEDULERS)}")


# ----------------------------------------------------------------------------- outputs

def describe_resize(resize):
    if isinstance(resize, (list, tuple)):
        return f"{resize[0]}x{resize[1]} (width x height, bilinear)"
    return "native size" if resize == 0 else f"shorter side {resize} (aspect kept, bicubic)"


def protocol_record(args):
    """What produced a run's numbers, stored beside them in results.json (``protocol``)."""
    rounds = args.train_test_num
    return {
        "name": args.protocol,
        "train_patch_num": args.train_patch_num,
        "test_patch_num": args.test_patch_num,
        "test_crops": "random" if args.test_random_crop else "grid",
        "resize": describe_resize(args.resize),
        "label": label_column(args.dataset, args.protocol, args.score_col),
        # HyperIQA regresses the raw label; the rescaling is linear, so no reported metric depends on it.
        "targets": "label rescaled to [0, 1] with the training split's range",
        "split": split_source(args.dataset, args.data_root, split_file=args.split_file, protocol=args.protocol),
        "split_seed": args.split_seed,
        "rounds": rounds,
        "reported": f"median over {rounds} rounds (mean and std beside it)" if rounds > 1 else "one round",
        "selection": "validation",
    }


def write_split(path, samples):
    """The split used, as a ``--split_file`` JSON ({"train": [names], "val": [...], "test": [...]})."""
    atomic_write_json(path, {split: [os.path.basename(s.path) for s in samples if s.split == split]
                             for split in ("train", "val", "test")})


# ----------------------------------------------------------------------------- solver

class HyperIQASolver:
    def __init__(self, args, train_samples, val_samples, test_samples, dist_info, run_dir, *,
                 bounds=None, cross_sets=None, resume_from=None):
        self.args = args
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = run_dir
        self.cross_sets = cross_sets or {}
        self.amp = amp_dtype(args.amp, self.device)
        self.bounds = tuple(bounds if bounds is not None else mos_bounds(train_samples))
        seed_everything(args.seed + dist_info.rank, args.deterministic)

        self.model = build_model(vars(args), load_backbone=resume_from is None)
        if args.pretrained_encoder and resume_from is None:
            n = self.model.load_pretrained_encoder(args.pretrained_encoder)
            self.log(f"loaded {n} encoder tensors from {args.pretrained_encoder}")
        self.model.to(self.device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_adamw(param_groups(self.model, args), self.device, weight_decay=args.weight_decay)
        self.scaler = make_grad_scaler(self.device, self.amp)
        self.loss_fn = LOSSES[args.loss_type]

        on_device = args.cache_on_device
        images = cache_images(train_samples, args.resize, args.patch_size, threads=decode_threads(dist_info.world_size),
                              device=self.device if on_device else None, desc="decode train",
                              progress=dist_info.is_main)
        targets = normalize_mos(np.array([s.mos for s in train_samples], dtype=np.float64), self.bounds)
        self.train_set = TrainPatchDataset(images, targets, args.train_patch_num, args.patch_size, args.seed)
        self.sampler = DistributedSampler(self.train_set, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                          shuffle=True, seed=args.seed)
        self.train_loader = make_loader(self.train_set, args.batch_size, args.num_workers, self.device, self.sampler)
        self.val_set = make_eval_set("val", val_samples, args.resize, args.patch_size, dist_info,
                                     bounds=self.bounds, on_device=on_device)
        self.test_set = make_eval_set("test", test_samples, args.resize, args.patch_size, dist_info,
                                      bounds=self.bounds, on_device=on_device)
        self.eval_opts = EvalOptions(args.test_patch_num, args.patch_size, args.batch_size, self.amp,
                                     args.channels_last, args.num_workers, args.test_random_crop, args.seed)

        self.steps_per_epoch = -(-len(self.train_loader) // args.grad_accum)
        self.scheduler = make_scheduler(self.optimizer, args.lr_scheduler, args.epochs * self.steps_per_epoch,
                                        self.steps_per_epoch, args.lr_step_epochs)
        self.epoch, self.best, self.history = 0, None, []
        # Construction writes nothing (the caller creates the run directory once it succeeded);
        # a fresh run writes its split when training starts.
        self.split_samples = None if resume_from is not None else [*train_samples, *val_samples, *test_samples]
        if resume_from is not None:
            self.load_checkpoint(resume_from)

        net = self.model
        if dist_info.enabled:
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = torch.compile(net) if args.compile else net

    def log(self, message):
        if self.dist.is_main:
            tqdm.write(message)

    def path(self, name):
        return os.path.join(self.run_dir, name)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self):
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "args": dict(vars(self.args)),
            "mos_bounds": list(self.bounds),
            "rng": self.gather_rng(),
            "best": self.best,
            "history": self.history,
        }

    def gather_rng(self):
        """RNG state of every rank (index = rank), so a resumed DDP run keeps per-rank streams."""
        if not self.dist.enabled:
            return [rng_state()]
        states = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, rng_state())
        return states

    def load_checkpoint(self, path):
        ckpt = safe_load(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"--resume '{path}' is not a train_swin.py checkpoint; pass a run directory or its last.pt")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when saved by a disabled (non-fp16) scaler
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.best, self.history = ckpt["epoch"], ckpt["best"], ckpt["history"]
        set_rng_state(ckpt["rng"][self.dist.rank % len(ckpt["rng"])])
        self.log(f"resumed from {path} after epoch {self.epoch}")

    def save_checkpoints(self, is_best):
        state = self.checkpoint()
        if self.dist.is_main:
            atomic_torch_save(state, self.path("last.pt"))
            if is_best:  # a kill before this line is repaired on resume (see ``train``)
                atomic_torch_save(state, self.path("best.pt"))
        barrier(self.dist)

    # ------------------------------------------------------------------ training

    def kept(self):
        """The checkpoint a run stopped now leaves to --resume from (``self.epoch`` = last saved epoch)."""
        return f"last.pt (epoch {self.epoch})" if self.epoch else "no checkpoint (first epoch)"

    def check_finite(self, loss, epoch, step):
        loss = all_reduce_mean({"loss": loss}, self.dist)["loss"]
        if not np.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss} at epoch {epoch} step {step}; stopped, keeping {self.kept()} in "
                f"{self.run_dir}; lower --lr / --lr_ratio or use --amp bf16/off, then --resume or restart"
            )
        return loss

    def train_one_epoch(self, epoch):
        args = self.args
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.net.train()
        total = torch.zeros((), device=self.device)
        n_batches = len(self.train_loader)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{args.epochs}", disable=not self.dist.is_main,
                   leave=False)
        for step, (patches, targets) in enumerate(bar, start=1):
            x = to_model_input(patches, self.device, args.channels_last)
            y = targets.to(self.device, non_blocking=True)
            update = step % args.grad_accum == 0 or step == n_batches
            sync = contextlib.nullcontext() if update or not self.dist.enabled else self.net.no_sync()
            with sync:
                with autocast(self.device, self.amp):
                    pred = self.net(x)
                loss = self.loss_fn(pred.float(), y)
                self.scaler.scale(loss / args.grad_accum).backward()
            if update:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            total += loss.detach()
            if step % args.log_every == 0:
                bar.set_postfix(loss=f"{self.check_finite(total.item() / step, epoch, step):.4f}")
        loss = self.check_finite(total.item() / n_batches, epoch, n_batches)
        # The epoch's last update can blow the weights up before any loss shows it.
        bad = first_nonfinite_parameter(self.model)
        if bad is not None:
            raise NonFiniteLossError(f"weights became non-finite ({bad}) in epoch {epoch}; stopped, keeping "
                                     f"{self.kept()} in {self.run_dir}; lower --lr / --lr_ratio or use --amp bf16/off")
        return loss

    def should_stop(self):
        if self.args.no_early_stopping or self.best is None:
            return False
        return self.epoch - self.best["epoch"] >= self.args.patience

    def train(self):
        """Train to ``--epochs`` (or early stop), then evaluate; returns the results dict."""
        if self.split_samples is None:  # resumed
            if self.dist.is_main:  # the log mirrors the checkpoint's history, whatever a kill left in it
                write_jsonl(self.path("log.jsonl"), self.history)
            if self.best is not None and self.best["epoch"] == self.epoch:
                self.save_checkpoints(is_best=True)  # last.pt is the best state; best.pt may have missed it
        elif self.dist.is_main:
            write_split(self.path("split.json"), self.split_samples)
        while self.epoch < self.args.epochs and not self.should_stop():
            start = time.time()
            epoch = self.epoch + 1
            train_loss = self.train_one_epoch(epoch)
            val, _ = evaluate(self.model.eval(), self.val_set, self.dist, self.eval_opts)
            is_best = self.best is None or val["srcc"] > self.best["val"]["srcc"]
            if is_best:
                self.best = {"epoch": epoch, "val": val}
            record = {
                "epoch": epoch, "train_loss": train_loss,
                "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
                "val": val, "is_best": is_best, "epoch_time_s": round(time.time() - start, 3),
            }
            self.epoch = epoch
            self.history.append(record)
            self.save_checkpoints(is_best)
            if self.dist.is_main:
                append_jsonl(self.path("log.jsonl"), record)
                plots.plot_training_curves(self.history, self.path("curves.png"), title=self.title())
            self.log(f"epoch {epoch}: loss {train_loss:.4f}  val SRCC {val['srcc']:.4f} PLCC {val['plcc']:.4f}"
                     f"{'  (best)' if is_best else ''}  {record['epoch_time_s']:.1f}s")
        if self.should_stop():
            self.log(f"early stop: no val SRCC gain for {self.args.patience} epochs (best epoch {self.best['epoch']})")
        return self.finish()

    def title(self):
        return f"Swin-{self.args.model_size} HyperIQA on {self.args.dataset}"

    def finish(self):
        """Test with the last and the selected (best-val) weights, cross-dataset with the selected ones."""
        model = self.model.eval()
        test_last, _ = evaluate(model, self.test_set, self.dist, self.eval_opts)
        model.load_state_dict(safe_load(self.path("best.pt"))["model"])
        test, pred = evaluate(model, self.test_set, self.dist, self.eval_opts)
        outputs = [("test", self.test_set, test, pred)]
        cross = {}
        for name, eval_set in self.cross_sets.items():
            cross[name], cross_pred = evaluate(model, eval_set, self.dist, self.eval_opts)
            outputs.append((name, eval_set, cross[name], cross_pred))
        results = {
            "dataset": self.args.dataset, "model_size": self.args.model_size, "protocol": protocol_record(self.args),
            "best_epoch": self.best["epoch"], "val": self.best["val"],
            "test": test, "test_last": test_last, "cross_dataset": cross,
        }
        if self.dist.is_main:
            for label, eval_set, metrics, pred in outputs:
                save_eval_outputs(self.run_dir, label, eval_set, metrics, pred)
            atomic_write_json(self.path("results.json"), results)
        self.log(f"test (best epoch {self.best['epoch']}): SRCC {test['srcc']:.4f} PLCC {test['plcc']:.4f}; "
                 f"last epoch: SRCC {test_last['srcc']:.4f} PLCC {test_last['plcc']:.4f}")
        return results
