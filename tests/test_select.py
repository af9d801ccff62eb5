"""Model selection: the best epoch always kept and exported by default, export.from:
latest, checkpoint.every_epochs, val_f1 as the monitor, and exact resume with all of it."""
import csv
import json

import numpy as np
import pytest

from hpcjobs import cli

from conftest import QUICKSTART
from stops import train_in_sessions

# nothing after epoch 1 counts as better: the best epoch is 1, the last one is not
BEST_IS_FIRST = ["training.early_stopping.monitor=val_accuracy", "training.early_stopping.min_delta=10"]


def train(run, *items):
    return cli.main(["train", QUICKSTART, "--run-dir", str(run), *sum((["--set", s] for s in items), [])])


def status(run):
    return json.loads((run / "run.json").read_text())


def weights(path):
    import keras

    return keras.saving.load_model(str(path), safe_mode=True).get_weights()


def best_file(run, epoch):
    return run / "checkpoints" / "best" / f"epoch-{epoch:05d}.weights.h5"


def test_the_best_epoch_is_kept_and_exported_without_early_stopping(tmp_path):
    import keras

    run = tmp_path / "best"
    assert train(run, "training.epochs=3", *BEST_IS_FIRST) == 0
    st = status(run)
    assert st["best_epoch"] == 1 and st["final_weights"] == "best" and st["epoch"] == 3
    assert sorted(p.name for p in (run / "checkpoints" / "best").iterdir()) == ["epoch-00001.weights.h5"]
    model = keras.saving.load_model(str(run / "export" / "model.keras"), safe_mode=True)
    exported = model.get_weights()
    model.load_weights(str(best_file(run, 1)))
    for a, b in zip(exported, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert st["best"] == pytest.approx(float(rows[0]["val_accuracy"]), abs=1e-6)
    assert "epoch 1 of 3, the best by `val_accuracy`" in (run / "export" / "model_card.md").read_text()


def test_export_from_latest_takes_the_last_weights(tmp_path):
    import keras
    import tensorflow as tf

    best, latest = tmp_path / "b", tmp_path / "l"
    assert train(best, "training.epochs=2", *BEST_IS_FIRST) == 0
    assert train(latest, "training.epochs=2", *BEST_IS_FIRST, "export.from=latest") == 0
    assert status(latest)["final_weights"] == "latest"
    model = keras.saving.load_model(str(latest / "export" / "model.keras"), safe_mode=True)
    exported = model.get_weights()
    tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(str(latest / "checkpoints"))).expect_partial()
    for a, b in zip(exported, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    differ = [not np.array_equal(a, b) for a, b in zip(exported, weights(best / "export" / "model.keras"))]
    assert any(differ)  # same run, other weights: epoch 1's against epoch 2's


def test_checkpoint_every_epochs(tmp_path):
    run = tmp_path / "every"
    assert train(run, "training.epochs=4", "training.steps_per_epoch=5", "checkpoint.every_minutes=null",
                 "checkpoint.every_epochs=2", "checkpoint.max_to_keep=10") == 0
    import tensorflow as tf

    state = tf.train.get_checkpoint_state(str(run / "checkpoints"))
    assert [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths] == [10, 20]


def test_val_f1_as_the_monitor(tmp_path, capsys):
    run = tmp_path / "f1"
    assert train(run, "training.epochs=6", "training.early_stopping.monitor=val_f1",
                 "training.early_stopping.patience=1", "training.early_stopping.min_delta=0.5") == 0
    st = status(run)
    assert st["monitor"] == "val_f1" and st["sessions"][-1]["stopped_by"] == "early_stopping"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 2 and st["best_epoch"] == 1  # maximised: epoch 2 is not 0.5 better
    assert st["best"] == pytest.approx(float(rows[0]["val_f1"]), abs=1e-6)


DET = ["export.plots=false",
       "training.deterministic=true", "training.epochs=4", "training.steps_per_epoch=12", "training.batch_size=64",
       "data.augment.flip_horizontal=true", "checkpoint.every_minutes=null", "checkpoint.every_epochs=1",
       "checkpoint.max_to_keep=2", "training.early_stopping.monitor=val_f1"]


def test_sessions_equal_an_uninterrupted_run_with_the_best_export(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(whole, *DET) == 0
    assert train_in_sessions(parts, DET, stops=(11, 36)) == [75, 75, 0]  # inside epochs 1 and 3
    a, b = status(parts), status(whole)
    for key in ("weights_sha256", "best_epoch", "best", "test_metrics", "final_weights"):
        assert a[key] == b[key], key
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(whole / "metrics.csv"))]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(parts / "metrics.csv"))] \
        == strip
    for x, y in zip(weights(parts / "export" / "model.keras"), weights(whole / "export" / "model.keras")):
        np.testing.assert_array_equal(x, y)
    # the best epoch's file, and no file that no kept checkpoint names
    import tensorflow as tf

    kept = tf.train.get_checkpoint_state(str(parts / "checkpoints")).all_model_checkpoint_paths
    named = {int(tf.train.load_variable(p, "best_epoch/.ATTRIBUTES/VARIABLE_VALUE")) for p in kept}
    assert a["best_epoch"] in named
    assert {p.name for p in (parts / "checkpoints" / "best").iterdir()} == {best_file(parts, e).name for e in named}


def test_without_a_validation_split_the_last_weights_are_exported(tmp_path, capsys):
    run = tmp_path / "noval"
    assert train(run, "training.epochs=1", "data.validation_split=0") == 0
    assert status(run)["final_weights"] == "latest" and status(run)["best_epoch"] is None
    assert "the last weights (step" in (run / "export" / "model_card.md").read_text()
    assert cli.main(["export", str(run)]) == 0  # export.from: best by default, so the latest with a note
    assert "no best weights kept" in capsys.readouterr().out
    assert cli.main(["export", str(run), "--from", "best"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--from latest" in err
