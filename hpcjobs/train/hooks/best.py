"""The best epoch: its metric, its weights file, early stopping, and the restore at the end."""
from __future__ import annotations

import math
import os

from ..checkpoint import BEST_EPOCH_KEY, save_weights
from .base import Hook, _better, is_final


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
        for prefix in t.checkpoints.kept:
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
        kept = t.checkpoints.kept
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
