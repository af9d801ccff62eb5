"""Hooks: *what* happens at the moments the loop (``loop.py``) picks.

A hook is a small object; the loop calls each of these methods on every hook, in
the order of the hook list.  All of them are optional (the base class does nothing):

========================================  ==================================================
``setup(trainer) -> dict``                once, inside the strategy scope, before the
                                          checkpoint is built: the hook's state variables.
                                          They are checkpointed (and broadcast under
                                          Horovod), so exact resume covers them.
``begin(loop)``                           a session starts, after restore
``epoch_begin(loop, epoch)``              before the first call of epoch ``epoch`` (0-based)
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

import dataclasses
import math
import os
import time

from ...evaluation import files as report
from ..checkpoint import save_weights
from ...config import direction

BEST_EPOCH_KEY = "best_epoch/.ATTRIBUTES/VARIABLE_VALUE"  # BestMetric's variable in a checkpoint


def is_final(reason: str) -> bool:
    """Whether the loop's ``reason`` ends the run for good (else it stopped with more to do)."""
    # pruned: a search trial its pruner stopped (hpcjobs.search.prune)
    return reason in ("finished", "early_stopping", "stop_at", "pruned") or reason.startswith("diagnosis_")


class Hook:
    def setup(self, trainer) -> dict:
        return {}

    def begin(self, loop):
        pass

    def epoch_begin(self, loop, epoch: int):
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


def _better(value: float, best: float, direction: str, min_delta: float) -> bool:
    if math.isnan(best):
        return True
    return value < best - min_delta if direction == "min" else value > best + min_delta


def best_weights_path(run_dir, epoch: int) -> str:
    """Where BestMetric keeps the weights of the best epoch ``epoch``."""
    return os.path.join(run_dir.checkpoints, "best", f"epoch-{epoch:05d}.weights.h5")


def uses_best(cfg) -> bool:
    """Whether a finished run is evaluated and exported with its best epoch's weights."""
    return cfg.export.from_ == "best" and cfg.training.early_stopping.restore_best


class BestMetric(Hook):
    """Tracks the best value of ``training.early_stopping.monitor`` and always keeps that
    epoch's weights (``checkpoints/best/epoch-N.weights.h5``); with a patience, stops
    after ``patience`` epochs without improvement.  When a run finishes, the model gets
    the best weights back for the test evaluation and the export, unless ``export.from``
    is ``latest`` (or ``early_stopping.restore_best`` is false).

    A best epoch's file is removed only once no checkpoint still kept names that epoch,
    so a resume from any of them (a fallback to an older one too) finds its file."""

    def setup(self, trainer):
        tf = trainer.tf
        self.es = trainer.cfg.training.early_stopping
        self.folder = os.path.dirname(best_weights_path(trainer.run_dir, 0))
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
            if t.run_dir.writer:
                save_weights(t.model, best_weights_path(t.run_dir, row["epoch"]))
            return None
        self.wait.assign_add(1)
        if es.patience is not None and int(self.wait.numpy()) >= es.patience:
            t.say(f"early stopping: {es.monitor} has not improved for {es.patience} epochs "
                  f"(best {float(self.best.numpy()):.4f} at epoch {int(self.best_epoch.numpy())})")
            return "early_stopping"
        return None

    def begin(self, loop):
        self._prune(loop.trainer)

    def saved(self, loop, saved, stopping):
        self._prune(loop.trainer, pending=saved.path)

    def _prune(self, t, pending: str | None = None):
        """Remove best-weights files no kept checkpoint names (and temporary files of a
        killed write); ``pending``, a checkpoint still being written, names the current one."""
        if not t.run_dir.writer or not os.path.isdir(self.folder):
            return
        keep = {best_weights_path(t.run_dir, int(self.best_epoch.numpy()))}
        for prefix in t.checkpoints.manager.checkpoints:
            if prefix == pending:
                continue
            try:
                keep.add(best_weights_path(t.run_dir, int(t.tf.train.load_variable(prefix, BEST_EPOCH_KEY))))
            except Exception:  # unreadable now (damaged, or being written): prune another time
                return
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if path not in keep and (name.startswith(".tmp-") or name.endswith(".weights.h5")):
                os.remove(path)

    def end(self, loop, reason):
        t = loop.trainer
        kept = t.checkpoints.manager.checkpoints
        self._prune(t, pending=kept[-1] if kept else None)  # the final save names the current best
        if not is_final(reason) or not uses_best(t.cfg):
            return
        epoch = int(self.best_epoch.numpy())
        path = best_weights_path(t.run_dir, epoch) if epoch else None
        if path and os.path.exists(path):
            t.model.load_weights(path)
            t.say(f"restored the best weights (epoch {epoch}, {self.es.monitor} {float(self.best.numpy()):.4f})")
        else:
            t.say(f"no best weights kept ({self.es.monitor} was never measured): the last weights are used")

    def summary(self, loop):
        best = float(self.best.numpy())
        epoch = int(self.best_epoch.numpy()) or None
        weights = "best" if epoch and uses_best(loop.trainer.cfg) else "latest"
        return dict(best=None if math.isnan(best) else best, best_epoch=epoch, monitor=self.es.monitor,
                    final_weights=weights)


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


def diagnose(history: list[dict], cfg) -> list[str]:
    """The handbook's bad signs in the last ``cfg.window`` epochs of ``history``:
    ``diverging`` (validation loss up every epoch while the training loss falls),
    ``plateau`` (the validation loss, else the training loss, moved by less than
    ``plateau_delta`` relative), ``bouncing`` (the validation loss changed direction at
    least ``bounces`` times)."""
    w = cfg.window
    rows = history[-(w + 1):]
    if len(rows) < w + 1:
        return []
    key = "val_loss" if all("val_loss" in r for r in rows) else "loss"
    val = [r[key] for r in rows]
    steps = [b - a for a, b in zip(val, val[1:])]
    signs = []
    if key == "val_loss" and all(d > 0 for d in steps) and rows[-1]["loss"] < rows[0]["loss"]:
        signs.append("diverging")
    if max(val) - min(val) <= cfg.plateau_delta * max(abs(v) for v in val):
        signs.append("plateau")
    turns = sum(1 for a, b in zip(steps, steps[1:]) if a * b < 0)
    if key == "val_loss" and turns >= cfg.bounces:
        signs.append("bouncing")
    return signs


class Diagnosis(Hook):
    """Logs the bad signs of each epoch (``diagnose``), keeps them for run.json, and
    stops the run on those named in ``training.stop_on``."""

    def __init__(self, cfg, stop_on):
        self.cfg, self.stop_on = cfg, tuple(stop_on)

    def epoch_end(self, loop, row):
        signs = diagnose(loop.history, self.cfg)
        for sign in signs:
            loop.trainer.say(f"diagnosis: {sign} at epoch {row['epoch']}")
        stop = [s for s in signs if s in self.stop_on]
        return f"diagnosis_{stop[0]}" if stop else None

    def summary(self, loop):
        history = loop.history
        # first epoch of each sign over the whole history (earlier sessions too)
        first = {}
        for i in range(len(history)):
            for sign in diagnose(history[:i + 1], self.cfg):
                first.setdefault(sign, history[i]["epoch"])
        return {"diagnosis": first}


def default_hooks(cfg, deadline: float | None) -> list[Hook]:
    """The built-in hooks of config ``cfg``, in the order they act at each moment."""
    t = cfg.training
    hooks = [Stages(t.stages)] if t.stages else []  # first: its stage goes into every row
    hooks += [MetricsCSV(), TensorBoard(), Progress(), BestMetric()]
    if cfg.optimizer.reduce_on_plateau.patience is not None:
        hooks.append(ReduceOnPlateau(cfg.optimizer.reduce_on_plateau))
    targets = {k: v for k, v in dataclasses.asdict(t.stop_at).items() if v is not None}
    if targets:
        hooks.append(StopAt(targets))
    hooks += [Diagnosis(t.diagnose, t.stop_on), CheckpointCadence(), StopSignals(deadline)]
    return hooks


from .stages import Stages  # noqa: E402  (a hook module of its own, built on Hook)
