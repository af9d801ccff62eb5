"""Hooks: *what* happens at the moments the loop (``loop.py``) picks; the protocol is in
``base``.  A new feature is a new hook, passed as ``Trainer(..., hooks=[...])`` or
``train(..., hooks=[...])``: the loop does not change.

* ``base``: the protocol (``Hook``) and ``is_final``;
* ``logging``: metrics.csv, TensorBoard, progress;
* ``best``: the best epoch's metric and weights, early stopping, its restore;
* ``stopping``: signals and the time budget, ``stop_at``, the checkpoint cadence, reduce on plateau;
* ``diagnosis``: the bad signs of a curve;
* ``stages``: ``training.stages``;
* ``user``: your own, from ``training.hooks``.
"""
from __future__ import annotations

import dataclasses

from .base import Hook, is_final
from .best import BestMetric, best_weights_path, uses_best
from .diagnosis import Diagnosis, diagnose
from .logging import MetricsCSV, Progress, TensorBoard
from .stages import Stages
from .stopping import CheckpointCadence, ReduceOnPlateau, StopAt, StopSignals
from .user import UserHook, user_hooks

__all__ = ["BestMetric", "CheckpointCadence", "Diagnosis", "Hook", "MetricsCSV", "Progress",
           "ReduceOnPlateau", "Stages", "StopAt", "StopSignals", "TensorBoard", "best_weights_path", "default_hooks",
           "diagnose", "is_final", "user_hooks", "uses_best", "UserHook"]


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
