"""Mixed precision and XLA in the compiled loop, on CPU (bfloat16 and float16 run here;
V100 speed is measured by benchmarks/throughput.py on a GPU node)."""
import json

import pytest

from hpcjobs import cli, config
from hpcjobs.train import Hook, train

from conftest import LEAN, QUICKSTART


def run_cli(run, *sets):  # LEAN: no test here looks at the plots
    return cli.main(["train", QUICKSTART, "--run-dir", str(run),
                     *sum((["--set", s] for s in (*LEAN, *sets)), [])])


def status(run):
    return json.loads((run / "run.json").read_text())


def _gpus():
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


@pytest.mark.parametrize("sets", [["training.precision=mixed_bfloat16"], ["training.jit_compile=true"]],
                         ids=["bfloat16", "xla"])
def test_quickstart_accuracy_with_mixed_bfloat16_and_with_xla(tmp_path, sets):
    assert run_cli(tmp_path / "r", *sets) == 0
    assert status(tmp_path / "r")["test_accuracy"] >= 0.95


def test_xla_after_a_deterministic_run_in_the_same_process(tmp_path):
    # op determinism is process-wide in TensorFlow: a deterministic run (a search trial,
    # an earlier test) must not leave it on for the next run, whose XLA step it refuses
    short = ["training.epochs=1", "training.steps_per_epoch=3"]
    assert run_cli(tmp_path / "det", *short, "training.deterministic=true") == 0
    assert run_cli(tmp_path / "xla", *short, "training.jit_compile=true") == 0
    assert status(tmp_path / "xla")["status"] == "finished"


def test_mixed_export_outputs_float32_and_loads_in_plain_keras(tmp_path):
    import keras
    import numpy as np

    # a narrow net: float16 convolutions are emulated on a CPU, at 10x float32's cost
    assert run_cli(tmp_path / "r", "training.precision=mixed_float16", "training.epochs=1", "model.width=8") == 0
    keras.mixed_precision.set_global_policy("float32")
    model = keras.models.load_model(str(tmp_path / "r" / "export" / "model.keras"), safe_mode=True)
    probs = model.predict(np.zeros((2, 8, 8, 1), np.float32), verbose=0)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1.0, atol=1e-3)


class RecordScale(Hook):
    def begin(self, loop):
        opt = loop.trainer.optimizer
        self.at_begin = (float(opt.dynamic_scale.numpy()), int(opt.step_counter.numpy()))


def test_loss_scale_resumes_at_the_saved_value(tmp_path):
    import tensorflow as tf

    sets = ["model.width=8",  # narrow: float16 convolutions are emulated on a CPU, at 10x float32's cost
            "training.precision=mixed_float16", "training.loss_scale_growth_steps=3", "training.epochs=2",
            "training.deterministic=true", "checkpoint.async_write=false"]
    run = str(tmp_path / "r")
    first = config.load(QUICKSTART, sets[:-3] + ["training.epochs=1", sets[-2], sets[-1]])
    assert train(first, run, verbose=False) == 0
    ckpt = tf.train.latest_checkpoint(f"{run}/checkpoints")
    saved = (float(tf.train.load_variable(ckpt, "optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE")),
             int(tf.train.load_variable(ckpt, "optimizer/step_counter/.ATTRIBUTES/VARIABLE_VALUE")))
    assert saved[0] != 32768.0  # it moved from the initial scale (grown every 3 steps, or halved)
    hook = RecordScale()
    assert train(config.load(QUICKSTART, sets), run, hooks=[hook], verbose=False) == 0
    assert hook.at_begin == saved


@pytest.mark.parametrize("sets, key", [
    (["training.jit_compile=true", "training.deterministic=true"], "training.jit_compile"),
    (["training.jit_compile=true", "distribute.strategy=horovod"], "training.jit_compile"),
    (["training.precision=float16"], "training.precision"),
    (["distribute.horovod_fusion_threshold=-1"], "distribute.horovod_fusion_threshold"),
])
def test_impossible_combinations_are_one_line(tmp_path, capsys, sets, key):
    assert run_cli(tmp_path / "r", *sets) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not _gpus(), reason="no GPU on this machine: mixed_float16 and XLA on a GPU run on V100 nodes")
def test_on_gpu_auto_xla_and_float16_use_the_gpu(tmp_path, capsys):
    assert run_cli(tmp_path / "r", "training.precision=mixed_float16", "training.jit_compile=auto",
                   "training.epochs=1") == 0
    assert status(tmp_path / "r")["test_accuracy"] > 0.5
