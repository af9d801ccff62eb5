"""``training.loss``: the one factory of the per-example loss that the train and eval steps use.

A loss is ``fn(y, probs) -> per-example loss`` (int labels of shape (B,), class probabilities
of shape (B, C), a float32 vector of shape (B,)).  The step weights it (class weights, the
padding mask), sums it and divides by the global batch itself, so every loss keeps the
global-batch mean under every strategy and mixed_float16's loss scaling; and the same loss
gives ``loss`` and ``val_loss``.

Built in:

* ``crossentropy`` (the default), with ``label_smoothing`` (targets ``(1 - s) * onehot + s / C``);
* ``focal`` (Lin et al. 2017): ``-sum_c alpha_c * t_c * (1 - p_c)^gamma * log p_c`` over the
  (smoothed) one-hot targets ``t``, with ``gamma`` and an optional per-class ``alpha``.

A name with a ``:`` (``module:function`` or ``file.py:function``) is the user's own loss:
:func:`user_loss` resolves it with the plugin loader (the run's copy of the file) and tries it
once on a small batch, so a loss that raises or gives no per-example vector is one line.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..config import ConfigError

BUILTIN = ("crossentropy", "focal")
EPSILON = 1e-7  # Keras' backend epsilon: probabilities are clipped to [eps, 1 - eps] before the log


def check_classes(loss_cfg, num_classes: int):
    """``alpha`` must give one weight per class of the data."""
    if loss_cfg.alpha is not None and len(loss_cfg.alpha) != num_classes:
        raise ConfigError("training.loss.alpha", "",
                          f"{len(loss_cfg.alpha)} values for {num_classes} classes (give one per class)")


def make_loss(loss_cfg, num_classes: int, user_fn: Optional[Callable] = None) -> Callable:
    """The per-example loss of ``training.loss`` (a ``LossConfig``) for ``num_classes`` classes."""
    name = loss_cfg.name
    check_classes(loss_cfg, num_classes)
    if name == "crossentropy":
        return crossentropy(loss_cfg.label_smoothing, num_classes)
    if name == "focal":
        return focal(loss_cfg.gamma, loss_cfg.alpha, loss_cfg.label_smoothing, num_classes)
    if user_fn is None:
        raise ConfigError("training.loss.name", "", f"{name!r}: a user loss needs its callable (not loaded)")
    return user_fn


def crossentropy(label_smoothing: float = 0.0, num_classes: int = 0) -> Callable:
    import keras
    import tensorflow as tf

    if not label_smoothing:
        return keras.losses.sparse_categorical_crossentropy  # the step's loss before training.loss existed

    def smoothed(y, probs):
        onehot = tf.one_hot(y, num_classes, dtype=probs.dtype)
        return keras.losses.categorical_crossentropy(onehot, probs, label_smoothing=label_smoothing)

    return smoothed


def focal(gamma: float, alpha: Optional[Sequence[float]], label_smoothing: float, num_classes: int) -> Callable:
    import tensorflow as tf

    def focal_loss(y, probs):
        probs = tf.cast(probs, tf.float32)
        target = tf.one_hot(y, num_classes, dtype=tf.float32)
        if label_smoothing:
            target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
        p = tf.clip_by_value(probs, EPSILON, 1.0 - EPSILON)
        per_class = -target * tf.pow(1.0 - p, gamma) * tf.math.log(p)
        if alpha is not None:
            per_class *= tf.constant(alpha, tf.float32)
        return tf.reduce_sum(per_class, axis=-1)

    return focal_loss


def numpy_loss(loss_cfg, num_classes: int, user_fn: Optional[Callable] = None) -> Callable:
    """The same loss on numpy arrays ``(labels, probs) -> per-example float64`` (for reports
    computed from predictions: the export's test metrics).  None for a user loss given no
    callable: the report then says crossentropy, as for a bundle evaluated on its own."""
    import numpy as np

    if loss_cfg.name not in BUILTIN and user_fn is None:
        return None
    fn = make_loss(loss_cfg, num_classes, user_fn)

    def on_arrays(labels, probs):
        import tensorflow as tf

        out = fn(tf.constant(np.asarray(labels, np.int32)), tf.constant(np.asarray(probs, np.float32)))
        return np.asarray(out, np.float64)

    return on_arrays


def user_loss(spec: str, num_classes: int) -> Callable:
    """The user's loss ``spec`` names, tried eagerly on two examples: it must run and return
    one value per example (a PluginError naming ``training.loss`` otherwise)."""
    import tensorflow as tf

    from .. import plugins

    key, where = "training.loss", plugins.where(spec)
    fn = plugins.load_plugin(spec, "loss", key)
    y, probs = tf.constant([0, num_classes - 1], tf.int64), tf.fill([2, num_classes], 1.0 / num_classes)
    out = plugins.call(fn, key, where, y, probs)
    try:
        shape = tuple(tf.convert_to_tensor(out).shape)
    except (TypeError, ValueError) as e:
        raise plugins.PluginError(f"{key}: {where}: {fn.__name__} returned no tensor ({type(e).__name__})") from None
    if shape != (2,):
        raise plugins.PluginError(f"{key}: {where}: {fn.__name__} returned shape {shape} for 2 examples; expected "
                                  "one loss per example, shape (2,)")
    return fn
