"""The Keras 2/3 functions of hpcjobs.compat on the installed stack (tests/tf214.sh runs them
on TensorFlow 2.14 + Keras 2.14, the main suite on TensorFlow >= 2.16 + Keras 3)."""
import numpy as np
import pytest

from hpcjobs import compat
from hpcjobs.compat import stack

pytestmark = pytest.mark.tf214


def test_save_checkpoint_calls_back_before_the_state_names_it(tmp_path):
    import tensorflow as tf

    ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=3)
    for enable_async in (False, True):
        seen = []

        def written(path):
            state = tf.train.get_checkpoint_state(str(tmp_path))
            seen.append((path, state.model_checkpoint_path if state else None))

        path = compat.save_checkpoint(manager, 7 if enable_async else 3, enable_async, written)
        ckpt.sync() if enable_async else None
        assert seen and seen[0][0] == path and seen[0][1] != path  # not yet named when called back
        assert tf.train.get_checkpoint_state(str(tmp_path)).model_checkpoint_path == path


def test_loss_scaling_scales_and_unscales_to_the_plain_update():
    import keras
    import tensorflow as tf

    plain_var, scaled_var = tf.Variable([1.0, 2.0]), tf.Variable([1.0, 2.0])
    plain = keras.optimizers.SGD(0.5, **compat.optimizer_options())
    scaled = compat.loss_scale_optimizer(keras.optimizers.SGD(0.5, **compat.optimizer_options()), 3)
    assert compat.is_loss_scaled(scaled) and not compat.is_loss_scaled(plain)
    assert compat.loss_scale(scaled) == 2.0 ** 15
    for opt, var in ((plain, plain_var), (scaled, scaled_var)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(var * var)
            if compat.is_loss_scaled(opt):
                loss = compat.scale_loss(opt, loss)
        grads = tape.gradient(loss, [var])
        if compat.is_loss_scaled(opt):
            grads = compat.unscale_gradients(opt, grads)
        opt.apply_gradients(zip(grads, [var]))
    np.testing.assert_array_equal(scaled_var.numpy(), plain_var.numpy())


def test_dropout_masks_resume_from_a_checkpoint(tmp_path):
    import keras
    import tensorflow as tf

    compat.set_random_seed(3)
    inputs = keras.Input((16,))
    model = keras.Model(inputs, keras.layers.Dropout(0.5)(keras.layers.Dense(16)(inputs)))
    compat.init_random_layers(model)
    ckpt = tf.train.Checkpoint(model=model, seeds=compat.seed_variables(model))
    assert compat.seed_variables(model)

    @tf.function
    def call(x):
        return model(x, training=True)

    x = tf.ones((4, 16))
    call(x)
    path = ckpt.save(str(tmp_path / "c"))
    after = [call(x).numpy() for _ in range(2)]
    ckpt.restore(path)
    again = [call(x).numpy() for _ in range(2)]
    np.testing.assert_array_equal(after, again)
    assert not np.array_equal(after[0], after[1])


def test_ops_give_the_schedules_what_they_use():
    ops = compat.ops()
    step = ops.cast(3, "float32")
    assert float(compat.to_numpy(ops.where(step < 5.0, 1.0, 2.0))) == 1.0
    assert float(compat.to_numpy(ops.power(2.0, ops.floor(step / 2.0)))) == 2.0
    assert float(compat.to_numpy(ops.maximum(0.0, ops.abs(-step)))) == 3.0
    assert float(compat.to_numpy(ops.clip(ops.cos(step * 0.0), 0.0, 0.5))) == 0.5


def test_stack_record_changes_and_legacy_runs():
    now = stack.current()
    assert stack.keras_major_of(now) == compat.keras_major()
    assert stack.keras_major_of(None) == 3 and "no stack recorded" in stack.describe(None)
    before = dict(now, tensorflow="0.0", packages=dict(now["packages"], numpy="0.0", gone="1.0"))
    changed = stack.changes(before, now)
    assert f"tensorflow 0.0 -> {now['tensorflow']}" in changed
    assert f"numpy 0.0 -> {now['packages']['numpy']}" in changed and "gone 1.0 -> (none)" in changed
    assert stack.changes(None, now) == [] and stack.changes(now, now) == []
    assert stack.same_family(None, now) == (compat.keras_major() == 3)
