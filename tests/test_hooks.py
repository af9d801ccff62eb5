"""The loop/hook split: a custom hook plugs in without touching loop.py; its state is
checkpointed and resumes exactly; the compiled step imports alone."""
import json
import subprocess
import sys

from hpcjobs import config
from hpcjobs.train import Hook, train

from conftest import QUICKSTART, REPO

DET = ["export.plots=false", "training.deterministic=true", "checkpoint.async_write=false"]


class RecordValidations(Hook):
    """Records the step of every validation, and counts them in a checkpointed variable."""

    def __init__(self):
        self.steps = []

    def setup(self, trainer):
        self.count = trainer.tf.Variable(0, dtype=trainer.tf.int64, trainable=False, name="validations")
        return {"validations": self.count}

    def epoch_end(self, loop, row):
        self.steps.append(row["step"])
        self.count.assign_add(1)
        return "enough" if int(self.count.numpy()) == 3 else None  # a hook may stop the run

    def summary(self, loop):
        return {"validations": int(self.count.numpy())}


def cfg(*sets):
    return config.load(QUICKSTART, [*DET, "training.epochs=5", *sets])


def test_custom_hook_sees_every_validation_and_can_stop(tmp_path):
    hook = RecordValidations()
    rc = train(cfg(), str(tmp_path / "r"), hooks=[hook], verbose=False)
    st = json.loads((tmp_path / "r" / "run.json").read_text())
    spe = st["steps_per_epoch"]
    assert hook.steps == [spe, 2 * spe, 3 * spe]
    assert st["validations"] == 3 and st["sessions"][-1]["stopped_by"] == "enough"
    assert rc == 75  # a reason other than finished/early stopping: stopped with a checkpoint


def test_hook_state_is_checkpointed_and_resumes(tmp_path):
    # two sessions cut by a time budget of one epoch's steps: the counter continues
    whole = RecordValidations()
    train(cfg("training.epochs=2"), str(tmp_path / "w"), hooks=[whole], verbose=False)
    run = str(tmp_path / "cut")
    first = RecordValidations()
    c = cfg("training.epochs=2")
    spe = json.loads((tmp_path / "w" / "run.json").read_text())["steps_per_epoch"]
    c1 = config.from_dict(config.to_dict(c), "x", ["training.epochs=1"])
    assert train(c1, run, hooks=[first], verbose=False) == 0
    second = RecordValidations()
    assert train(c, run, hooks=[second], verbose=False) == 0
    assert first.steps == [spe] and second.steps == [2 * spe]
    st = json.loads(open(f"{run}/run.json").read())
    assert st["validations"] == 2  # restored 1 from the checkpoint, then counted the second
    assert st["weights_sha256"] == json.loads((tmp_path / "w" / "run.json").read_text())["weights_sha256"]


def test_compiled_step_imports_alone_and_runs_without_data(tmp_path):
    code = ("import hpcjobs.train.step as s, sys; import keras, numpy as np, tensorflow as tf;"
            "from hpcjobs.cluster import info as cluster, distribute; from hpcjobs import config;"
            "rt = distribute.setup(config.DistributeConfig(), cluster.detect({}));"
            "m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation='softmax')]);"
            "o = keras.optimizers.SGD(0.1); o.build(m.trainable_variables);"
            "st = s.build_steps(m, o, rt, 8);"
            "ds = tf.data.Dataset.from_tensors((np.ones((8, 4), 'float32'), np.zeros(8, 'int32'))).repeat();"
            "sums, flags = st.train_steps(iter(ds), tf.constant(3, tf.int64), tf.constant([1.0, 0.0]));"
            "print(sums.numpy()[2], flags.numpy()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2", "HOME": str(tmp_path),
                              "PYTHONPATH": REPO})  # this checkout, whichever one the install points at
    assert out.returncode == 0, out.stderr[-2000:]
    count, flag = map(float, out.stdout.split())
    assert count == 24.0 and flag == 1.0  # 3 steps of 8 examples; the flag summed over 1 worker
    assert not list(tmp_path.glob("runs*"))  # no run directory made
