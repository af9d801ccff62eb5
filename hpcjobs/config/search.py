"""The ``search:`` section: a hyperparameter search over any config key, and the LR range test.

    search:
      method: random            # grid | random | tpe
      trials: 12                # null with grid: the whole grid
      metric: val_accuracy      # a column of metrics.csv: loss | accuracy | val_loss | val_accuracy | val_f1 (macro-F1) | ...
      direction: auto           # auto: max for accuracies and F1, else min
      epochs: 2                 # each trial's budget (null: training.epochs)
      space:
        optimizer.learning_rate: {log_uniform: [1.0e-4, 1.0e-1]}
        model.dropout: {uniform: [0.0, 0.5]}
        training.batch_size: {choice: [32, 64, 128]}
        model.width: {int: [16, 64]}
      pruning: {kind: asha, min_resource: 1, reduction_factor: 3}

Held by :mod:`hpcjobs.config` as ``Config.search``; the keys of ``space`` are checked against the
whole config by :func:`hpcjobs.search.space.check_space` when a search starts.
"""
from __future__ import annotations

import builtins
from dataclasses import field
from typing import Literal, Optional, Union

from .loader import section as _frozen

Value = Union[bool, int, float, str]




@_frozen
class ParamSpec:
    """One axis of the space: exactly one of choice, uniform, log_uniform, int."""

    choice: Optional[tuple[Value, ...]] = None
    uniform: Optional[tuple[float, float]] = None
    log_uniform: Optional[tuple[float, float]] = None
    int: Optional[tuple[builtins.int, builtins.int]] = None  # (the field's name hides the type here)
    points: builtins.int = 4  # grid: the points of a uniform, log-uniform or int range

    def __post_init__(self):
        given = [k for k in ("choice", "uniform", "log_uniform", "int") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("choice: give exactly one of choice, uniform, log_uniform or int"
                             + (f" (got {', '.join(given)})" if given else ""))
        kind = given[0]
        if kind == "choice" and not self.choice:
            raise ValueError("choice: give at least one value")
        twice = next((v for i, v in enumerate(self.choice or ()) if v in self.choice[:i]), None)
        if twice is not None:  # a grid would run the same point twice
            raise ValueError(f"choice: {twice!r} is given twice")
        if kind != "choice":
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: [low, high] with low below high, got [{lo}, {hi}]")
            if kind == "log_uniform" and lo <= 0:
                raise ValueError(f"log_uniform: the low end must be > 0, got {lo}")
        if self.points < 2:
            raise ValueError("points: must be >= 2")

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "log_uniform", "int") if getattr(self, k) is not None)


@_frozen
class PruningConfig:
    """Stop poor trials early: at each epoch's end a trial reports its metric to the pruner."""

    kind: Literal["none", "median", "asha"] = "none"
    min_resource: int = 1  # asha: epochs of the first rung; median: epochs before any pruning
    reduction_factor: int = 3  # asha: 1 in reduction_factor trials goes on at each rung
    startup_trials: int = 3  # median: trials that finish unpruned before it prunes

    def __post_init__(self):
        if self.min_resource < 1 or self.reduction_factor < 2 or self.startup_trials < 0:
            raise ValueError("min_resource: must be >= 1" if self.min_resource < 1 else
                             "reduction_factor: must be >= 2" if self.reduction_factor < 2 else
                             "startup_trials: must be >= 0")


@_frozen
class LRFindConfig:
    """``hpcjobs lr-find``: an exponential sweep of the learning rate over ``steps`` steps."""

    min_lr: float = 1e-7
    max_lr: float = 10.0
    steps: int = 100
    diverge: float = 4.0  # stop once the smoothed loss passes diverge x its best
    smoothing: float = 0.98  # exponential moving average of the loss (bias-corrected)

    def __post_init__(self):
        if not 0 < self.min_lr < self.max_lr:
            raise ValueError("min_lr: must be > 0 and below max_lr")
        if not 10 <= self.steps <= 10000:
            raise ValueError("steps: must be from 10 to 10000")
        if self.diverge <= 1 or not 0 <= self.smoothing < 1:
            raise ValueError("diverge: must be > 1" if self.diverge <= 1 else "smoothing: must be in [0, 1)")


@_frozen
class SearchConfig:
    method: Literal["grid", "random", "tpe"] = "random"
    trials: Optional[int] = None  # null: the grid's size (grid); random and tpe need a number
    # any numeric column of metrics.csv (hpcjobs.rundir.METRIC_FIELDS); val_f1 is the macro-F1 on validation
    metric: Literal["loss", "accuracy", "val_loss", "val_accuracy", "val_f1", "lr", "seconds"] = "val_accuracy"
    direction: Literal["auto", "min", "max"] = "auto"
    epochs: Optional[int] = None  # each trial's budget; null: training.epochs
    seed: int = 0  # of the sampler
    space: dict[str, ParamSpec] = field(default_factory=dict)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    max_attempts: int = 3  # a trial whose process died this often (no clean stop) is marked failed
    # centre optimizer.learning_rate on RUN/lr_find.json's suggestion (hpcjobs lr-find first):
    # log-uniform over [lr / lr_span, lr * lr_span]
    lr_center: Optional[Literal["valley", "steepest", "min_div10"]] = None
    lr_span: float = 10.0
    lr_find: LRFindConfig = field(default_factory=LRFindConfig)

    def __post_init__(self):
        if self.trials is not None and self.trials < 1:
            raise ValueError("trials: must be >= 1 or null")
        if self.space and self.trials is None and self.method != "grid":
            raise ValueError(f"trials: {self.method} search needs a number of trials")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("epochs: must be >= 1 or null")
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be >= 1")
        if self.lr_span <= 1:
            raise ValueError("lr_span: must be > 1")
        if not 0 <= self.seed < 2**32:
            raise ValueError("seed: must be from 0 to 4294967295")

    @property
    def maximize(self) -> bool:
        return self.direction == "max" or (self.direction == "auto" and self.metric.endswith(("accuracy", "f1")))
