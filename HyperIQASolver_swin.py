"""Stage-2 training and evaluation of Swin-HyperIQA (docs/method.md).

``HyperIQASolver`` fine-tunes on MOS rescaled to [0, 1] with the MOS range of the training split
only (val/test MOS never leak into the targets), under either ``--protocol``:

* differential learning rates: the Swin encoder at ``--lr`` (or ``--lr_encoder_pretrained``
  when starting from a Stage-1 encoder), everything else at ``--lr × --lr_ratio``; AdamW; the
  schedule steps per optimizer step and (cosine) ends at 1% of each group's own LR;
* model selection on the **validation** split (best SRCC, early stopping with ``--patience``);
  the test split is evaluated once training ends, with the selected weights (``test``) and the
  last ones (``test_last``), so it can never influence the choice;
* ``last.pt`` every epoch and ``best.pt`` at each improvement: the training state both stages
  share (``iqa.training_run``) plus ``best`` ({epoch, val}) and ``mos_bounds``.  The crops of an
  epoch depend only on (seed, epoch), so a resumed run continues exactly where an uninterrupted
  one would be;
* DDP under torchrun (rank 0 writes), AMP, channels-last, ``torch.compile``, gradient
  accumulation; the loss is only read back from the device every ``--log_every`` steps;
  ``--tensorboard`` scalars under the run (round) directory.

Val/test predictions are reported on the training MOS scale (a score p becomes lo + p·(hi − lo)
with the training split's range, so they may fall slightly outside the val/test MOS range) with
the raw ``rmse`` in MOS units; cross-dataset sets report ``rmse_logistic`` only (see
``iqa.evaluation``).  Scoring images with a saved checkpoint is ``iqa.scoring``'s job.
"""
import contextlib
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from iqa import plots
from iqa.datasets import label_column, mos_bounds, normalize_mos, split_source
from iqa.evaluation import EvalOptions, evaluate, make_eval_set, save_eval_outputs
from iqa.patches import TrainPatchDataset, cache_images, decode_threads, make_loader, to_model_input
from iqa.runtime import (
    UserError, amp_dtype, append_jsonl, atomic_write_json, autocast, cosine_schedule, make_adamw, make_grad_scaler,
    safe_load, seed_everything, write_jsonl,
)
from iqa.training_run import (
    LossMonitor, ScalarLog, check_finite_weights, read_training_state, restore_training_state, save_training_state,
    training_state,
)
from iqa.training_run import NonFiniteError as NonFiniteLossError  # noqa: F401  (the name callers know)
from models.hyperiqa_swin import CHECKPOINT_FORMAT, build_model

PATCH_SIZE = 224          # the Swin backbones take 224×224 inputs
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
NON_FINITE_ADVICE = "a smaller --lr / --lr_ratio or --amp bf16/off"


# ----------------------------------------------------------------------------- optimisation

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
        images = cache_images(train_samples, args.resize, args.patch_size,
                              threads=decode_threads(dist_info.local_world_size),
                              device=self.device if on_device else None, desc="decode train",
                              progress=dist_info.is_main)
        targets = normalize_mos(np.array([s.mos for s in train_samples], dtype=np.float64), self.bounds)
        self.train_set = TrainPatchDataset(images, targets, args.train_patch_num, args.patch_size, args.seed)
        self.sampler = DistributedSampler(self.train_set, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                          shuffle=True, seed=args.seed)
        self.train_loader = make_loader(self.train_set, args.batch_size, args.num_workers, self.device,
                                        sampler=self.sampler)
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
        self.scalar_log = ScalarLog(run_dir, args.tensorboard and dist_info.is_main)
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
        """The training state after ``self.epoch`` (collective: every rank calls it)."""
        return training_state(CHECKPOINT_FORMAT, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                              scaler=self.scaler, epoch=self.epoch, args=self.args, history=self.history,
                              dist_info=self.dist, mos_bounds=list(self.bounds), best=self.best)

    def load_checkpoint(self, path):
        state = read_training_state(path, CHECKPOINT_FORMAT, "train_swin.py")
        note = restore_training_state(state, self.dist, model=self.model, optimizer=self.optimizer,
                                      scheduler=self.scheduler, scaler=self.scaler)
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        self.log(f"resumed from {path} after epoch {self.epoch}")
        if note:
            self.log(note)

    def save_checkpoints(self, is_best):
        # A kill between the two writes is repaired on resume (see ``train``).
        paths = [self.path("last.pt"), *([self.path("best.pt")] if is_best else [])]
        save_training_state(self.checkpoint(), paths, self.dist)

    # ------------------------------------------------------------------ training

    def train_one_epoch(self, epoch):
        """Train epoch ``epoch`` (1-based) -> its mean loss over ranks."""
        args = self.args
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.net.train()
        monitor = LossMonitor(("loss",), self.device, self.dist, args.log_every, epoch=epoch, run_dir=self.run_dir,
                              advice=NON_FINITE_ADVICE)
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
            running = monitor.add(loss)
            if running is not None:
                bar.set_postfix(loss=f"{running['loss']:.4f}")
                self.scalar_log.add({"loss": running["loss"], "lr": self.learning_rates()},
                                    (epoch - 1) * n_batches + step, prefix="step/")
        loss = monitor.read()["loss"]
        check_finite_weights(self.model, epoch, self.run_dir, NON_FINITE_ADVICE)
        return loss

    def learning_rates(self):
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

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
                "lr": self.learning_rates(),
                "val": val, "is_best": is_best, "epoch_time_s": round(time.time() - start, 3),
            }
            self.epoch = epoch
            self.history.append(record)
            self.save_checkpoints(is_best)
            if self.dist.is_main:
                append_jsonl(self.path("log.jsonl"), record)
                self.scalar_log.add_record(record)
                plots.plot_training_curves(self.history, self.path("curves.png"), title=self.title())
            self.log(f"epoch {epoch}: loss {train_loss:.4f}  val SRCC {val['srcc']:.4f} PLCC {val['plcc']:.4f}"
                     f"{'  (best)' if is_best else ''}  {record['epoch_time_s']:.1f}s")
        self.scalar_log.close()
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
