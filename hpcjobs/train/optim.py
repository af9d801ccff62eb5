"""Optimizers and learning-rate schedules from the config.

Every schedule is a pure function of the optimizer's iteration count, which is in the
checkpoint, so a resumed run continues on the same curve.  Reduce-on-plateau is a
hook (``hooks.ReduceOnPlateau``) that lowers a checkpointed factor the schedule is
multiplied by.
"""
from __future__ import annotations

import functools

from .. import compat
from ..config import OptimizerConfig


@functools.cache
def _warmup_class():
    import keras

    ops = compat.ops()

    class WarmUp(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up from 0 to the schedule's value over ``warmup_steps``."""

        def __init__(self, after, warmup_steps: int, peak: float):
            self.after, self.warmup_steps, self.peak = after, warmup_steps, peak

        def __call__(self, step):
            step = ops.cast(step, "float32")
            after = self.after(step - self.warmup_steps) if callable(self.after) else self.after
            warm = self.peak * (step + 1.0) / float(self.warmup_steps)
            return ops.where(step < self.warmup_steps, warm, after)

        def get_config(self):
            return {"warmup_steps": self.warmup_steps, "peak": self.peak}

    return WarmUp


@functools.cache
def _cyclic_class():
    import keras

    ops = compat.ops()

    class Cyclic(keras.optimizers.schedules.LearningRateSchedule):
        """Smith's cyclical learning rate: triangular, or triangular2 (the amplitude halves
        every cycle), between ``base`` and ``peak`` with half-cycles of ``step_size``."""

        def __init__(self, base_lr: float, peak: float, step_size: int, mode: str):
            self.base_lr, self.peak, self.step_size, self.mode = base_lr, peak, step_size, mode

        def __call__(self, step):
            step = ops.cast(step, "float32")
            cycle = ops.floor(1.0 + step / (2.0 * self.step_size))
            x = ops.abs(step / self.step_size - 2.0 * cycle + 1.0)
            amplitude = (self.peak - self.base_lr) * ops.maximum(0.0, 1.0 - x)
            if self.mode == "triangular2":
                amplitude = amplitude / ops.power(2.0, cycle - 1.0)
            return self.base_lr + amplitude

        def get_config(self):
            return {"base_lr": self.base_lr, "peak": self.peak, "step_size": self.step_size, "mode": self.mode}

    return Cyclic


@functools.cache
def _one_cycle_class():
    import keras

    ops = compat.ops()

    class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
        """One cycle over ``total`` steps: cosine up from peak/div to ``peak`` for the first
        ``pct_start`` of the steps, then cosine down to peak/(div*final_div)."""

        def __init__(self, peak: float, total: int, pct_start: float, div: float, final_div: float):
            self.peak, self.total, self.pct_start, self.div, self.final_div = peak, total, pct_start, div, final_div

        def __call__(self, step):
            step = ops.cast(step, "float32")
            up = max(1.0, self.pct_start * self.total)
            down = max(1.0, self.total - up)
            start, end = self.peak / self.div, self.peak / (self.div * self.final_div)

            def cos(a, b, t):
                return b + (a - b) * 0.5 * (1.0 + ops.cos(3.141592653589793 * ops.clip(t, 0.0, 1.0)))

            return ops.where(step < up, cos(start, self.peak, step / up), cos(self.peak, end, (step - up) / down))

        def get_config(self):
            return {"peak": self.peak, "total": self.total, "pct_start": self.pct_start, "div": self.div,
                    "final_div": self.final_div}

    return OneCycle


@functools.cache
def _scaled_class():
    import keras

    ops = compat.ops()

    class Scaled(keras.optimizers.schedules.LearningRateSchedule):
        """A schedule times a checkpointed factor (lowered by reduce-on-plateau)."""

        def __init__(self, inner, factor):
            self.inner, self.factor = inner, factor

        def __call__(self, step):
            value = self.inner(step) if callable(self.inner) else self.inner
            return ops.cast(value, "float32") * ops.cast(self.factor, "float32")

        def get_config(self):
            return {}

    return Scaled


def make_schedule(keras, cfg: OptimizerConfig, lr: float, total_steps: int = 0):
    """The learning rate (a float or a Keras schedule) of ``cfg.schedule``."""
    WarmUp, Cyclic, OneCycle = _warmup_class(), _cyclic_class(), _one_cycle_class()
    S, s = keras.optimizers.schedules, cfg.schedule
    if s.kind == "cosine":  # with Keras' own linear warm-up
        if s.warmup_steps:
            return S.CosineDecay(0.0, s.decay_steps, alpha=s.alpha, warmup_target=lr, warmup_steps=s.warmup_steps)
        return S.CosineDecay(lr, s.decay_steps, alpha=s.alpha)
    if s.kind == "one_cycle":  # its own warm-up: the first pct_start of the run's steps
        return OneCycle(lr, max(1, total_steps), s.pct_start, s.div_factor, s.final_div_factor)
    sched = {
        "constant": lambda: lr,
        "step": lambda: S.ExponentialDecay(lr, s.decay_steps, s.decay_rate, staircase=True),
        "exponential": lambda: S.ExponentialDecay(lr, s.decay_steps, s.decay_rate),
        "linear": lambda: S.PolynomialDecay(lr, s.decay_steps, end_learning_rate=lr * s.alpha, power=1.0),
        "inverse_time": lambda: S.InverseTimeDecay(lr, s.decay_steps, s.decay_rate),
        "piecewise": lambda: S.PiecewiseConstantDecay(list(s.boundaries), list(s.values)),
        "cyclic": lambda: Cyclic(lr, s.max_learning_rate, s.step_size, s.mode),
    }[s.kind]()
    if s.warmup_steps:
        return WarmUp(sched, s.warmup_steps, lr if s.kind != "piecewise" else s.values[0])
    return sched


def make_optimizer(cfg: OptimizerConfig, lr: float, total_steps: int = 0, lr_factor=None):
    """The Keras optimizer of ``cfg``; ``lr_factor`` (a variable) scales its learning rate."""
    import keras

    O = keras.optimizers
    sched = make_schedule(keras, cfg, lr, total_steps)
    if lr_factor is not None:
        sched = _scaled_class()(sched, lr_factor)
    common = dict(clipnorm=cfg.clipnorm, global_clipnorm=cfg.global_clipnorm, **compat.optimizer_options())
    if cfg.name != "adamw":
        common["weight_decay"] = cfg.weight_decay or None
    if cfg.name == "sgd":
        return O.SGD(sched, momentum=cfg.momentum, nesterov=cfg.nesterov, **common)
    if cfg.name == "rmsprop":
        return O.RMSprop(sched, momentum=cfg.momentum, **common)
    if cfg.name in ("adam", "adamw"):
        extra = {"weight_decay": cfg.weight_decay} if cfg.name == "adamw" else {}
        return {"adam": O.Adam, "adamw": O.AdamW}[cfg.name](sched, amsgrad=cfg.amsgrad, **extra, **common)
    return {"adagrad": O.Adagrad, "adadelta": O.Adadelta, "nadam": O.Nadam, "adamax": O.Adamax,
            "lion": O.Lion}[cfg.name](sched, **common)
