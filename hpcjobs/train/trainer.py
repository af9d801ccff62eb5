"""The Trainer: builds a run's parts, restores them, and evaluates.

Resume order (the normal path): the run's own newest readable checkpoint, else
``--from CHECKPOINT``, else ``model.init_from`` (``--init-weights`` sets it), else
from scratch.
"""
from __future__ import annotations

import time

import numpy as np

from ..cluster import info as cluster_mod
from .. import compat
from ..cluster import distribute
from ..evaluation import metrics
from ..models import build as models
from ..models import freeze, init_from
from ..models.errors import ModelError
from .checkpoint import (Checkpoints, checkpoint_candidates, config_differs, find_checkpoint, restore_model_only,
                         seed_variables)
from ..config import Config, ConfigError
from ..data import load_data
from ..data.feed import Feeder
from ..rundir import RunDir
from .. import plugins
from ..units import parse_duration
from . import hooks as hooks_mod
from .optim import make_optimizer
from . import losses
from .step import build_steps


def class_weights(setting, labels, num_classes: int, class_names) -> list[float] | None:
    """``training.class_weight``: null, ``balanced`` (n / (classes x count), as
    scikit-learn's), or a mapping of class name (or index) to weight (others 1)."""
    if setting is None:
        return None
    if setting == "balanced":
        counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
        return [len(labels) / (num_classes * c) if c else 0.0 for c in counts]
    weights = [1.0] * num_classes
    names = [str(c) for c in class_names]
    for key, w in setting.items():
        if str(key) in names:
            weights[names.index(str(key))] = float(w)
        elif str(key).isdigit() and int(key) < num_classes:
            weights[int(key)] = float(w)
        else:
            raise ConfigError("training.class_weight", str(key), f"not a class (classes: {', '.join(names)})")
    return weights


def use_xla(t, rt) -> bool:
    """``training.jit_compile``; ``auto`` is on where there are GPUs, unless deterministic
    or under Horovod (whose allreduce cannot run inside an XLA cluster)."""
    if t.jit_compile == "auto":
        return rt.gpus > 0 and not t.deterministic and rt.hvd is None
    return bool(t.jit_compile)


class Trainer:
    """Everything one run needs, built in ``__init__``: it detects the launcher, sets up
    the distribution runtime (``hvd.init()`` under Horovod), seeds the random
    generators, reads and preprocesses the data (unless ``data`` is given), and builds
    the model, the optimizer, the hooks' state, the compiled steps and the checkpoint
    manager.  Nothing is restored, trained or written there: ``restore()`` and
    ``session.run_session`` do that.  ``hooks`` are added after the built-in ones and
    those of ``training.hooks``; ``code`` is the run's copy of the user's code
    (``plugins.RunCode.prepare``, which ``job.train`` makes before the Trainer)."""

    def __init__(self, cfg: Config, run_dir: str, *, runtime=None, info=None, data=None,
                 time_budget: str | None = None, verbose: bool = True, hooks=(), code=None):
        import keras
        import tensorflow as tf

        self.tf, self.keras = tf, keras
        self.cfg = cfg
        self.t0 = time.monotonic()
        self.info = info or cluster_mod.detect()
        self.rt = runtime or distribute.setup(cfg.distribute, self.info)
        t = cfg.training
        compat.set_random_seed(t.seed)
        compat.set_op_determinism(t.deterministic)
        self.run_dir = RunDir(run_dir, writer=self.rt.is_chief)
        self.verbose = verbose and self.rt.is_chief
        # data.stage: the store copied to node-local scratch once per node (said by the rank that copies)
        self.data = data or load_data(cfg, info=self.info, say=lambda line: print(line, flush=True))
        self.feeder = Feeder(self.data, feed=cfg.data.feed, memory_budget=cfg.data.memory_budget,
                             epochs_per_segment=cfg.data.epochs_per_segment, seed=cfg.data.seed + t.seed,
                             augment=cfg.data.augment, global_batch=t.batch_size, worker=self.rt.worker,
                             workers=self.rt.workers, local_replicas=self.rt.local_replicas, cpus=self.info.cpus,
                             device="gpu" if self.rt.kind in ("none", "horovod") else None)
        self.steps_per_epoch = t.steps_per_epoch or self.feeder.steps_per_pass
        self.epochs = sum(st.epochs for st in t.stages) if t.stages else t.epochs
        self.total_steps = self.epochs * self.steps_per_epoch
        self.code = code  # RUN/code/: the user's code files and modules (hpcjobs.plugins.RunCode), or None
        self.hooks = (hooks_mod.default_hooks(cfg, self._deadline(time_budget or t.time_budget))
                      + hooks_mod.user_hooks(cfg) + list(hooks))
        self.jit_compile = use_xla(t, self.rt)
        user_loss = losses.user_loss(t.loss.name, self.data.num_classes) if plugins.is_spec(t.loss.name) else None
        self.loss = losses.make_loss(t.loss, self.data.num_classes, user_loss)
        self._eval_datasets = {}  # split: its evaluation pipeline (_eval_dataset)
        self._build_state()
        self.compiled = self._build_steps()
        self._stage_steps = {0: self.compiled}

    def _deadline(self, budget: str | None) -> float | None:
        deadline = self.t0 + parse_duration(budget) if budget else None
        if self.info.job_end_time:
            job_deadline = self.t0 + (self.info.job_end_time - time.time())
            deadline = job_deadline if deadline is None else min(deadline, job_deadline)
        return deadline

    def _build_state(self):
        tf, cfg = self.tf, self.cfg
        keras = self.keras
        keras.mixed_precision.set_global_policy(cfg.training.precision)  # process-wide: set for every run
        with self.rt.strategy.scope():
            self.model = models.build(cfg.model, self.data.image_shape, self.data.num_classes, self.data.mean,
                                      self.data.std, cfg.data.normalize)
            # the layers model.init_from matches are known (and frozen) before the optimizer
            # is built, so the checkpoint's graph is the same whichever way a session starts
            self.init = init_from.plan_for_run(
                self.model, self.run_dir, cfg.model.init_from, cfg.model.freeze_backbone, self.data.class_names,
                resuming=bool(checkpoint_candidates(self.run_dir.checkpoints))) \
                if cfg.model.init_from else None
            self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.epoch_sums = tf.Variable(np.zeros(3), dtype=tf.float64, trainable=False, name="epoch_sums")
            self.epoch_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_seconds")
            state = dict(step=self.step_var, epoch_sums=self.epoch_sums, epoch_seconds=self.epoch_seconds)
            self.lr_factor = None  # lowered by reduce-on-plateau, which is then on
            if cfg.optimizer.reduce_on_plateau.patience is not None:
                self.lr_factor = tf.Variable(1.0, dtype=tf.float32, trainable=False, name="lr_factor")
                state["lr_factor"] = self.lr_factor
            self.optimizers = self._optimizers()
            self.optimizer = self.optimizers[0]
            for hook in self.hooks:
                state.update(hook.setup(self))
        self.state = state  # every loop and hook variable, checkpointed beside the model
        objects = dict(model=self.model, optimizer=self.optimizer, seeds=seed_variables(self.model), **state,
                       **{f"optimizer_{i}": o for i, o in enumerate(self.optimizers) if i})
        size = 3 * sum(int(np.prod(v.shape)) * 4 for v in self.model.variables)  # weights + Adam slots
        self.checkpoints = Checkpoints(self.run_dir.checkpoints, objects, cfg.checkpoint,
                                       writer=self.rt.is_chief, all_save=self.rt.kind == "multiworker",
                                       size_bytes=size)

    def _optimizers(self) -> list:
        """One optimizer, or one per stage built over that stage's trainable variables (all
        in the checkpoint, so a stage resumes with its own optimizer state)."""
        cfg = self.cfg
        stages = cfg.training.stages or [None]
        out = []
        for st in stages:
            steps = st.epochs * self.steps_per_epoch if st else self.total_steps
            if st:
                freeze.set_trainable(self.model, st.trainable, cfg.model.bn_trainable)
            base_lr = st.learning_rate if st and st.learning_rate else cfg.optimizer.learning_rate
            lr = self.rt.scale_lr(base_lr, cfg.optimizer.scale_lr_with_workers)
            opt = make_optimizer(cfg.optimizer, lr, steps, self.lr_factor)
            if cfg.training.precision == "mixed_float16":  # its dynamic scale is checkpointed with it
                opt = compat.loss_scale_optimizer(opt, cfg.training.loss_scale_growth_steps)
            opt.build(self.model.trainable_variables)
            out.append(opt)
        if cfg.training.stages:
            freeze.set_trainable(self.model, stages[0].trainable, cfg.model.bn_trainable)
        return out

    def enter_stage(self, index: int) -> str:
        """Make stage ``index`` current: its trainable set, its optimizer, its compiled steps."""
        st = self.cfg.training.stages[index]
        what = freeze.set_trainable(self.model, st.trainable, self.cfg.model.bn_trainable)
        self.optimizer = self.optimizers[index]
        if index not in self._stage_steps:
            self._stage_steps[index] = self._build_steps()
        self.compiled = self._stage_steps[index]
        return what

    def _build_steps(self):
        t = self.cfg.training
        weights = class_weights(t.class_weight, self.data.splits["train"].labels, self.data.num_classes,
                                self.data.class_names)
        return build_steps(self.model, self.optimizer, self.rt, t.batch_size, weights, jit_compile=self.jit_compile,
                           loss=self.loss)

    # -- compiled calls -----------------------------------------------------------------
    def call(self, iterator, n: int, flags) -> tuple[np.ndarray, np.ndarray]:
        """``n`` train steps and the workers' summed flags: (sums, agreed flags)."""
        tf = self.tf
        sums, agreed = self.compiled.train_steps(iterator, tf.constant(n, tf.int64), tf.constant(flags, tf.float32))
        return sums.numpy(), agreed.numpy()

    def train_iterator(self, start_step: int = 0):
        """An iterator over this worker's training batches, from ``start_step`` on."""
        return iter(self._distributed(lambda: self.feeder.train_dataset(start_step=start_step)))

    def steps(self, iterator, n: int):
        """Run ``n`` compiled train steps (no stop or save votes); (loss sum, correct, count)."""
        return self.call(iterator, n, [0.0, 0.0])[0]

    def _distributed(self, fn):
        if self.rt.kind in ("none", "horovod"):
            return fn()
        return self.rt.strategy.distribute_datasets_from_function(lambda ctx: fn())

    def evaluate(self, split: str) -> dict:
        """Loss, accuracy and macro-F1 of a split ({} when it is empty)."""
        report = self.evaluate_report(split)
        return {} if report is None else {"loss": report.loss, "accuracy": report.accuracy, "f1": report.macro_f1}

    def evaluate_report(self, split: str):
        """A split's ``metrics.Report`` (confusion matrix, top-k hits, loss) from the compiled
        evaluation on every worker; None when the split is empty."""
        if len(self.data.splits[split]) == 0:
            return None
        sums = np.zeros(metrics.eval_width(self.data.num_classes))
        for x, y, w in self._eval_dataset(split):
            sums += self.compiled.eval_step(x, y, w).numpy()
        return metrics.from_sums(sums, self.data.class_names)

    def _eval_dataset(self, split: str):
        """A split's evaluation pipeline, built once per Trainer and iterated anew by each
        evaluation (every epoch's validation): building it traced its map function each time."""
        if split not in self._eval_datasets:
            self._eval_datasets[split] = self._distributed(lambda: self.feeder.eval_dataset(split))
        return self._eval_datasets[split]

    def learning_rate(self) -> float:
        return float(compat.to_numpy(self.optimizer.learning_rate))

    # -- restore ------------------------------------------------------------------------
    def restore(self, from_checkpoint: str | None = None) -> str:
        """Resume order: own checkpoint, --from, model.init_from, scratch.  Returns which.
        Under Horovod, rank 0's state is then broadcast to every rank."""
        origin = self._restore(from_checkpoint)
        hvd = self.rt.hvd
        if hvd is not None:
            keras_vars = list(self.model.variables) + list(self.optimizer.variables)
            hvd.broadcast_variables(compat.tf_variables(keras_vars) + list(self.state.values()), root_rank=0)
        return origin

    def _restore(self, from_checkpoint) -> str:
        say = self.say
        path = self.checkpoints.restore_latest(log=say)
        if path:
            say(f"resuming from {path} (step {int(self.step_var.numpy())})")
            return "checkpoint"
        if from_checkpoint:
            prefix = find_checkpoint(from_checkpoint)
            differ = config_differs(from_checkpoint, self.cfg)
            if differ is None:
                self.checkpoints.restore(prefix)
                say(f"starting from checkpoint {prefix} (step {int(self.step_var.numpy())})")
                return "from"
            why = restore_model_only(self.tf, self.model, prefix)
            if why:
                raise ModelError(f"--from {prefix}: its model does not fit this config's ({why})")
            say(f"starting from the model weights of {prefix} at step 0 (that run trained with other "
                f"{differ}, so its optimizer and counters do not apply)")
            return "from_weights"
        if self.init is not None:
            self.init.apply(self.model)
            left = self.init.left or []
            say(f"initialised {len(self.init.layers)} layers from {self.init.path}"
                + (" (frozen)" if self.init.frozen else "") + (f"; {self.init.note}" if self.init.note else "")
                + (f"; left as built: {', '.join(left[:10])}{' ...' if len(left) > 10 else ''}" if left else ""))
            return "init_from"
        return "scratch"

    def say(self, text: str):
        if self.verbose:
            print(text, flush=True)
