"""What a person reads: progress lines or a bar, the summary, TensorBoard scalars and plots."""
from __future__ import annotations

import os
import sys
import time


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """A progress bar on a terminal; a line every ``every`` steps otherwise (Slurm logs)."""

    def __init__(self, steps_per_epoch: int, epochs: int, every: int, enabled: bool = True, stream=None,
                 tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.steps_per_epoch, self.epochs, self.every = steps_per_epoch, epochs, every
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.last_logged = None

    def say(self, text: str):
        if self.enabled:
            if self.tty:
                self.stream.write("\r\033[K")
            self.stream.write(text + "\n")
            self.stream.flush()

    def step(self, step: int, loss: float, accuracy: float, images_per_s: float, eta: float | None = None):
        if not self.enabled:
            return
        left = f" ETA {format_seconds(eta)}" if eta is not None else ""
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        k += 1
        if self.tty:
            width = 30
            done = int(width * k / self.steps_per_epoch)
            self.stream.write(f"\repoch {epoch + 1}/{self.epochs} [{'=' * done:<{width}}] {k}/{self.steps_per_epoch}"
                              f" loss {loss:.4f} acc {accuracy:.4f} {images_per_s:,.0f} img/s{left}")
            self.stream.flush()
        elif self.last_logged is None or step // self.every > self.last_logged // self.every:
            self.stream.write(f"step {step} epoch {epoch + 1}/{self.epochs} batch {k}/{self.steps_per_epoch} "
                              f"loss {loss:.4f} accuracy {accuracy:.4f} {images_per_s:,.0f} img/s{left}\n")
            self.stream.flush()
            self.last_logged = step

    def epoch(self, row: dict):
        val = "".join(f" {k} {row[k]:.4f}" for k in ("val_loss", "val_accuracy", "val_f1") if k in row)
        self.say(f"epoch {row['epoch']}/{self.epochs} step {row['step']} loss {row['loss']:.4f} "
                 f"accuracy {row['accuracy']:.4f}{val} lr {row['lr']:.3g} ({row['seconds']:.1f}s)")


class TensorBoard:
    def __init__(self, folder: str, enabled: bool = True):
        self.writer = None
        if enabled:
            import tensorflow as tf

            self.tf = tf
            self.writer = tf.summary.create_file_writer(folder)

    def scalars(self, step: int, values: dict):
        if self.writer is None:
            return
        with self.writer.as_default(step=step):
            for k, v in values.items():
                if k not in ("epoch", "step") and v is not None:
                    self.tf.summary.scalar(k, v)
        self.writer.flush()


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
