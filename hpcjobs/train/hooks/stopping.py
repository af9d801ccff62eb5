"""When to stop or save: signals and the time budget, metric targets, the checkpoint cadence,
and the learning rate on a plateau."""
from __future__ import annotations

import time

from ...config import direction
from .base import Hook, _better


class CheckpointCadence(Hook):
    """Checkpoints every ``checkpoint.every_steps`` (calls are cut to land on them), every
    ``checkpoint.every_minutes`` and at the end of every ``checkpoint.every_epochs``-th epoch."""

    def limit(self, loop, step):
        every = loop.trainer.cfg.checkpoint.every_steps
        return every - step % every if every else None

    def save_due(self, loop, step):
        t = loop.trainer
        epochs = t.cfg.checkpoint.every_epochs
        return t.checkpoints.due(step) or bool(epochs) and step % (epochs * t.steps_per_epoch) == 0


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


class ReduceOnPlateau(Hook):
    """``optimizer.reduce_on_plateau``: multiply the learning rate by ``factor`` when the
    monitored metric has not improved for ``patience`` epochs (not below ``min_lr``).
    The factor, the best value and the epochs waited are checkpointed."""

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, trainer):
        tf = trainer.tf
        self.factor = trainer.lr_factor  # the schedule is multiplied by it (optim.make_optimizer)
        self.best = tf.Variable(float("nan"), dtype=tf.float64, trainable=False, name="plateau_best")
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="plateau_wait")
        return dict(plateau_best=self.best, plateau_wait=self.wait)

    def epoch_end(self, loop, row):
        c = self.cfg
        value = row.get(c.monitor)
        if value is None:
            return None
        if _better(value, float(self.best.numpy()), c.direction, c.min_delta):
            self.best.assign(value)
            self.wait.assign(0)
            return None
        self.wait.assign_add(1)
        if int(self.wait.numpy()) >= c.patience:
            lr = row["lr"]
            new = max(lr * c.factor, c.min_lr)
            if new < lr:
                self.factor.assign(float(self.factor.numpy()) * new / lr)
                loop.trainer.say(f"reduce on plateau: {c.monitor} flat for {c.patience} epochs; "
                                 f"learning rate {lr:.3g} -> {new:.3g}")
            self.wait.assign(0)
        return None


class StopAt(Hook):
    """``training.stop_at``: finish as soon as a metric reaches its target (accuracies
    from above, losses from below)."""

    def __init__(self, targets: dict):
        self.targets = targets

    def epoch_end(self, loop, row):
        for key, target in self.targets.items():
            value = row.get(key)
            if value is not None and (value >= target if direction(key, "auto") == "max" else value <= target):
                loop.trainer.say(f"stop_at: {key} {value:.4f} reached the target {target}")
                return "stop_at"
        return None
