"""Hooks: *what* happens at the moments the loop (``loop.py``) picks.

A hook is a small object; the loop calls each of these methods on every hook, in
the order of the hook list.  All of them are optional (the base class does nothing):

========================================  ==================================================
``setup(trainer) -> dict``                once, inside the strategy scope, before the
                                          checkpoint is built: the hook's state variables.
                                          They are checkpointed (and broadcast under
                                          Horovod), so exact resume covers them.
``begin(loop)``                           a session starts, after restore
``limit(loop, step) -> int | None``       before each compiled call: the most steps it may run
``stop_reason(loop) -> str | None``       before each call: this worker's reason to stop
                                          after it (summed over workers with the step)
``save_due(loop, step) -> bool``          before each call: checkpoint after it, at ``step``
``after_steps(loop, step, sums, secs)``   after each call (sums: loss sum, correct, count)
``epoch_end(loop, row) -> str | None``    after validation at an epoch's end; ``row`` is the
                                          metrics.csv row; a string stops the run (finished)
``saved(loop, saved, stopping)``          after the loop saved a checkpoint
``end(loop, reason)``                     the loop returned ``reason``; after the final save,
                                          before the test evaluation and the export
``summary(loop) -> dict``                 fields for run.json at the session's end
========================================  ==================================================

A new feature is a new hook, passed as ``Trainer(..., hooks=[...])`` or
``train(..., hooks=[...])``: the loop does not change.
"""
from __future__ import annotations

import math
import os
import time

from .. import report
from ..rundir import atomic_path

FINISHED = ("finished", "early_stopping")  # reasons that end the run for good


class Hook:
    def setup(self, trainer) -> dict:
        return {}

    def begin(self, loop):
        pass

    def limit(self, loop, step: int) -> int | None:
        return None

    def stop_reason(self, loop) -> str | None:
        return None

    def save_due(self, loop, step: int) -> bool:
        return False

    def after_steps(self, loop, step: int, sums, seconds: float):
        pass

    def epoch_end(self, loop, row: dict) -> str | None:
        return None

    def saved(self, loop, saved, stopping: bool):
        pass

    def end(self, loop, reason: str):
        pass

    def summary(self, loop) -> dict:
        return {}


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
        self.progress = report.Progress(t.steps_per_epoch, t.cfg.training.epochs, t.cfg.training.log_every_steps,
                                        t.verbose)
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


def _better(value: float, best: float, direction: str, min_delta: float) -> bool:
    if math.isnan(best):
        return True
    return value < best - min_delta if direction == "min" else value > best + min_delta


class BestMetric(Hook):
    """Tracks the best value of ``training.early_stopping.monitor``; with a patience,
    keeps the best weights, stops after ``patience`` epochs without improvement and
    restores the best weights at the end."""

    def setup(self, trainer):
        tf = trainer.tf
        self.es = trainer.cfg.training.early_stopping
        self.path = os.path.join(trainer.run_dir.checkpoints, "best.weights.h5")
        self.best = tf.Variable(float("nan"), dtype=tf.float64, trainable=False, name="best")
        self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="best_epoch")
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="wait")
        return dict(best=self.best, best_epoch=self.best_epoch, wait=self.wait)

    def epoch_end(self, loop, row):
        es, t = self.es, loop.trainer
        value = row.get(es.monitor)
        if value is None:
            return None
        if _better(value, float(self.best.numpy()), es.direction, es.min_delta):
            self.best.assign(value)
            self.best_epoch.assign(row["epoch"])
            self.wait.assign(0)
            if es.patience is not None and t.run_dir.writer:
                with atomic_path(self.path) as tmp:
                    t.model.save_weights(tmp)
            return None
        self.wait.assign_add(1)
        if es.patience is not None and int(self.wait.numpy()) >= es.patience:
            t.say(f"early stopping: {es.monitor} has not improved for {es.patience} epochs "
                  f"(best {float(self.best.numpy()):.4f} at epoch {int(self.best_epoch.numpy())})")
            return "early_stopping"
        return None

    def end(self, loop, reason):
        if reason in FINISHED and self.es.patience is not None and self.es.restore_best \
                and os.path.exists(self.path):
            loop.trainer.model.load_weights(self.path)
            loop.trainer.say(f"restored the best weights (epoch {int(self.best_epoch.numpy())})")

    def summary(self, loop):
        best = float(self.best.numpy())
        return dict(best=None if math.isnan(best) else best, best_epoch=int(self.best_epoch.numpy()) or None,
                    monitor=self.es.monitor)


class CheckpointCadence(Hook):
    """Checkpoints every ``checkpoint.every_steps`` (calls are cut to land on them) and
    every ``checkpoint.every_minutes``."""

    def limit(self, loop, step):
        every = loop.trainer.cfg.checkpoint.every_steps
        return every - step % every if every else None

    def save_due(self, loop, step):
        return loop.trainer.checkpoints.due(step)


class StopSignals(Hook):
    """Stop on SIGUSR1/SIGTERM (the loop's StopFlag) and before the time budget or the
    Slurm job's end, leaving room for the final checkpoint."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline  # time.monotonic() value, or None

    def stop_reason(self, loop):
        if loop.stop.signal:
            return loop.stop.signal
        if self.deadline is not None:
            margin = 1.5 * loop.trainer.checkpoints.expected_save_seconds + 3 * loop.call_seconds + 1.0
            if time.monotonic() + margin >= self.deadline:
                return "time_budget"
        return None


def default_hooks(deadline: float | None) -> list[Hook]:
    """The built-in hooks, in the order they act at each moment."""
    return [MetricsCSV(), TensorBoard(), Progress(), BestMetric(), CheckpointCadence(), StopSignals(deadline)]
