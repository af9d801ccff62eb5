"""The optimizer and training sections of the config (``optimizer:``, ``training:``), with
the metric names their hooks monitor.  Re-exported by :mod:`hpcjobs.config`, where every
other section lives; split out only to keep each module short.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any, Literal, Optional, Union

from .loader import section as _frozen
from ..units import check_time_budget

SEED_MAX = 2**32 - 1  # numpy's and Keras' global seeds are 32-bit


MONITORS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_f1")  # val_f1: macro-F1 on validation


def check_monitor(monitor: str):
    if monitor not in MONITORS:
        raise ValueError(f"monitor: must be one of {', '.join(MONITORS)}")


def direction(monitor: str, mode: str) -> str:
    """``min`` or ``max``: ``mode`` unless auto, which maximises accuracies and F1."""
    return mode if mode != "auto" else "max" if monitor.endswith(("accuracy", "f1")) else "min"


@_frozen
class TopBlocks:
    top_blocks: int  # the last N blocks of the backbone (and the head)

    def __post_init__(self):
        if self.top_blocks < 1:
            raise ValueError("top_blocks: must be >= 1")


@_frozen
class StageConfig:
    """One stage of a run: epochs with a trainable set and its own learning rate."""

    epochs: int
    # head, all, {top_blocks: N}, or a list of layer names or name prefixes (any model)
    trainable: Union[Literal["head", "all"], TopBlocks, tuple[str, ...]] = "all"
    learning_rate: Optional[float] = None  # null: optimizer.learning_rate

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError("epochs: must be >= 1")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError("learning_rate: must be > 0 or null")
        if isinstance(self.trainable, tuple) and (not self.trainable or not all(n.strip() for n in self.trainable)):
            raise ValueError("trainable: a list of layer names or prefixes, none empty")


@_frozen
class HookConfig:
    """One of your own hooks: ``path/to/file.py:Class`` (relative to the config file) or
    ``package.module:Class``, built as ``Class(**options)``."""

    hook: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from .. import plugins

        if not plugins.is_spec(self.hook):
            raise ValueError(f"hook: {self.hook!r}: expected path/to/file.py:Class or package.module:Class")


@_frozen
class ScheduleConfig:
    kind: Literal["constant", "step", "exponential", "cosine", "linear", "inverse_time", "piecewise", "cyclic",
                  "one_cycle"] = "constant"
    decay_steps: int = 1000  # step: every decay_steps; exponential, inverse_time: scale; cosine, linear: length
    decay_rate: float = 0.5
    alpha: float = 0.0  # cosine, linear: final fraction of the learning rate
    warmup_steps: int = 0
    boundaries: tuple[int, ...] = ()  # piecewise: steps where the value changes
    values: tuple[float, ...] = ()  # piecewise: one more value than boundaries
    max_learning_rate: Optional[float] = None  # cyclic: the top (the bottom is optimizer.learning_rate)
    step_size: int = 2000  # cyclic: steps of half a cycle
    mode: Literal["triangular", "triangular2"] = "triangular"  # cyclic
    pct_start: float = 0.3  # one_cycle: share of the run's steps spent rising to the learning rate
    div_factor: float = 25.0  # one_cycle: starts at learning_rate / div_factor
    final_div_factor: float = 1e4  # one_cycle: ends at learning_rate / (div_factor * final_div_factor)

    def __post_init__(self):
        if self.decay_steps < 1:
            raise ValueError("decay_steps: must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps: must be >= 0")
        if self.decay_rate <= 0 or not 0 <= self.alpha <= 1:
            raise ValueError("decay_rate: must be > 0" if self.decay_rate <= 0 else "alpha: must be in [0, 1]")
        if self.kind == "piecewise" and (not self.values or len(self.values) != len(self.boundaries) + 1
                                         or list(self.boundaries) != sorted(set(self.boundaries))):
            raise ValueError("values: piecewise needs increasing boundaries and one more value than boundaries")
        if self.kind == "cyclic" and self.max_learning_rate is None:
            raise ValueError("max_learning_rate: the cyclic schedule needs its top learning rate")
        if self.step_size < 1 or not 0 < self.pct_start < 1 or min(self.div_factor, self.final_div_factor) < 1:
            raise ValueError("step_size: must be >= 1" if self.step_size < 1 else
                             "pct_start: must be in (0, 1)" if not 0 < self.pct_start < 1 else
                             "div_factor: div_factor and final_div_factor must be >= 1")
        if self.kind == "one_cycle" and self.warmup_steps:
            raise ValueError("warmup_steps: one_cycle warms up by itself (pct_start); set warmup_steps: 0")


@_frozen
class PlateauConfig:
    """Reduce the learning rate when a metric stops improving (off while patience is null)."""

    patience: Optional[int] = None
    monitor: str = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    factor: float = 0.1
    min_delta: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self):
        if self.patience is not None and self.patience < 1:
            raise ValueError("patience: must be >= 1 or null")
        if not 0 < self.factor < 1 or self.min_lr < 0 or self.min_delta < 0:
            raise ValueError("factor: must be in (0, 1)" if not 0 < self.factor < 1 else
                             "min_lr: min_lr and min_delta must be >= 0")
        check_monitor(self.monitor)

    direction = property(lambda self: direction(self.monitor, self.mode))


@_frozen
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw", "adamax", "lion", "rmsprop", "adagrad", "adadelta", "nadam"] = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.0  # sgd, rmsprop
    nesterov: bool = False  # sgd
    amsgrad: bool = False  # adam, adamw
    weight_decay: float = 0.0  # decoupled weight decay (adamw's own; the others' too)
    clipnorm: Optional[float] = None  # clip each gradient to this norm
    global_clipnorm: Optional[float] = None  # clip all gradients together to this norm
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    reduce_on_plateau: PlateauConfig = field(default_factory=PlateauConfig)
    scale_lr_with_workers: Literal["none", "linear", "sqrt"] = "none"

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError("learning_rate: must be > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError("momentum: must be in [0, 1)")
        if self.momentum and self.name not in ("sgd", "rmsprop"):
            raise ValueError(f"momentum: {self.name} has no momentum (only sgd and rmsprop)")
        if self.nesterov and self.name != "sgd":
            raise ValueError(f"nesterov: {self.name} has no Nesterov momentum (only sgd)")
        if self.amsgrad and self.name not in ("adam", "adamw"):
            raise ValueError(f"amsgrad: {self.name} has no AMSGrad variant (only adam and adamw)")
        if self.weight_decay < 0:
            raise ValueError("weight_decay: must be >= 0")
        for name in ("clipnorm", "global_clipnorm"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0 or null")
        if self.clipnorm is not None and self.global_clipnorm is not None:
            raise ValueError("global_clipnorm: give clipnorm or global_clipnorm, not both")


@_frozen
class EarlyStoppingConfig:
    patience: Optional[int] = None  # null = off
    monitor: str = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self):
        if self.patience is not None and self.patience < 0:
            raise ValueError("patience: must be >= 0")
        if self.min_delta < 0:
            raise ValueError("min_delta: must be >= 0")
        check_monitor(self.monitor)

    direction = property(lambda self: direction(self.monitor, self.mode))


@_frozen
class StopAtConfig:
    """Finish as soon as a metric reaches its target (accuracies from below, losses from above)."""

    loss: Optional[float] = None
    accuracy: Optional[float] = None
    val_loss: Optional[float] = None
    val_accuracy: Optional[float] = None
    val_f1: Optional[float] = None


@_frozen
class DiagnoseConfig:
    """Thresholds of the per-epoch diagnosis (the handbook's bad signs) over ``window`` epochs."""

    window: int = 3  # epochs compared (diverging: validation loss up in each of them)
    plateau_delta: float = 1e-3  # plateau: the loss moved by less than this share
    bounces: int = 2  # bouncing: the validation loss changed direction this often

    def __post_init__(self):
        if self.window < 2 or self.bounces < 1 or self.plateau_delta < 0:
            raise ValueError("window: must be >= 2" if self.window < 2 else
                             "bounces: must be >= 1" if self.bounces < 1 else "plateau_delta: must be >= 0")


LOSSES = ("crossentropy", "focal")  # built in; a name with ':' is the user's (module:function, file.py:function)


@_frozen
class LossConfig:
    """``training.loss``: a name (``training.loss: focal``) or a mapping with the loss's options."""

    name: str = "crossentropy"
    label_smoothing: float = 0.0  # targets (1 - s) * onehot + s / classes (crossentropy and focal)
    gamma: float = 2.0  # focal: the down-weighting of easy examples, (1 - p)^gamma
    alpha: Optional[tuple[float, ...]] = None  # focal: one weight per class (null: 1 for every class)

    def __post_init__(self):
        if self.name not in LOSSES and ":" not in self.name:
            raise ValueError(f"name: must be one of {', '.join(LOSSES)}, or module:function for your own, "
                             f"got {self.name!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing: must be in [0, 1)")
        if self.name != "focal" and (self.gamma != 2.0 or self.alpha is not None):
            raise ValueError(f"{'gamma' if self.gamma != 2.0 else 'alpha'}: only the focal loss has it "
                             f"(this loss is {self.name})")
        if self.gamma < 0:
            raise ValueError("gamma: must be >= 0")
        if self.alpha is not None and (not self.alpha or min(self.alpha) < 0):
            raise ValueError("alpha: one weight >= 0 per class, or null")


@_frozen
class TrainingConfig:
    epochs: int = 10
    steps_per_epoch: Optional[int] = None  # null = one pass over the training split
    batch_size: int = 128  # global batch: per-replica batch x replicas
    steps_per_call: int = 10  # train steps inside one compiled call (epoch and checkpoint bounds cut it)
    log_every_steps: int = 100
    seed: int = 0
    deterministic: bool = False
    # mixed_float16: V100 Tensor Cores, with a dynamic loss scale; mixed_bfloat16: A100/H100 and CPUs
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    jit_compile: Union[bool, Literal["auto"]] = False  # XLA for the train and eval steps; auto: on GPUs
    loss_scale_growth_steps: int = 2000  # mixed_float16: finite steps before the loss scale doubles
    time_budget: Optional[str] = None  # e.g. 90s, 15m, 1h, 01:30:00
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    stop_at: StopAtConfig = field(default_factory=StopAtConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    stop_on: tuple[Literal["diverging", "plateau", "bouncing"], ...] = ()  # finish on these signs
    # null, balanced (n / (classes x count)), or {class name or index: weight} (others 1)
    class_weight: Optional[Union[Literal["balanced"], dict[str, float]]] = None
    # crossentropy (default) | focal | module:function, or {name: focal, gamma: 2.0, alpha: [...],
    # label_smoothing: 0.1}; also the validation loss (val_loss)
    loss: Union[LossConfig, str] = field(default_factory=LossConfig)
    # stages of one run, e.g. [{epochs: 3, trainable: head, learning_rate: 1e-3}, {epochs: 5, trainable:
    # {top_blocks: 2}, learning_rate: 1e-4}, {epochs: 5, trainable: all, learning_rate: 1e-5}];
    # with stages, the run is as long as their epochs together (epochs is not used)
    stages: tuple[StageConfig, ...] = ()
    # your own hooks, after the built-in ones: path/to/file.py:Class (relative to the config file),
    # package.module:Class, or {hook: ..., options: {...}} (built as Class(**options))
    hooks: tuple[Union[str, HookConfig], ...] = ()

    def __post_init__(self):
        hooks = []
        for i, h in enumerate(self.hooks):
            try:
                hooks.append(HookConfig(hook=h) if isinstance(h, str) else h)
            except ValueError as e:
                raise ValueError(f"hooks[{i}].{e}") from None
        object.__setattr__(self, "hooks", tuple(hooks))
        for name in ("epochs", "batch_size", "steps_per_call", "log_every_steps", "loss_scale_growth_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch: must be >= 1 or null")
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed: must be from 0 to {SEED_MAX}")
        check_time_budget(self.time_budget)
        if isinstance(self.loss, str):  # the short form: a name only
            try:
                object.__setattr__(self, "loss", LossConfig(name=self.loss))
            except ValueError as e:
                raise ValueError(f"loss.{e}") from None
