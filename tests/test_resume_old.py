"""A checkpoint written by an older hpcjobs resumes on this one, bitwise.

tests/data/old_checkpoint/ is a run directory (its checkpoints/, config.yaml and run.json)
that the code before the restructure of issue 23 (commit 068413c) wrote when a time budget
stopped it at step 10 of 48, mid-epoch:

    python -m hpcjobs train configs/quickstart.yaml --run-dir RUN --time-budget 3s \\
        --set model.width=8 --set training.deterministic=true ... (OLD_RUN below)

whole.json holds what that code's uninterrupted run ended with. The test resumes the copy
with the code of today and trains the same run today: the two end equal, weights, metrics
and test accuracy, and equal to the old code's own run where the versions match. That
holds where this CPU rounds as the fixture's did (the test's docstring says what it checks
where it does not).
"""
import csv
import json
import shutil

import pytest

from conftest import QUICKSTART, REPO

FIXTURE = f"{REPO}/tests/data/old_checkpoint"
OLD_RUN = ["model.width=8", "training.deterministic=true", "training.epochs=4", "training.steps_per_epoch=12",
           "training.batch_size=64", "data.augment.flip_horizontal=true", "data.augment.rotation=10",
           "data.augment.zoom=0.1", "checkpoint.every_minutes=null"]


def _record(run):
    return json.loads((run / "run.json").read_text())


def _metrics(run):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(run / "metrics.csv"))]


def _tensors(prefix) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_dtype_map()
            if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def test_a_checkpoint_of_the_old_code_resumes_bitwise(tmp_path):
    """Today's code writes the same checkpoint at step 10 (every key; the counters, seeds
    and the like equal), and resumes the old one. Bitwise against today's own run where this
    CPU computes what the fixture's computed (its float state at step 10 equal): oneDNN picks
    its kernels by instruction set, so a CPU with other instructions (AVX-512, AMX) rounds
    the first 10 steps otherwise. On such a CPU the old checkpoint's floats are close to
    today's, and its resumed run is exact against itself: stopped after the call from step 30
    (at 36) and resumed, it ends with the weights of the straight resume."""
    import keras
    import numpy as np
    import tensorflow as tf

    from stops import StopAfterCallFrom
    from hpcjobs import config
    from hpcjobs.train import train

    if int(keras.__version__.split(".")[0]) < 3:
        pytest.skip("the fixture was written with Keras 3; Keras 2 names its optimizer variables otherwise")
    old = json.load(open(f"{FIXTURE}/whole.json"))
    cfg = config.load(QUICKSTART, OLD_RUN)

    def resumed_copy(name, stops=()):
        run = tmp_path / name
        shutil.copytree(FIXTURE, run, ignore=shutil.ignore_patterns("whole.json"))
        assert _record(run)["status"] == "stopped" and _record(run)["step"] == old["stopped_at_step"]
        codes = [train(cfg, str(run), verbose=False, hooks=[StopAfterCallFrom(at)]) for at in stops]
        assert codes == [75] * len(stops) and train(cfg, str(run), verbose=False) == 0
        record = _record(run)
        assert record["status"] == "finished"
        assert [s["start_step"] for s in record["sessions"]][:2] == [0, old["stopped_at_step"]]
        return run, record

    # today's run, stopped after its first call (step 10, as the fixture was) and resumed
    today = tmp_path / "today"
    assert train(cfg, str(today), verbose=False, hooks=[StopAfterCallFrom(0)]) == 75
    assert _record(today)["step"] == old["stopped_at_step"]
    mine = _tensors(today / "checkpoints" / "ckpt-10")
    assert train(cfg, str(today), verbose=False) == 0
    theirs = _tensors(f"{FIXTURE}/checkpoints/ckpt-10")
    assert sorted(theirs) == sorted(mine)
    floats = [k for k, v in mine.items() if v.dtype.kind == "f" and not k.startswith("epoch_seconds")]
    for k, v in mine.items():
        assert v.dtype == theirs[k].dtype and v.shape == theirs[k].shape, k
        if v.dtype.kind != "f":
            assert np.array_equal(v, theirs[k]), (k, v, theirs[k])
    same_arithmetic = all(np.array_equal(mine[k], theirs[k]) for k in floats)
    for k in floats:
        np.testing.assert_allclose(theirs[k], mine[k], rtol=1e-3, atol=1e-5, err_msg=k)

    parts, resumed = resumed_copy("parts")
    if same_arithmetic:
        uninterrupted = _record(today)
        assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
        assert _metrics(parts) == _metrics(today)
        assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
        if (tf.__version__, keras.__version__) == (old["tensorflow"], old["keras"]):
            assert resumed["weights_sha256"] == old["whole_run_weights_sha256"]
    else:
        print("this CPU rounds the first 10 steps otherwise than the fixture's: checked against itself")
        again, twice = resumed_copy("again", stops=(30,))
        assert [s["start_step"] for s in twice["sessions"]][2] > 30
        assert twice["weights_sha256"] == resumed["weights_sha256"]
        assert _metrics(again) == _metrics(parts)
        assert twice["test_accuracy"] == resumed["test_accuracy"]
