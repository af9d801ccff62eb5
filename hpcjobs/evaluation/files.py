"""The plots a run leaves: the training curves (plots/training.png) and a confusion matrix."""
from __future__ import annotations

import os


def plot_training(rows: list[dict], path: str):
    """Loss and accuracy per epoch (train vs validation) and the learning rate, to a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..rundir import atomic_path

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    lr = axes[2]
    lr.plot(epochs, [r.get("lr") for r in rows], "o-", color="tab:green")
    lr.set_xlabel("epoch")
    lr.set_ylabel("learning rate")
    lr.set_yscale("log")
    lr.grid(alpha=0.3)
    starts = [r["epoch"] - 0.5 for a, r in zip(rows, rows[1:]) if r.get("stage") != a.get("stage")]
    for ax in axes:  # where each stage of a staged run begins
        for x in starts:
            ax.axvline(x, color="grey", linestyle="--", linewidth=1)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r.get(key) for r in rows], "o-", label="train")
        if any("val_" + key in r for r in rows):
            ax.plot(epochs, [r.get("val_" + key) for r in rows], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_confusion(confusion, class_names, path: str):
    """A confusion matrix (rows true, columns predicted) with class names, to a PNG
    (written atomically); counts in the cells up to 30 classes, names up to 60."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..rundir import atomic_path

    cm = np.asarray(confusion)
    n = len(cm)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    if n <= 60:
        ax.set_xticks(range(n), [str(c) for c in class_names], rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), [str(c) for c in class_names])
    if n <= 30:
        top = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > top / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({int(cm.sum())} images)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
