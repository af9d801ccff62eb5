"""Every private API in hpcjobs.compat works against the installed packages (fails loudly if not)."""
import signal

import numpy as np
import pytest

from hpcjobs import compat

pytestmark = pytest.mark.tf214  # also run on TensorFlow 2.14 + Keras 2 (tests/tf214.sh)


def test_keras_async_checkpoint_twice(tmp_path):
    import keras
    import tensorflow as tf

    compat.fix_keras_async_checkpoint()
    layer = keras.layers.Dense(3, use_bias=False)
    layer.build((None, 1))
    v = layer.kernel  # a Keras variable on either Keras
    ckpt = tf.train.Checkpoint(v=v)
    options = tf.train.CheckpointOptions(enable_async=True)
    for i in range(2):  # the second async save is the one Keras 3 breaks without the fix
        v.assign(np.full((1, 3), i + 1, np.float32))
        path = ckpt.save(str(tmp_path / "c"), options=options)
        ckpt.sync()
    v.assign(np.zeros((1, 3), np.float32))
    ckpt.restore(path).assert_existing_objects_matched()
    assert v.numpy().tolist() == [[2.0, 2.0, 2.0]]
    assert compat.take_async_checkpoint_error(ckpt) is None


def test_async_checkpoint_error_is_taken_once(tmp_path):
    import tensorflow as tf

    ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
    assert compat.take_async_checkpoint_error(ckpt) is None  # no async save yet
    ckpt.save(str(tmp_path / "c"), options=tf.train.CheckpointOptions(enable_async=True))
    ckpt.sync()
    ckpt._async_checkpointer_impl._async_error = OSError("disk full")
    assert isinstance(compat.take_async_checkpoint_error(ckpt), OSError)
    assert compat.take_async_checkpoint_error(ckpt) is None


def test_submitit_signal(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    assert compat.submitit_signal() == (None, None)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "1")
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    sig, handler = compat.submitit_signal()
    assert sig == signal.SIGUSR2 and handler is signal.getsignal(signal.SIGUSR2)
    assert callable(compat.submitit_requeue_handler())


def test_keras_application_names_match_keras_applications():
    """Read without importing Keras, the names equal the models keras.applications exports."""
    names = compat.keras_application_names()
    import keras

    real = {n for n in dir(keras.applications) if n[:1].isupper() and callable(getattr(keras.applications, n))}
    assert names == real and "ResNet50" in names and "__class__" not in names


def test_optuna_trial_id_and_finished_state():
    import optuna

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    trial = study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    tid = compat.optuna_trial_id(frozen)
    assert not compat.optuna_trial_finished(study, tid)
    study.tell(trial, 1.0)
    assert compat.optuna_trial_finished(study, tid)


def test_op_determinism_turns_on_and_off_again():
    from tensorflow.python.framework import config

    try:
        compat.set_op_determinism(True)
        assert config.is_op_determinism_enabled()
        compat.set_op_determinism(False)
        assert not config.is_op_determinism_enabled()
    finally:
        compat.set_op_determinism(False)


def test_a_missing_private_api_is_one_line_and_exit_1(monkeypatch, tmp_path, capsys):
    """CompatError is a RunFailure: the cli says it in one line (exit 1), no traceback."""
    from hpcjobs import cli
    from hpcjobs.slurm import command

    def missing(args):
        raise compat.CompatError("keras.src.x: missing from the installed Keras (checked against 3.15.1)")

    monkeypatch.setattr(command, "cmd_status", missing)
    assert cli.main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "hpcjobs: status failed: keras.src.x: missing from the installed Keras (checked against 3.15.1)\n"
