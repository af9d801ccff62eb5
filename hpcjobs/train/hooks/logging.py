"""Hooks that log: metrics.csv, TensorBoard, and the progress lines."""
from __future__ import annotations

import os
import time

from ...evaluation import files as report
from .base import Hook


class MetricsCSV(Hook):
    """Rewrites metrics.csv (atomically) with every epoch's row."""

    def epoch_end(self, loop, row):
        loop.trainer.run_dir.write_metrics(loop.history)


class TensorBoard(Hook):
    """The epoch's scalars in RUN/tensorboard (the chief only)."""

    def begin(self, loop):
        rd = loop.trainer.run_dir
        self.board = report.TensorBoard(rd.tensorboard, rd.writer)

    def epoch_end(self, loop, row):
        self.board.scalars(row["step"], row)


class Progress(Hook):
    """A bar on a terminal, else a line every ``log_every_steps`` (with an ETA), an
    epoch line, and a line for each checkpoint in the logs."""

    def begin(self, loop):
        t = loop.trainer
        self.progress = report.Progress(t.steps_per_epoch, t.epochs, t.cfg.training.log_every_steps,
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
