"""PNG plots of a run (matplotlib, Agg backend: no display needed).

* ``plot_training_curves``: training losses, validation SRCC/PLCC and learning rates per epoch,
  from the per-epoch records of ``log.jsonl`` (both stages).
* ``plot_scatter``: predicted score against MOS for one test set, with SRCC/PLCC in the title.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from iqa.runtime import atomic_write_binary  # noqa: E402


def save_figure(fig, path):
    # savefig through the project's temp-file + rename, so a kill never leaves half a PNG.
    atomic_write_binary(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return os.fspath(path)


def plot_training_curves(records, path, title=""):
    """Per-epoch records of ``log.jsonl``: ``epoch``, ``train_*`` losses, ``lr`` ({group: lr}),
    optionally ``val`` (metrics) and ``is_best``.  Stage 1 logs its loss components as
    ``train_cons/pos/neg`` and has ``val`` only when it evaluates zero-shot."""
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    loss_keys = [k for k in records[0] if k.startswith("train_")] if records else []
    for key in loss_keys:
        axes[0].plot(epochs, [r[key] for r in records], marker="o", label=key.removeprefix("train_"))
    axes[0].set(title="training loss", xlabel="epoch")
    axes[0].legend()
    val_records = [r for r in records if r.get("val")]
    for key in ("srcc", "plcc"):
        axes[1].plot([r["epoch"] for r in val_records], [r["val"][key] for r in val_records], marker="o",
                     label=f"val {key.upper()}")
    best = [r["epoch"] for r in records if r.get("is_best")]
    if best:
        axes[1].axvline(best[-1], color="gray", linestyle="--", label=f"selected epoch {best[-1]}")
    axes[1].set(title="validation" if val_records else "validation (none)", xlabel="epoch")
    if val_records:
        axes[1].legend()
    for group in records[0]["lr"] if records else ():
        axes[2].plot(epochs, [r["lr"][group] for r in records], marker="o", label=group)
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_scatter(pred, mos, path, title="", metrics=None):
    """Predicted score vs MOS; ``metrics`` (``all_metrics`` dict) adds SRCC/PLCC to the title."""
    pred, mos = np.asarray(pred, dtype=float), np.asarray(mos, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(mos, pred, s=8, alpha=0.5)
    ax.set(xlabel="MOS", ylabel="predicted")
    if metrics:
        title = f"{title}\nSRCC {metrics['srcc']:.4f}  PLCC {metrics['plcc']:.4f}  n={metrics['n']}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
