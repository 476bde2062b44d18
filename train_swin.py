"""Stage 2: fine-tune Swin-HyperIQA on MOS-labelled data (docs/method.md).

The original recipe's commands run as written, e.g.

    python train_swin.py --dataset koniq-10k --model_size base --epochs 50 --use_multiscale --attention_fusion
    python train_swin.py --dataset koniq-10k --model_size base --epochs 50 --use_multiscale --attention_fusion \\
        --pretrained_encoder checkpoints/qualiclip_pretrain_*/swin_base_qualiclip_pretrained.pkl \\
        --lr_encoder_pretrained 1e-6

``--protocol hyperiqa`` evaluates as HyperIQA's published code does (25 random train and test crops,
its resize and label per dataset, 80/20 splits over 10 rounds, the median reported), except that
the epoch is selected on a validation part of the training 80%.

Multi-GPU: ``torchrun --nproc_per_node=N train_swin.py ...`` (same flags; ``--batch_size`` is per GPU).
A run directory holds args.json, split.json, log.jsonl, last.pt, best.pt, results.json, the
predictions CSVs and PNG plots; ``--resume RUN_DIR`` continues a killed run.
The flags, their ``--protocol`` defaults and their checks are in ``iqa.finetune_args``.
"""
import argparse
import json
import os

import numpy as np

from HyperIQASolver_swin import HyperIQASolver, protocol_record
from iqa.datasets import DEFAULT_SPLIT_SEED, read_index, select_split
from iqa.distributed import barrier, broadcast_object, check_on_main, distributed_session
from iqa.evaluation import make_eval_set, parse_dataset_specs
from iqa.finetune_args import check_args, get_args_parser
from iqa.runtime import (
    UserError, atomic_write_json, check_output_dir, prepare_output_dir, run_cli, safe_load, save_args, timestamp,
)
from iqa.scoring import other_dataset_resize
from iqa.training_run import resolve_resume
from models.hyperiqa_swin import CHECKPOINT_FORMAT
from models.quality_encoder import ENCODER_FORMAT

ROUND_DIR = r"round_\d+"


def split_seed_of_old_runs(stored):
    """Runs from before --split_seed split by --seed."""
    return {"split_seed": stored.get("seed", DEFAULT_SPLIT_SEED), **stored}


# ----------------------------------------------------------------------------- rounds

def round_checkpoint(round_dir, explicit):
    """The checkpoint a resumed round continues from: the one given if it is in this round, else last.pt."""
    if explicit and os.path.dirname(os.path.abspath(explicit)) == os.path.abspath(round_dir):
        return explicit
    last = os.path.join(round_dir, "last.pt")
    return last if os.path.isfile(last) else None


def round_solver(args, round_dir, dist_info, splits, cross_sets, explicit_ckpt):
    """The round's solver (images decoded, model built, checkpoint loaded; nothing written yet),
    or None when the round already finished."""
    if os.path.isfile(os.path.join(round_dir, "results.json")):
        return None
    ckpt = round_checkpoint(round_dir, explicit_ckpt) if args.resume else None
    _, train_set, val_set, test_set = splits
    return HyperIQASolver(args, train_set, val_set, test_set, dist_info, round_dir, cross_sets=cross_sets,
                          resume_from=ckpt)


def round_results(solver, round_dir, dist_info):
    if solver is not None:
        return solver.train()
    if dist_info.is_main:
        print(f"{round_dir} already finished; reading its results.json")
    with open(os.path.join(round_dir, "results.json")) as f:
        return json.load(f)


def summarize(rounds):
    """{block: {metric: {median, mean, std}}} over rounds (std: the sample standard deviation, ddof 1), for
    val/test/test_last and each cross dataset (every metric the blocks hold: cross-dataset blocks have no raw
    rmse)."""
    def stats(blocks):
        return {m: {"median": float(np.median([b[m] for b in blocks])), "mean": float(np.mean([b[m] for b in blocks])),
                    "std": float(np.std([b[m] for b in blocks], ddof=1))} for m in blocks[0] if m != "n"}

    summary = {key: stats([r[key] for r in rounds]) for key in ("val", "test", "test_last")}
    summary["cross_dataset"] = {name: stats([r["cross_dataset"][name] for r in rounds])
                                for name in rounds[0]["cross_dataset"]}
    return summary


def split_dataset(samples, dataset):
    """(all samples, train, val, test); an empty split is a UserError."""
    return (samples, *(select_split(samples, split, dataset) for split in ("train", "val", "test")))


def read_dataset(args, split_seed):
    return read_index(args.dataset, args.data_root, seed=split_seed, split_file=args.split_file,
                      image_col=args.image_col, score_col=args.score_col, protocol=args.protocol)


def pretrained_images(path):
    """(names the Stage-1 encoder trained on, its args) from its .pkl; (None, {}) when it does not say."""
    ckpt = safe_load(path, "--pretrained_encoder")
    if isinstance(ckpt, dict) and ckpt.get("format") == ENCODER_FORMAT and "train_images" in ckpt:
        return list(ckpt["train_images"]), ckpt.get("args", {})
    return None, {}


def check_pretrain_overlap(args, round_splits):
    """Refuse a fine-tune whose validation or test images the Stage-1 encoder was trained on.

    Images are matched by file name, so the same image is found under another root or resolution
    folder (KonIQ's 1024x768/ and 512x384/).  ``round_splits``: the (samples, train, val, test)
    of every round.
    """
    if not args.pretrained_encoder:
        return
    trained, stage1_args = pretrained_images(args.pretrained_encoder)
    if trained is None:
        print(f"note: --pretrained_encoder '{args.pretrained_encoder}' does not list the images it was trained on; "
              f"the overlap with the validation/test images cannot be checked")
        return
    trained = {os.path.basename(name) for name in trained}
    held_out = {s.path: s for _, _, val, test in round_splits for s in (*val, *test)}
    overlap = sorted(path for path in held_out if os.path.basename(path) in trained)
    if not overlap:
        return
    message = (f"--pretrained_encoder '{args.pretrained_encoder}' was trained on {len(overlap)} of the "
               f"{len(held_out)} validation/test images of {args.dataset} (e.g. {os.path.basename(overlap[0])})")
    if args.allow_pretrain_overlap:
        print(f"warning: {message}; continuing because of --allow_pretrain_overlap: the validation and test "
              f"numbers of this run are not a clean evaluation")
        return
    same_seed, same_protocol = stage1_args.get("split_seed"), stage1_args.get("protocol", "ours")
    if same_protocol != args.protocol:
        advice = f"use Stage 1's protocol (--protocol {same_protocol}) and split seed"
    elif same_seed is not None and same_seed != args.split_seed:
        advice = f"use Stage 1's split (--split_seed {same_seed})"
    else:
        advice = "use the split Stage 1 used"
    raise UserError(f"{message}; {advice}, a --split_file or the official koniq10k_distributions_sets.csv "
                    f"that keeps them apart, pretrain on other images, or pass --allow_pretrain_overlap to "
                    f"accept it knowingly")


def train(args, dist_info):
    if args.resume:
        resume = resolve_resume(args, get_args_parser(), "train_swin.py", CHECKPOINT_FORMAT, subrun=ROUND_DIR,
                                upgrade=split_seed_of_old_runs)
        args, run_dir, explicit_ckpt = resume.args, resume.run_dir, resume.checkpoint
    else:
        check_args(args)
        default_dir = os.path.join("runs", f"train_swin_{args.dataset}_{args.model_size}_{timestamp()}")
        run_dir, explicit_ckpt = broadcast_object(args.output_dir or default_dir, dist_info), None
        check_on_main(lambda: check_output_dir(run_dir), dist_info)
    # Nothing is written before the annotations, the splits, every image (decoded into the
    # caches) and the model / checkpoint files have been checked: a mistake leaves no half-made run.
    round_args = [argparse.Namespace(**{**vars(args), "seed": args.seed + k, "split_seed": args.split_seed + k})
                  for k in range(args.train_test_num)]
    round_splits = [split_dataset(read_dataset(args, r.split_seed), args.dataset) for r in round_args]
    check_pretrain_overlap(args, round_splits)
    cross_samples = {name: read_index(name, root)
                     for name, root in parse_dataset_specs(args.cross_datasets, "--cross_datasets").items()}
    cross_sets = {name: make_eval_set(name, samples, other_dataset_resize(args.resize), args.patch_size, dist_info,
                                      on_device=args.cache_on_device)
                  for name, samples in cross_samples.items()}
    rounds = []
    for k, (this_round, splits) in enumerate(zip(round_args, round_splits)):
        round_dir = run_dir if args.train_test_num == 1 else os.path.join(run_dir, f"round_{k + 1}")
        solver = round_solver(this_round, round_dir, dist_info, splits, cross_sets, explicit_ckpt)
        if dist_info.is_main:
            if k == 0:
                prepare_output_dir(run_dir, resume=bool(args.resume))
                if not args.resume:
                    save_args(run_dir, args)
                print(f"run directory: {run_dir}")
                print(f"protocol {args.protocol}: {json.dumps(protocol_record(args))}")
            if args.train_test_num > 1:
                prepare_output_dir(round_dir, resume=bool(args.resume))
                if not os.path.isfile(os.path.join(round_dir, "args.json")):
                    save_args(round_dir, this_round)
        barrier(dist_info)
        results = round_results(solver, round_dir, dist_info)
        rounds.append({"round": k + 1, "seed": this_round.seed, "split_seed": this_round.split_seed, "dir": round_dir,
                       **results})

    if args.train_test_num > 1:
        summary = summarize(rounds)
        if dist_info.is_main:
            atomic_write_json(os.path.join(run_dir, "results.json"), {
                "dataset": args.dataset, "model_size": args.model_size, "train_test_num": args.train_test_num,
                "protocol": protocol_record(args), "rounds": rounds, "summary": summary,
            })
            test = summary["test"]
            print(f"test over {args.train_test_num} rounds (protocol {args.protocol}): "
                  + ", ".join(f"{m.upper()} median {test[m]['median']:.4f} (mean {test[m]['mean']:.4f} ± sample std "
                              f"{test[m]['std']:.4f})" for m in ("srcc", "plcc")))
    if dist_info.is_main:
        print(f"run directory: {run_dir}")
    return rounds


def main(args):
    with distributed_session(args.device) as dist_info:
        return train(args, dist_info)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
