"""Every use of a private Keras, TensorFlow or submitit API, in one place.

Each function names the versions it was checked against.  None of them fails
silently: when the private name is gone, :class:`CompatError` says which one and
which version was expected, and ``tests/test_compat.py`` exercises every function
against the installed packages, so an upgrade that breaks one fails loudly there.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import signal

from .keras_api import CompatError


# --------------------------------------------------------------------------- Keras
_keras_async_fixed = False


def fix_keras_async_checkpoint():
    """Make TensorFlow's asynchronous checkpoints work with Keras 3 variables.

    Checked against Keras 3.15 (``keras.src.backend.tensorflow.core.Variable``) and
    TensorFlow 2.21.  TF's async writer copies every variable to a host-side twin
    inside a tf.function (``_copy_trackable_to_cpu``).  Keras 3's TF variable makes a
    new ``tf.Variable`` on *every* call, which tf.function refuses from the second
    save on ("tf.function only supports singleton tf.Variables").  The Keras variable
    is a wrapper whose checkpoint value is its inner ``tf.Variable``'s, so its twin
    can simply be the inner variable's twin, which TF refreshes on each save.

    Keras 2.14 (TF 2.14.1): nothing to do, its variables are ``tf.Variable``s (checked:
    three async saves through one checkpoint, restored)."""
    global _keras_async_fixed
    if _keras_async_fixed or not is_keras3():
        return
    try:
        from keras.src.backend.tensorflow.core import Variable
    except ImportError as e:
        raise CompatError("keras.src.backend.tensorflow.core.Variable is gone (checked with Keras 3.15): "
                          "set checkpoint.async_write: false") from e
    if not hasattr(Variable, "_copy_trackable_to_cpu"):
        raise CompatError("Keras' Variable._copy_trackable_to_cpu is gone (checked with Keras 3.15): "
                          "set checkpoint.async_write: false")

    def _copy_trackable_to_cpu(self, object_map):
        self.value._copy_trackable_to_cpu(object_map)
        object_map[self] = object_map[self.value]

    Variable._copy_trackable_to_cpu = _copy_trackable_to_cpu
    _keras_async_fixed = True


def keras_application_names() -> frozenset[str] | None:
    """The model names of ``keras.applications`` (ResNet50, MobileNetV2, ...), read
    without importing Keras (which imports TensorFlow: seconds), so a config can be
    checked on a login node; None when Keras is not installed.

    Checked against Keras 3.15: ``keras/applications/__init__.py`` is generated and
    imports every model as ``from keras.src.applications.<module> import <Name> as <Name>``."""
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "applications", "__init__.py")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError) as e:
        raise CompatError(f"cannot read keras.applications' names from {path} (checked with Keras 3.15): {e}")
    names = frozenset(a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom)
                      and (node.module or "").startswith("keras.src.applications.")
                      for a in node.names if (a.asname or a.name)[:1].isupper())
    if not names:
        raise CompatError(f"{path} names no models as `from keras.src.applications... import` "
                          "(checked with Keras 3.15)")
    return names


class _Requested(Exception):
    def __init__(self, request: dict):
        self.request = request


def keras_weights_request(constructor, **kwargs) -> dict:
    """The weights file a ``keras.applications`` constructor would download for
    ``weights="imagenet"``: ``{fname, origin, file_hash, cache_subdir}``, found without
    downloading anything.

    Checked against Keras 3.15: the constructors call
    ``keras.src.utils.file_utils.get_file(fname, origin, cache_subdir=..., file_hash=...)``
    once for the weights; that call is intercepted and abandoned.  Keras 2.14 calls the
    same function as ``keras.src.utils.data_utils.get_file``."""
    try:
        if is_keras3():
            from keras.src.utils import file_utils
        else:
            from keras.src.utils import data_utils as file_utils
    except ImportError as e:
        raise CompatError("keras.src.utils.file_utils (data_utils in Keras 2.14) is gone "
                          "(checked with Keras 3.15 and 2.14)") from e
    original = getattr(file_utils, "get_file", None)
    if original is None:
        raise CompatError("keras.src.utils.file_utils.get_file is gone (checked with Keras 3.15)")

    def capture(fname=None, origin=None, file_hash=None, cache_subdir="datasets", **_):
        raise _Requested({"fname": fname or os.path.basename(origin), "origin": origin, "file_hash": file_hash,
                          "cache_subdir": cache_subdir})

    file_utils.get_file = capture
    try:
        constructor(weights="imagenet", **kwargs)
    except _Requested as r:
        return r.request
    finally:
        file_utils.get_file = original
    raise CompatError(f"{getattr(constructor, '__name__', constructor)} asked for no weights file "
                      "(checked with Keras 3.15)")


# --------------------------------------------------------------------------- Optuna
def optuna_trial_id(trial) -> int:
    """The storage's id of an Optuna (frozen) trial, which ``study.tell`` and
    ``optuna.trial.Trial(study, id)`` take.  Checked against Optuna 5.0.0: ``_trial_id``."""
    if not hasattr(trial, "_trial_id"):
        raise CompatError("optuna's trials have no _trial_id (checked with Optuna 5.0.0)")
    return trial._trial_id


def optuna_trial_finished(study, trial_id: int) -> bool:
    """Whether trial ``trial_id`` has ended, read from the study's storage without a
    copy of every trial.  Checked against Optuna 5.0.0: ``study._storage.get_trial``."""
    storage = getattr(study, "_storage", None)
    if storage is None or not hasattr(storage, "get_trial"):
        raise CompatError("optuna's Study has no _storage.get_trial (checked with Optuna 5.0.0)")
    return storage.get_trial(trial_id).state.is_finished()


# --------------------------------------------------------------------------- TensorFlow
def set_op_determinism(on: bool) -> None:
    """Turn TensorFlow's op determinism on or off for this process.  The public API
    only turns it on (``tf.config.experimental.enable_op_determinism``); a second run in
    the same process (a search trial, a test) must not inherit the first one's setting,
    which refuses XLA's max-pool gradient.  Checked against TF 2.21:
    ``tensorflow.python.framework.config.disable_op_determinism``."""
    import tensorflow as tf
    from tensorflow.python.framework import config

    if on:
        tf.config.experimental.enable_op_determinism()
    elif hasattr(config, "disable_op_determinism"):
        config.disable_op_determinism()
    elif config.is_op_determinism_enabled():
        raise CompatError("TensorFlow has no way to turn op determinism off (checked with TF 2.21)")


def take_async_checkpoint_error(ckpt) -> BaseException | None:
    """The error of a failed asynchronous write of ``tf.train.Checkpoint`` ``ckpt``, once.

    Checked against TensorFlow 2.21: the writer thread keeps its exception in
    ``ckpt._async_checkpointer_impl._async_error`` to raise at interpreter exit; taking
    it (and clearing it) lets the caller report it now, in one line."""
    helper = getattr(ckpt, "_async_checkpointer_impl", None)
    if helper is None:
        return None  # no asynchronous save was ever made through this checkpoint
    if not hasattr(helper, "_async_error"):
        raise CompatError("tf.train.Checkpoint's async helper has no _async_error (checked with TF 2.21)")
    error, helper._async_error = helper._async_error, None
    return error


def save_checkpoint(manager, number: int, enable_async: bool, on_written):
    """``manager.save(checkpoint_number=number)`` (a ``tf.train.CheckpointManager``), with
    ``on_written(path)`` called once the files are written and before the manager's
    state file names the checkpoint (in the writer thread when ``enable_async``).

    Checked against TF 2.21 (``CheckpointOptions(experimental_write_callbacks=[...])``,
    to which the manager appends its own callback) and TF 2.14.1, whose options have no
    callbacks: there the checkpoint's ``_write(prefix, options, write_done_callback)``,
    which the manager calls with its own callback, is wrapped for this one save so
    ``on_written`` runs first."""
    import tensorflow as tf

    try:
        options = tf.train.CheckpointOptions(enable_async=enable_async, experimental_write_callbacks=[on_written])
    except TypeError:  # TF 2.14
        options = None
    if options is not None:
        return manager.save(checkpoint_number=number, options=options)
    ckpt = manager._checkpoint
    original = getattr(ckpt, "_write", None)
    if original is None:
        raise CompatError("tf.train.Checkpoint has no _write (checked with TF 2.14.1): "
                          "this TensorFlow offers no write callback")

    def write(prefix, options=None, write_done_callback=None):
        def done(path):
            on_written(path)
            if write_done_callback is not None:
                write_done_callback(path)

        return original(prefix, options=options, write_done_callback=done)

    object.__setattr__(ckpt, "_write", write)
    try:
        return manager.save(checkpoint_number=number, options=tf.train.CheckpointOptions(enable_async=enable_async))
    finally:
        object.__delattr__(ckpt, "_write")


# --------------------------------------------------------------------------- submitit
def submitit_signal() -> tuple[signal.Signals | None, object]:
    """(the signal submitit sends before the time limit, its current handler), or
    (None, None) outside a submitit job.

    Checked against submitit 1.5.4: ``JobEnvironment._usr_sig()`` reads
    SUBMITIT_PREEMPT_SIGNAL (USR2 by default)."""
    import submitit
    from submitit.core.job_environment import JobEnvironment

    if not hasattr(JobEnvironment, "_usr_sig"):
        raise CompatError("submitit's JobEnvironment._usr_sig is gone (checked with submitit 1.5.4)")
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return None, None
    sig = env._usr_sig()
    return sig, signal.getsignal(sig)


def submitit_requeue_handler():
    """submitit's own handler that checkpoints the callable and requeues the job.

    Checked against submitit 1.5.4 (``SignalHandler.checkpoint_and_try_requeue``)."""
    from submitit.core.job_environment import SignalHandler

    try:
        return SignalHandler.checkpoint_and_try_requeue
    except AttributeError as e:
        raise CompatError("submitit's SignalHandler.checkpoint_and_try_requeue is gone "
                          "(checked with submitit 1.5.4)") from e


# --------------------------------------------------------------------------- Keras 2 and 3
from .keras_api import (init_random_layers, is_keras3, is_loss_scaled, keras_major, loss_scale, loss_scale_optimizer, ops,  # noqa: E402
                        optimizer_options, registered_object, scale_loss, seed_variables, set_random_seed,
                        tf_variables, to_numpy, unscale_gradients, write_export_archive, load_weights_skipping)
