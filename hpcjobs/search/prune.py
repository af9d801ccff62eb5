"""The pruning hook: a trial reports its metric to the study's pruner at every epoch's end.

The hook keeps no state of its own: what it reported, and what the pruner decided at
each epoch (``prune_at_<epoch>``, a user attribute of the trial), live in the study's
journal, and the pruner's rungs (ASHA's ``completed_rung_<k>``) too.  So a trial
resumed from its checkpoint after a kill or a requeue, in this worker or another,
does not report an epoch twice and is never judged twice at the same epoch: a trial
promoted past a rung goes on from its checkpoint, it is neither retrained nor judged
again.  It also asks for a checkpoint at every epoch's end, so that a killed trial
loses at most the epoch it was in.
"""
from __future__ import annotations

import math

from .. import compat
from ..train.hooks import Hook


class PruneHook(Hook):
    def __init__(self, study, trial_id: int, search, outer_stop=None):
        self.study, self.trial_id, self.search = study, trial_id, search
        self.outer_stop = outer_stop  # the worker's StopFlag: a signal that came just before training
        self.flag = None  # the session's StopFlag (see stop_signal)

    @property
    def stop_signal(self):
        """A stop signal (Slurm's warning) that reached the session at any time, also one that
        came during the last epoch's validation, the final test evaluation or the export and so
        stopped nothing (the trial ended, finished or pruned, anyway): the worker must still stop
        before its next trial, or it runs into the time limit.  The flag keeps what it got after
        the session took its handler down (the worker's own flag gets what comes after)."""
        return self.flag.signal if self.flag is not None else None

    def begin(self, loop):
        self.flag = loop.stop
        # pruned already, in a session killed before it could end (say during the final test
        # evaluation): end at once, where the checkpoint is, instead of training on
        attrs = self._frozen().user_attrs
        self.pruned_before = any(v for k, v in attrs.items() if k.startswith("prune_at_"))

    def _outer(self):
        return self.outer_stop.signal if self.outer_stop is not None else None

    def limit(self, loop, step: int):
        return 0 if self.pruned_before or self._outer() else None

    def stop_reason(self, loop):
        return "pruned" if self.pruned_before else self._outer()

    def save_due(self, loop, step: int) -> bool:
        return step % loop.trainer.steps_per_epoch == 0

    def _frozen(self):
        return next(t for t in self.study.get_trials(deepcopy=False) if compat.optuna_trial_id(t) == self.trial_id)

    def epoch_end(self, loop, row):
        import optuna

        value = row.get(self.search.metric)
        if value is None:
            return None
        epoch = int(row["epoch"])
        trial = optuna.trial.Trial(self.study, self.trial_id)
        frozen = self._frozen()
        key = f"prune_at_{epoch}"
        if key in frozen.user_attrs:  # decided in an earlier session: keep to it
            return "pruned" if frozen.user_attrs[key] else None
        if epoch not in frozen.intermediate_values:
            trial.report(float(value) if math.isfinite(value) else float("nan"), epoch)
        if self.search.pruning.kind == "none":
            return None
        prune = bool(trial.should_prune())
        trial.set_user_attr(key, prune)
        if prune:
            loop.trainer.say(f"pruned at epoch {epoch}: {self.search.metric} {value:.4f} "
                             f"({self.search.pruning.kind})")
            return "pruned"
        return None
