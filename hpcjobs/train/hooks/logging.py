"""Hooks that log, and what they write with: metrics.csv, TensorBoard scalars, a progress bar
on a terminal or lines in the logs."""
from __future__ import annotations

import os
import sys
import time

from .base import Hook


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLines:
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


class TensorBoardWriter:
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


class MetricsCSV(Hook):
    """Rewrites metrics.csv (atomically) with every epoch's row."""

    def epoch_end(self, loop, row):
        loop.trainer.run_dir.write_metrics(loop.history)


class TensorBoard(Hook):
    """The epoch's scalars in RUN/tensorboard (the chief only)."""

    def begin(self, loop):
        rd = loop.trainer.run_dir
        self.board = TensorBoardWriter(rd.tensorboard, rd.writer)

    def epoch_end(self, loop, row):
        self.board.scalars(row["step"], row)


class Progress(Hook):
    """A bar on a terminal, else a line every ``log_every_steps`` (with an ETA), an
    epoch line, and a line for each checkpoint in the logs."""

    def begin(self, loop):
        t = loop.trainer
        self.progress = ProgressLines(t.steps_per_epoch, t.epochs, t.cfg.training.log_every_steps,
                                        t.verbose, tty=None if t.info.terminal else False)
        self.start_step, self.t0 = loop.step, time.monotonic()

    def after_steps(self, loop, step, sums, seconds):
        e = loop.trainer.epoch_sums.numpy()
        done = step - self.start_step
        eta = (loop.trainer.total_steps - step) * (time.monotonic() - self.t0) / done if done else None
        self.progress.step(step, e[0] / e[2], e[1] / e[2], sums[2] / max(seconds, 1e-9), eta)

    def epoch_end(self, loop, row):
        self.progress.epoch(row)

    def saved(self, loop, saved, stopping):
        if not stopping and not self.progress.tty:  # a line in the logs, not on the bar
            self.progress.say(f"checkpoint {os.path.basename(saved.path)} ({saved.seconds:.2f}s)")
