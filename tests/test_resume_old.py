"""A checkpoint written by an older hpcjobs resumes on this one, bitwise.

tests/data/old_checkpoint/ is a run directory (its checkpoints/, config.yaml and run.json)
that the code before the restructure of issue 23 (commit 068413c) wrote when a time budget
stopped it at step 10 of 48, mid-epoch:

    python -m hpcjobs train configs/quickstart.yaml --run-dir RUN --time-budget 3s \\
        --set model.width=8 --set training.deterministic=true ... (OLD_RUN below)

whole.json holds what that code's uninterrupted run ended with. The test resumes the copy
with the code of today and trains the same run uninterrupted: the two end equal, weights,
metrics and test accuracy, and equal to the old code's own run where the versions match.
"""
import csv
import json
import shutil

import pytest

from hpcjobs import cli

from conftest import QUICKSTART, REPO

FIXTURE = f"{REPO}/tests/data/old_checkpoint"
OLD_RUN = ["model.width=8", "training.deterministic=true", "training.epochs=4", "training.steps_per_epoch=12",
           "training.batch_size=64", "data.augment.flip_horizontal=true", "data.augment.rotation=10",
           "data.augment.zoom=0.1", "checkpoint.every_minutes=null"]


def _train(run):
    sets = sum((["--set", s] for s in OLD_RUN), [])
    return cli.main(["train", QUICKSTART, "--run-dir", str(run), *sets])


def _record(run):
    return json.loads((run / "run.json").read_text())


def _metrics(run):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(run / "metrics.csv"))]


def test_a_checkpoint_of_the_old_code_resumes_bitwise(tmp_path):
    import keras
    import tensorflow as tf

    if int(keras.__version__.split(".")[0]) < 3:
        pytest.skip("the fixture was written with Keras 3; Keras 2 names its optimizer variables otherwise")
    old = json.load(open(f"{FIXTURE}/whole.json"))
    parts = tmp_path / "parts"
    shutil.copytree(FIXTURE, parts, ignore=shutil.ignore_patterns("whole.json"))
    assert _record(parts)["status"] == "stopped" and _record(parts)["step"] == old["stopped_at_step"]
    assert _train(parts) == 0
    whole = tmp_path / "whole"
    assert _train(whole) == 0
    resumed, uninterrupted = _record(parts), _record(whole)
    assert resumed["status"] == "finished"
    assert [s["start_step"] for s in resumed["sessions"]] == [0, old["stopped_at_step"]]
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
    assert _metrics(parts) == _metrics(whole)
    assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
    if (tf.__version__, keras.__version__) == (old["tensorflow"], old["keras"]):
        assert resumed["weights_sha256"] == old["whole_run_weights_sha256"]
