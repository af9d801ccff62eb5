"""Keras 3 (TensorFlow >= 2.16) and Keras 2 (``tf.keras``, TensorFlow 2.14) side by side.

hpcjobs runs on two stacks: TensorFlow 2.21 with Keras 3.15 (pip), and TensorFlow
2.14.1 with Keras 2.14.0 (what Open-CE 1.11 ships for Bede's POWER9 nodes).  On both,
``import keras`` is the Keras the installed TensorFlow uses (Keras 2.14 is the package
behind ``tf.keras``), and most of the API is the same.  Where it is not, the rest of
hpcjobs calls one function here, which has both implementations next to each other
(keras-tuner's ``keras_tuner/backend/`` did the same).  Nothing outside ``compat`` asks
which Keras it is.  Each function says the versions it was checked against.
"""
from __future__ import annotations

import functools
import types

from ..errors import RunFailure


class CompatError(RunFailure):
    """A private API hpcjobs relies on is missing from the installed package: one line
    naming it (exit 1), not a traceback."""


@functools.cache
def keras_major() -> int:
    """3 for Keras 3, 2 for Keras 2 (``tf.keras``).  Checked with Keras 3.15.1 and 2.14.0."""
    import keras

    return int(str(keras.__version__).split(".")[0])


def is_keras3() -> bool:
    return keras_major() >= 3


@functools.cache
def ops():
    """The backend ops the learning-rate schedules use: ``keras.ops`` on Keras 3; on
    Keras 2 (no ``keras.ops``) the same names over TensorFlow's ops, which is what
    ``keras.ops`` runs on the TensorFlow backend.  Checked with Keras 3.15.1 and 2.14.0."""
    if is_keras3():
        import keras.ops

        return keras.ops
    import tensorflow as tf

    def where(c, a, b):
        a, b = tf.convert_to_tensor(a, tf.float32), tf.convert_to_tensor(b, tf.float32)
        return tf.where(c, a, b)

    return types.SimpleNamespace(
        cast=lambda x, dtype: tf.cast(x, dtype), where=where, floor=tf.floor, abs=tf.abs,
        maximum=lambda a, b: tf.maximum(tf.cast(a, tf.float32), tf.cast(b, tf.float32)),
        power=lambda a, b: tf.pow(tf.cast(a, tf.float32), tf.cast(b, tf.float32)), cos=tf.cos,
        clip=lambda x, lo, hi: tf.clip_by_value(x, lo, hi), convert_to_numpy=to_numpy)


def to_numpy(x):
    """A tensor or variable as numpy.  Keras 3: ``keras.ops.convert_to_numpy``; Keras 2:
    ``.numpy()`` (a float stays a float).  Checked with Keras 3.15.1 and 2.14.0."""
    if is_keras3():
        import keras

        return keras.ops.convert_to_numpy(x)
    return x.numpy() if hasattr(x, "numpy") else x


def set_random_seed(seed: int) -> None:
    """Seed Python, numpy and TensorFlow, and make Keras' random layers draw from state
    that a checkpoint holds.  Keras 3: ``keras.utils.set_random_seed`` (Dropout's
    SeedGenerator state is a variable).  Keras 2.14: Dropout uses TF's legacy stateful
    random ops, whose state no checkpoint reaches, unless ``enable_tf_random_generator``
    is on: then each random layer draws from a ``tf.random.Generator`` the model tracks.
    Checked with Keras 3.15.1 and 2.14.0."""
    import keras

    if not is_keras3():
        keras.backend.experimental.enable_tf_random_generator()
    keras.utils.set_random_seed(seed)


def _random_generators(model) -> list:
    """Keras 2.14: the ``keras.backend.RandomGenerator`` of every random layer (Dropout,
    the Random* layers), nested models included (private: ``_random_generator``)."""
    out, stack = [], list(model.layers)
    while stack:
        layer = stack.pop(0)
        stack.extend(getattr(layer, "layers", []) or [])
        gen = getattr(layer, "_random_generator", None)
        if gen is not None:
            if not hasattr(gen, "_maybe_init"):
                raise CompatError("Keras' RandomGenerator has no _maybe_init (checked with Keras 2.14.0)")
            out.append(gen)
    return out


def init_random_layers(model) -> None:
    """Make the random layers' generator state exist now, in the strategy scope the model
    is built in, before a checkpoint is made of it.  Keras 3: nothing to do (a layer's
    SeedGenerator is made with the layer).  Keras 2.14: each random layer makes its
    ``tf.random.Generator`` at its first call; made here instead.  Checked with Keras
    3.15.1 and 2.14.0."""
    if is_keras3():
        return
    for gen in _random_generators(model):
        gen._maybe_init()


def seed_variables(model) -> list:
    """The random layers' generator states, which a ``tf.train.Checkpoint`` of the model
    does not reach by itself.  Keras 3: the SeedGenerator states (named
    ``seed_generator_state``).  Keras 2.14: the state of each layer's
    ``tf.random.Generator`` (``init_random_layers`` made them; the model does not track
    them).  Checked with Keras 3.15.1 and 2.14.0."""
    if not is_keras3():
        return [g._generator.state for g in _random_generators(model) if getattr(g, "_generator", None) is not None]
    return [v for v in model.non_trainable_variables if "seed_generator_state" in v.path]


def tf_variables(variables) -> list:
    """The ``tf.Variable`` behind each Keras variable (what Horovod takes).  Keras 3 wraps
    one in ``.value``; Keras 2's variables are ``tf.Variable``s.  Checked with Keras
    3.15.1 and 2.14.0."""
    if is_keras3():
        return [v.value for v in variables]
    return list(variables)


def optimizer_options() -> dict:
    """Constructor options every optimizer gets.  Keras 2.14's optimizers compile their
    update with XLA by default (``jit_compile=True``), outside hpcjobs'
    ``training.jit_compile`` and op determinism: turned off.  Keras 3 has no such option.
    Checked with Keras 3.15.1 and 2.14.0."""
    return {} if is_keras3() else {"jit_compile": False}


def loss_scale_optimizer(optimizer, growth_steps: int):
    """``optimizer`` with dynamic loss scaling (mixed_float16), initial scale 2**15.
    Keras 3: ``keras.optimizers.LossScaleOptimizer``; Keras 2.14:
    ``keras.mixed_precision.LossScaleOptimizer``.  Checked with Keras 3.15.1 and 2.14.0."""
    import keras

    if is_keras3():
        return keras.optimizers.LossScaleOptimizer(optimizer, dynamic_growth_steps=growth_steps)
    return keras.mixed_precision.LossScaleOptimizer(optimizer, dynamic=True, initial_scale=2.0 ** 15,
                                                    dynamic_growth_steps=growth_steps)


def is_loss_scaled(optimizer) -> bool:
    """Whether ``optimizer`` scales the loss.  Checked with Keras 3.15.1 and 2.14.0."""
    import keras

    cls = keras.optimizers.LossScaleOptimizer if is_keras3() else keras.mixed_precision.LossScaleOptimizer
    return isinstance(optimizer, cls)


def scale_loss(optimizer, loss):
    """The loss times the optimizer's loss scale.  Keras 3: ``scale_loss``; Keras 2.14:
    ``get_scaled_loss``.  Checked with Keras 3.15.1 and 2.14.0."""
    return optimizer.scale_loss(loss) if is_keras3() else optimizer.get_scaled_loss(loss)


def unscale_gradients(optimizer, grads):
    """Gradients of a scaled loss, made ready for ``apply_gradients``.  Keras 3's
    LossScaleOptimizer unscales (and skips non-finite steps) inside ``apply_gradients``:
    unchanged.  Keras 2.14's only skips: they are divided by the scale here
    (``get_unscaled_gradients``).  Checked with Keras 3.15.1 and 2.14.0."""
    return grads if is_keras3() else optimizer.get_unscaled_gradients(grads)


def loss_scale(optimizer) -> float:
    """The current dynamic loss scale.  Keras 3: ``scale_loss(1.0)``; Keras 2.14:
    ``loss_scale``.  Checked with Keras 3.15.1 and 2.14.0."""
    value = optimizer.scale_loss(1.0) if is_keras3() else optimizer.loss_scale
    return float(to_numpy(value))


def write_export_archive(archive, path: str) -> None:
    """``keras.export.ExportArchive.write_out`` without its printout.  Keras 3 prints the
    endpoints unless ``verbose=False``; Keras 2.14 has no ``verbose`` and always prints
    them (``io_utils.print_msg``, to stdout): held back.  Checked with Keras 3.15.1 and 2.14.0."""
    if is_keras3():
        archive.write_out(path, verbose=False)
        return
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        archive.write_out(path)


def load_weights_skipping(model, path: str) -> None:
    """Load a ``.weights.h5`` into ``model``, skipping what does not fit (another shape, a
    layer missing): Keras 3 matches its own layout (layers in order), Keras 2's HDF5 weights
    are matched by layer name.  Checked with Keras 3.15.1 and 2.14.0."""
    if is_keras3():
        model.load_weights(path, skip_mismatch=True)
    else:
        model.load_weights(path, by_name=True, skip_mismatch=True)


def registered_object(name: str):
    """The class registered with Keras under ``name`` (``package>Class``), or None.
    Keras 3: ``keras.saving.get_registered_object``; Keras 2.14 has the same under
    ``tf.keras.saving`` (which is ``keras.saving``).  Checked with Keras 3.15.1 and 2.14.0."""
    import keras

    try:
        return keras.saving.get_registered_object(name)
    except (AttributeError, ValueError, TypeError):
        return None
