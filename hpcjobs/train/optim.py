"""Optimizers and learning-rate schedules from the config."""
from __future__ import annotations

from ..config import OptimizerConfig


def make_schedule(keras, cfg: OptimizerConfig, lr: float):
    s = cfg.schedule
    if s.kind == "constant":
        sched = lr
    elif s.kind == "step":
        sched = keras.optimizers.schedules.ExponentialDecay(lr, s.decay_steps, s.decay_rate, staircase=True)
    elif s.kind == "exponential":
        sched = keras.optimizers.schedules.ExponentialDecay(lr, s.decay_steps, s.decay_rate)
    else:  # cosine, with Keras' own linear warm-up
        if s.warmup_steps:
            return keras.optimizers.schedules.CosineDecay(0.0, s.decay_steps, alpha=s.alpha,
                                                          warmup_target=lr, warmup_steps=s.warmup_steps)
        return keras.optimizers.schedules.CosineDecay(lr, s.decay_steps, alpha=s.alpha)
    if s.warmup_steps:
        return WarmUp(sched, s.warmup_steps, lr)
    return sched


def _warmup_class():
    import keras

    class _WarmUp(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up from 0 to the schedule's value over ``warmup_steps``."""

        def __init__(self, after, warmup_steps: int, peak: float):
            self.after, self.warmup_steps, self.peak = after, warmup_steps, peak

        def __call__(self, step):
            import keras.ops as ops

            step = ops.cast(step, "float32")
            after = self.after(step - self.warmup_steps) if callable(self.after) else self.after
            warm = self.peak * (step + 1.0) / float(self.warmup_steps)
            return ops.where(step < self.warmup_steps, warm, after)

        def get_config(self):
            return {"warmup_steps": self.warmup_steps, "peak": self.peak}

    return _WarmUp


def WarmUp(after, warmup_steps, peak):  # noqa: N802 (a class factory, so keras imports lazily)
    return _warmup_class()(after, warmup_steps, peak)


def make_optimizer(cfg: OptimizerConfig, lr: float):
    import keras

    O = keras.optimizers
    sched = make_schedule(keras, cfg, lr)
    if cfg.name == "sgd":
        return O.SGD(sched, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "rmsprop":
        return O.RMSprop(sched, momentum=cfg.momentum)
    return {"adam": O.Adam, "adagrad": O.Adagrad, "adadelta": O.Adadelta, "nadam": O.Nadam}[cfg.name](sched)
