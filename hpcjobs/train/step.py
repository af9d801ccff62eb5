"""The compiled part of training: the replica step, ``train_steps`` and ``eval_step``.

``build_steps`` needs only a model, its optimizer and a distribution runtime (from
``hpcjobs.distribute``): no data, no run directory.  ``train_steps(iterator, n,
flags)`` runs ``n`` train steps inside one tf.function, each one ``strategy.run`` of
the replica step (or a Horovod-wrapped step), then sums the workers' ``flags`` (stop,
checkpoint due): the one collective that keeps every worker's decisions equal.
Both return sums, never means, in float64: (loss sum, correct, count), and for evaluation
the top-k hits and the confusion matrix after them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import compat


@dataclass(frozen=True)
class Steps:
    train_steps: Callable  # (iterator, n: int64 tensor, flags: float32[2]) -> (sums[3], agreed flags[2])
    # (x, y, weight) -> [loss sum, correct, count, top-k hits..., confusion matrix row by row]
    # (hpcjobs.metrics.from_sums reads it)
    eval_step: Callable


def build_steps(model, optimizer, runtime, global_batch: int, class_weights=None, jit_compile: bool = False,
                loss=None) -> Steps:
    """``class_weights`` (one per class, or None) weight each example's training loss,
    as Keras' ``class_weight`` does; the reported training loss is the weighted one.
    ``jit_compile`` compiles the replica steps with XLA.  ``loss`` is the per-example
    loss of ``hpcjobs.train.losses`` (None: crossentropy), for training and evaluation alike."""
    import tensorflow as tf

    if loss is None:
        from .losses import crossentropy

        loss = crossentropy()
    strategy, hvd = runtime.strategy, runtime.hvd
    replica_step = _replica_train_step(model, optimizer, runtime, global_batch, class_weights, loss)
    replica_eval = _replica_eval_step(model, loss)
    if jit_compile:
        replica_step = tf.function(replica_step, jit_compile=True)
        replica_eval = tf.function(replica_eval, jit_compile=True)

    def reduce_sum(per_replica):
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        if hvd is not None:
            total = hvd.allreduce(total, op=hvd.Sum)
        return total

    @tf.function
    def train_steps(iterator, steps, flags):
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

    @tf.function
    def eval_step(x, y, w):
        return tf.cast(reduce_sum(strategy.run(replica_eval, args=(x, y, w))), tf.float64)

    return Steps(train_steps, eval_step)


def _replica_train_step(model, optimizer, runtime, global_batch: int, class_weights, loss_fn):
    """One replica's train step: (loss sum, correct, count).  A ``LossScaleOptimizer``
    (mixed_float16) gets the scaled loss and unscales the gradients itself; under
    Horovod the scaled gradients are averaged first, so every rank unscales alike."""
    import tensorflow as tf

    hvd = runtime.hvd
    weights = None if class_weights is None else tf.constant(class_weights, tf.float32)
    global_batch, replicas = float(global_batch), float(runtime.replicas)
    # Horovod averages gradients over ranks, tf.distribute sums them over replicas:
    # either way the update is the gradient of the global-batch mean loss.
    scale = float(hvd.size()) if hvd is not None else 1.0
    loss_scaled = compat.is_loss_scaled(optimizer)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            per_example = tf.cast(loss_fn(y, probs), tf.float32)
            if weights is not None:
                per_example *= tf.gather(weights, y)
            loss = tf.reduce_sum(per_example) / global_batch
            if model.losses:
                loss += tf.add_n(model.losses) / replicas
            loss *= scale
            if loss_scaled:
                loss = compat.scale_loss(optimizer, loss)
        variables = model.trainable_variables
        if hvd is not None:
            # Keras 3 variables have no .ref(): Horovod gets the tf.Variables behind them
            tape = hvd.DistributedGradientTape(tape, compression=runtime.compression or hvd.Compression.none)
            grads = tape.gradient(loss, compat.tf_variables(variables))
        else:
            grads = tape.gradient(loss, variables)
        if loss_scaled:
            grads = compat.unscale_gradients(optimizer, grads)
        optimizer.apply_gradients(zip(grads, variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32))
        return tf.stack([tf.reduce_sum(per_example), correct, tf.cast(tf.size(y), tf.float32)])

    return replica_step


def _replica_eval_step(model, loss_fn):
    """One replica's evaluation: weighted sums, top-k hits and the confusion matrix."""
    import tensorflow as tf

    num_classes = int(model.output_shape[-1])

    def replica_eval(x, y, w):
        probs = model(x, training=False)
        per_example = tf.cast(loss_fn(y, probs), tf.float32)
        predicted = tf.argmax(probs, -1, output_type=tf.int32)
        correct = tf.cast(tf.equal(predicted, y), tf.float32)
        sums = tf.stack([tf.reduce_sum(per_example * w), tf.reduce_sum(correct * w), tf.reduce_sum(w)])
        return tf.concat([sums, class_counts(tf.cast(probs, tf.float32), predicted, y, w, num_classes)], 0)

    return replica_eval


def class_counts(probs, predicted, y, w, num_classes: int):
    """Weighted top-k hits (k of ``metrics.top_ks``) and the confusion matrix, flat (float32)."""
    import tensorflow as tf

    from ..evaluation.metrics import top_ks

    hits = [tf.reduce_sum(tf.cast(tf.math.in_top_k(y, probs, k), tf.float32) * w) for k in top_ks(num_classes)]
    confusion = tf.math.confusion_matrix(y, predicted, num_classes=num_classes, weights=w, dtype=tf.float32)
    return tf.concat([tf.stack(hits), tf.reshape(confusion, [-1])], 0)
