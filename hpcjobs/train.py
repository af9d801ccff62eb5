"""The training loop: restore or init, compiled steps, the Python outer loop, hooks.

The compiled part is ``train_steps``: ``steps`` train steps inside one tf.function,
each ``strategy.run`` of one replica step (or a Horovod-wrapped step).  The Python
loop around it counts steps and epochs, validates, logs, checkpoints and stops on a
time budget or a signal.  It runs unchanged under the default strategy, Mirrored,
MultiWorkerMirrored and Horovod.

Resume order (the normal path): an existing checkpoint in the run directory, else
``--from CHECKPOINT``, else ``--init-weights FILE``, else from scratch.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import cluster as cluster_mod
from . import distribute, export, report, signals
from .checkpoint import Checkpoints, find_checkpoint, seed_variables, weights_digest
from .signals import StopFlag
from .config import Config, OptimizerConfig, dump
from .errors import EX_TEMPFAIL, RunFailure
from .units import parse_duration
from .data import load_data
from .data.feed import Feeder
from .rundir import RunDir, atomic_path, atomic_write

class TrainingDiverged(RunFailure):
    """The loss became NaN or infinite (exit code 1)."""


# --------------------------------------------------------------------------- optimizer
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


# --------------------------------------------------------------------------- the loop
@dataclass
class Session:
    start: float = field(default_factory=time.time)
    start_step: int = 0
    end: float | None = None
    end_step: int | None = None
    stopped_by: str | None = None
    job_id: str | None = None
    host: str = field(default_factory=lambda: os.uname().nodename)


def _monitor_better(value: float, best: float, direction: str, min_delta: float) -> bool:
    if math.isnan(best):
        return True
    return value < best - min_delta if direction == "min" else value > best + min_delta


class Trainer:
    """Builds everything a run needs; ``run()`` trains.  No work happens in __init__
    beyond building (nothing is restored or trained there)."""

    def __init__(self, cfg: Config, run_dir: str, *, runtime=None, info=None, data=None,
                 time_budget: str | None = None, verbose: bool = True):
        import keras
        import tensorflow as tf

        self.tf, self.keras = tf, keras
        self.cfg = cfg
        self.t0 = time.monotonic()
        self.info = info or cluster_mod.detect()
        self.rt = runtime or distribute.setup(cfg.distribute, self.info)
        t = cfg.training
        keras.utils.set_random_seed(t.seed)
        if t.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.run_dir = RunDir(run_dir, writer=self.rt.is_chief)
        self.verbose = verbose and self.rt.is_chief
        self.data = data or load_data(cfg)
        self.feeder = Feeder(self.data, feed=cfg.data.feed, memory_budget=cfg.data.memory_budget,
                             epochs_per_segment=cfg.data.epochs_per_segment, seed=cfg.data.seed + t.seed,
                             augment=cfg.data.augment, global_batch=t.batch_size, worker=self.rt.worker,
                             workers=self.rt.workers, local_replicas=self.rt.local_replicas)
        self.steps_per_epoch = t.steps_per_epoch or self.feeder.steps_per_pass
        self.total_steps = t.epochs * self.steps_per_epoch
        budget = time_budget or t.time_budget
        self.deadline = None
        if budget:
            self.deadline = self.t0 + parse_duration(budget)
        if self.info.job_end_time:
            job_deadline = self.t0 + (self.info.job_end_time - time.time())
            self.deadline = job_deadline if self.deadline is None else min(self.deadline, job_deadline)

        strategy = self.rt.strategy
        with strategy.scope():
            from .models import build

            self.model = build(cfg.model, self.data.image_shape, self.data.num_classes, self.data.mean,
                               self.data.std, cfg.data.normalize)
            lr = self.rt.scale_lr(cfg.optimizer.learning_rate, cfg.optimizer.scale_lr_with_workers)
            self.optimizer = make_optimizer(cfg.optimizer, lr)
            self.optimizer.build(self.model.trainable_variables)
            self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.epoch_sums = tf.Variable(np.zeros(3), dtype=tf.float64, trainable=False, name="epoch_sums")
            self.best = tf.Variable(float("nan"), dtype=tf.float64, trainable=False, name="best")
            self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="best_epoch")
            self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="wait")
            self.epoch_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_seconds")
        objects = dict(model=self.model, optimizer=self.optimizer, step=self.step_var,
                       epoch_sums=self.epoch_sums, best=self.best, best_epoch=self.best_epoch, wait=self.wait,
                       epoch_seconds=self.epoch_seconds, seeds=seed_variables(self.model))
        size = 3 * sum(int(np.prod(v.shape)) * 4 for v in self.model.variables)  # weights + Adam slots
        self.checkpoints = Checkpoints(self.run_dir.checkpoints, objects, cfg.checkpoint,
                                       writer=self.rt.is_chief, all_save=self.rt.kind == "multiworker",
                                       size_bytes=size)
        self._build_functions()

    # -- compiled functions -----------------------------------------------------------
    def _build_functions(self):
        tf, keras = self.tf, self.keras
        model, optimizer, strategy, rt = self.model, self.optimizer, self.rt.strategy, self.rt
        global_batch = float(self.cfg.training.batch_size)
        replicas = float(rt.replicas)
        hvd = rt.hvd

        # Horovod averages gradients over ranks, tf.distribute sums them over replicas:
        # either way the update is the gradient of the global-batch mean loss.
        scale = float(hvd.size()) if hvd is not None else 1.0

        def replica_step(x, y):
            with tf.GradientTape() as tape:
                probs = model(x, training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(y, probs)
                loss = tf.reduce_sum(per_example) / global_batch
                if model.losses:
                    loss += tf.add_n(model.losses) / replicas
                loss *= scale
            variables = model.trainable_variables
            if hvd is not None:
                # Keras 3 variables have no .ref(): Horovod gets the tf.Variables behind them
                grads = hvd.DistributedGradientTape(tape).gradient(loss, [v.value for v in variables])
            else:
                grads = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(grads, variables))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32))
            return tf.stack([tf.reduce_sum(per_example), correct, tf.cast(tf.size(y), tf.float32)])

        def reduce_sum(per_replica):
            total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            if hvd is not None:
                total = hvd.allreduce(total, op=hvd.Sum)
            return total

        @tf.function
        def train_steps(iterator, steps, flags):
            """``steps`` train steps, then the workers' flags (stop, checkpoint due) summed
            over all workers: the one collective that keeps every worker's decisions equal."""
            sums = tf.zeros(3, tf.float64)
            for _ in tf.range(steps):
                # one step at a time: collectives of two iterations must never overlap
                tf.autograph.experimental.set_loop_options(parallel_iterations=1)
                x, y = next(iterator)
                per_replica = strategy.run(replica_step, args=(x, y))
                sums += tf.cast(reduce_sum(per_replica), tf.float64)
            with tf.control_dependencies([sums]):
                agreed = reduce_sum(strategy.run(lambda: tf.identity(flags)))
            return sums, agreed

        def replica_eval(x, y, w):
            probs = model(x, training=False)
            per_example = keras.losses.sparse_categorical_crossentropy(y, probs)
            correct = tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32)
            return tf.stack([tf.reduce_sum(per_example * w), tf.reduce_sum(correct * w), tf.reduce_sum(w)])

        @tf.function
        def eval_step(x, y, w):
            return tf.cast(reduce_sum(strategy.run(replica_eval, args=(x, y, w))), tf.float64)

        self._train_steps, self._eval_step = train_steps, eval_step

    def train_iterator(self, start_step: int = 0):
        """An iterator over this worker's training batches, from ``start_step`` on."""
        return iter(self._distributed(lambda: self.feeder.train_dataset(start_step=start_step)))

    def steps(self, iterator, n: int):
        """Run ``n`` compiled train steps (no stop or save votes); (loss sum, correct, count)."""
        sums, _ = self._train_steps(iterator, self.tf.constant(n, self.tf.int64), self.tf.zeros(2, self.tf.float32))
        return sums.numpy()

    def _distributed(self, fn):
        strategy = self.rt.strategy
        if self.rt.kind in ("none", "horovod"):
            return fn()
        return strategy.distribute_datasets_from_function(lambda ctx: fn())

    def evaluate(self, split: str) -> dict:
        if len(self.data.splits[split]) == 0:
            return {}
        sums = np.zeros(3)
        for x, y, w in self._distributed(lambda: self.feeder.eval_dataset(split)):
            sums += self._eval_step(x, y, w).numpy()
        return {"loss": sums[0] / max(sums[2], 1), "accuracy": sums[1] / max(sums[2], 1)}

    def stop_reason(self, stop: StopFlag, call_seconds: float) -> str | None:
        """This worker's reason to stop after the next call: a signal or the time budget."""
        if stop.signal:
            return stop.signal
        if self.deadline is not None:
            margin = 1.5 * self.checkpoints.expected_save_seconds + 3 * call_seconds + 1.0
            if time.monotonic() + margin >= self.deadline:
                return "time_budget"
        return None

    # -- the loop ---------------------------------------------------------------------
    def restore(self, from_checkpoint: str | None = None, init_weights: str | None = None) -> str:
        """Resume order: own checkpoint, --from, --init-weights, scratch.  Returns which.
        Under Horovod, rank 0's state is then broadcast to every rank."""
        origin = self._restore(from_checkpoint, init_weights)
        hvd = self.rt.hvd
        if hvd is not None:
            state = [self.step_var, self.epoch_sums, self.best, self.best_epoch, self.wait, self.epoch_seconds]
            keras_vars = list(self.model.variables) + list(self.optimizer.variables)
            hvd.broadcast_variables([v.value for v in keras_vars] + state, root_rank=0)
        return origin

    def _restore(self, from_checkpoint, init_weights) -> str:
        say = self.say
        path = self.checkpoints.restore_latest(log=say)
        if path:
            say(f"resuming from {path} (step {int(self.step_var.numpy())})")
            return "checkpoint"
        if from_checkpoint:
            prefix = find_checkpoint(from_checkpoint)
            self.checkpoints.restore(prefix)
            say(f"starting from checkpoint {prefix} (step {int(self.step_var.numpy())})")
            return "from"
        if init_weights:
            from .models import init_from

            copied = init_from(self.model, init_weights)
            say(f"initialised {len(copied)} layers from {init_weights}")
            return "init_weights"
        return "scratch"

    def say(self, text: str):
        if self.verbose:
            print(text, flush=True)

    def run(self, from_checkpoint=None, init_weights=None) -> int:
        cfg, rd = self.cfg, self.run_dir
        t = cfg.training
        es = t.early_stopping
        if rd.writer:
            os.makedirs(rd.path, exist_ok=True)
            atomic_write(rd.config_yaml, dump(cfg))
        status = rd.read_status() if rd.writer else {}
        sessions = status.get("sessions", [])  # earlier sessions; this one is appended to them
        session = Session(job_id=self.info.job_id)
        stop = StopFlag()
        stop.install()
        try:
            origin = self.restore(from_checkpoint, init_weights)
            step = int(self.step_var.numpy())
            session.start_step = step
            history = [r for r in rd.read_metrics() if r["step"] <= step]
            status.pop("error", None)
            status.update(name=cfg.name, status="running", total_steps=self.total_steps,
                          steps_per_epoch=self.steps_per_epoch, feed=self.feeder.feed,
                          strategy=self.rt.kind, replicas=self.rt.replicas)
            status["sessions"] = sessions + [session.__dict__]
            rd.write_status(status)
            if self.verbose:
                self.say(f"training {cfg.name}: {len(self.data.splits['train'])} train / "
                         f"{len(self.data.splits['val'])} val / {len(self.data.splits['test'])} test images "
                         f"{self.data.image_shape}, {self.data.num_classes} classes, feed {self.feeder.feed}, "
                         f"strategy {self.rt.kind} x{self.rt.replicas}, start {origin} at step {step}/{self.total_steps}")
            progress = report.Progress(self.steps_per_epoch, t.epochs, t.log_every_steps, self.verbose)
            board = report.TensorBoard(rd.tensorboard, rd.writer)
            reason = self._loop(step, history, stop, progress, board)
            step = int(self.step_var.numpy())
            # the final state (no-op if just saved); an asynchronous write overlaps the test
            # evaluation and the export, and is waited for before run.json says it is done
            self.checkpoints.save(step)
            finished = reason in ("finished", "early_stopping")
            if finished:
                if es.patience is not None and es.restore_best and os.path.exists(self._best_path):
                    self.model.load_weights(self._best_path)
                    self.say(f"restored the best weights (epoch {int(self.best_epoch.numpy())})")
                test = self.evaluate("test")
                status.update({f"test_{k}": v for k, v in test.items()})
                if rd.writer:
                    export.save(self.model, export.preprocessing_info(self.data, cfg.data.normalize), rd.export)
                    if history:
                        report.plot_training(history, os.path.join(rd.plots, "training.png"))
            self.checkpoints.wait()
            digest = weights_digest(self.model)
            print(f"worker {self.rt.worker}/{self.rt.workers} step {step} weights sha256 {digest}", flush=True)
            session.end, session.end_step, session.stopped_by = time.time(), step, reason
            status["sessions"] = sessions + [session.__dict__]
            status.update(status="finished" if finished else "stopped", step=step,
                          epoch=step / self.steps_per_epoch, best=_nan_to_none(float(self.best.numpy())),
                          best_epoch=int(self.best_epoch.numpy()) or None, monitor=es.monitor,
                          weights_sha256=digest)
            if history:
                status["last"] = history[-1]
            rd.write_status(status)
            if finished:
                if "test_accuracy" in status:
                    self.say(f"test accuracy {status['test_accuracy']:.4f}, test loss {status['test_loss']:.4f}")
                self.say(f"model: {rd.export}/model.keras  plots: {rd.plots}/training.png  run: {rd.path}")
                return 0
            self.say(f"stopped ({reason}) at step {step}/{self.total_steps} with a checkpoint; "
                     f"run the same command again to continue")
            return EX_TEMPFAIL
        except BaseException as e:
            session.end, session.stopped_by = time.time(), f"error: {type(e).__name__}"
            status["sessions"] = sessions + [session.__dict__]
            status["status"] = "failed"
            status["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
            rd.write_status(status)
            raise
        finally:
            stop.uninstall()
            self.checkpoints.close()

    @property
    def _best_path(self) -> str:
        return os.path.join(self.run_dir.checkpoints, "best.weights.h5")

    def _loop(self, step, history, stop, progress, board) -> str:
        tf, cfg = self.tf, self.cfg
        t = cfg.training
        iterator = self.train_iterator(step)
        epoch_start = time.monotonic() - float(self.epoch_seconds.numpy())
        call_seconds = 0.0
        while step < self.total_steps:
            epoch_end = (step // self.steps_per_epoch + 1) * self.steps_per_epoch
            n = min(t.steps_per_call, epoch_end - step)
            if cfg.checkpoint.every_steps:
                n = min(n, cfg.checkpoint.every_steps - step % cfg.checkpoint.every_steps)
            local_reason = self.stop_reason(stop, call_seconds)
            flags = [local_reason is not None, self.checkpoints.due(step + n)]
            t_call = time.monotonic()
            sums, agreed = self._train_steps(iterator, tf.constant(n, tf.int64), tf.constant(flags, tf.float32))
            sums, (stop_votes, save_votes) = sums.numpy(), agreed.numpy()
            call_seconds = time.monotonic() - t_call
            step += n
            self.step_var.assign(step)
            self.epoch_sums.assign_add(sums)
            if not np.isfinite(sums[0]):
                raise TrainingDiverged(f"the loss became {sums[0]} at step {step}: lower optimizer.learning_rate "
                                       "or check the data")
            e = self.epoch_sums.numpy()
            progress.step(step, e[0] / e[2], e[1] / e[2], sums[2] / max(call_seconds, 1e-9))
            reason = None
            if step == epoch_end:
                self.epoch_seconds.assign(time.monotonic() - epoch_start)
                reason = self._end_epoch(step, history, progress, board)
                epoch_start = time.monotonic()
                self.epoch_sums.assign(np.zeros(3))
                self.epoch_seconds.assign(0.0)
                if reason:
                    return reason
            if step >= self.total_steps:
                return "finished"
            reason = (local_reason or stop.signal or "peer") if stop_votes > 0 else None
            if reason or save_votes > 0:
                self.epoch_seconds.assign(time.monotonic() - epoch_start)
                saved = self.checkpoints.save(step)
                if saved and reason is None and not progress.tty:  # a line in the logs, not on the bar
                    progress.say(f"checkpoint {os.path.basename(saved.path)} ({saved.seconds:.2f}s)")
            if reason:
                return reason
        return "finished"

    def _end_epoch(self, step, history, progress, board) -> str | None:
        cfg = self.cfg
        es = cfg.training.early_stopping
        e = self.epoch_sums.numpy()
        row = dict(epoch=step // self.steps_per_epoch, step=step, loss=e[0] / e[2], accuracy=e[1] / e[2])
        val = self.evaluate("val")
        row.update({f"val_{k}": v for k, v in val.items()})
        row["lr"] = float(self.keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        row["seconds"] = float(self.epoch_seconds.numpy())
        history.append(row)
        self.run_dir.write_metrics(history)
        board.scalars(step, row)
        progress.epoch(row)
        value = row.get(es.monitor)
        reason = None
        if value is not None:
            if _monitor_better(value, float(self.best.numpy()), es.direction, es.min_delta):
                self.best.assign(value)
                self.best_epoch.assign(row["epoch"])
                self.wait.assign(0)
                if es.patience is not None and self.run_dir.writer:
                    with atomic_path(self._best_path) as tmp:
                        self.model.save_weights(tmp)
            else:
                self.wait.assign_add(1)
                if es.patience is not None and int(self.wait.numpy()) >= es.patience:
                    self.say(f"early stopping: {es.monitor} has not improved for {es.patience} epochs "
                             f"(best {float(self.best.numpy()):.4f} at epoch {int(self.best_epoch.numpy())})")
                    reason = "early_stopping"
        return reason  # run() saves the final state


def _nan_to_none(x: float):
    return None if math.isnan(x) else x


def train(cfg: Config, run_dir: str, *, from_checkpoint=None, init_weights=None, time_budget=None,
          verbose=True) -> int:
    """Train a run (resuming it if it has a checkpoint); 0 finished, 75 stopped with more to do.

    The chief locks the run directory first, before TensorFlow is even imported, so a
    second process on the same run is refused at once."""
    with signals.held():  # until the loop's StopFlag takes them; released if building fails
        info = cluster_mod.detect()
        rd = RunDir(run_dir, writer=info.is_chief)
        if rd.writer:
            rd.lock()
        try:
            trainer = Trainer(cfg, run_dir, info=info, time_budget=time_budget, verbose=verbose)
            return trainer.run(from_checkpoint, init_weights)
        finally:
            rd.unlock()
