"""The promises of model.init_from and model.head.include_top (issue 24 item 8): a
``.weights.h5`` written for the same architecture initialises a run (layers matched by name
and shape, what was filled and what was left reported); include_top keeps a pretrained
classifier only for the data's class count, else exit 2 naming the key."""
import json

import keras
import numpy as np
import pytest

from hpcjobs import cli

from conftest import QUICKSTART

CHEAP = ["export.plots=false", "training.epochs=1", "training.steps_per_epoch=3", "checkpoint.every_minutes=null"]


def sets(*items):
    return sum((["--set", s] for s in items), [])


def train(run, *items):
    return cli.main(["train", QUICKSTART, "--run-dir", str(run), *sets(*CHEAP, *items)])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained quickstart model's weights, saved as a .weights.h5 (model.save_weights)."""
    run = tmp_path_factory.mktemp("source") / "run"
    assert train(run) == 0
    model = keras.models.load_model(str(run / "export" / "model.keras"))
    path = run.parent / "quickstart.weights.h5"
    model.save_weights(str(path))
    return model, path


@pytest.mark.tf214
def test_weights_file_fills_every_layer_of_the_same_architecture(tmp_path, source, capsys):
    model, path = source
    run = tmp_path / "run"
    assert train(run, f"model.init_from={path}", "model.freeze_backbone=true") == 0
    out = capsys.readouterr().out
    assert f"initialised 4 layers from {path} (frozen)" in out and "left as built" not in out
    after = keras.models.load_model(str(run / "export" / "model.keras"))
    for name in ("conv1", "conv2", "dense1"):  # frozen: still the file's weights after training
        for a, b in zip(after.get_layer(name).get_weights(), model.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    plan = json.loads((run / "init_from.json").read_text())
    assert plan["layers"] == ["conv1", "conv2", "dense1", "head"] and plan["left"] == []


@pytest.mark.tf214
def test_weights_file_for_fewer_classes_leaves_a_fresh_head_and_says_so(tmp_path, source, capsys):
    model, path = source
    run = tmp_path / "run"
    assert train(run, f"model.init_from={path}", "model.freeze_backbone=true", "data.classes=[1, 2, 3]") == 0
    out = capsys.readouterr().out
    assert f"initialised 3 layers from {path} (frozen)" in out
    assert "a fresh head" in out and "left as built: head" in out
    after = keras.models.load_model(str(run / "export" / "model.keras"))
    np.testing.assert_array_equal(after.get_layer("conv1").get_weights()[0], model.get_layer("conv1").get_weights()[0])
    assert after.get_layer("head").get_weights()[0].shape == (128, 3)


def test_a_run_from_a_weights_file_resumes_without_it(tmp_path, source):
    """Cut by --time-budget, the run resumes from its own checkpoint with the weights file gone."""
    import shutil

    model, path = source
    mine = tmp_path / "mine.weights.h5"
    shutil.copy(path, mine)
    run = tmp_path / "run"
    items = ("training.epochs=3", "training.steps_per_epoch=5", f"model.init_from={mine}",
             "model.freeze_backbone=true")
    assert cli.main(["train", QUICKSTART, "--run-dir", str(run), *sets(*CHEAP, *items), "--time-budget", "1s"]) == 75
    mine.unlink()
    assert train(run, *items) == 0
    st = json.loads((run / "run.json").read_text())
    assert st["status"] == "finished" and len(st["sessions"]) == 2
    after = keras.models.load_model(str(run / "export" / "model.keras"))
    np.testing.assert_array_equal(after.get_layer("conv1").get_weights()[0], model.get_layer("conv1").get_weights()[0])


@pytest.mark.tf214
def test_weights_file_of_another_architecture_is_one_line(tmp_path, capsys):
    other = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(5, 5), keras.layers.Flatten(),
                              keras.layers.Dense(7)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(str(path))
    assert train(tmp_path / "run", f"model.init_from={path}") == 2
    err = capsys.readouterr().err
    assert "model.init_from" in err and str(path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


APP = ["model.arch=MobileNetV2", "data.image_size=[32, 32]", "data.channels=3",
       "model.head.include_top=true"]


def _top_weights(path, classes):
    keras.applications.MobileNetV2(include_top=True, weights=None, input_shape=(32, 32, 3),
                                   classes=classes).save_weights(str(path))


def test_include_top_with_another_class_count_is_exit_2_naming_the_key(tmp_path, capsys):
    path = tmp_path / "mnv2_top1000.weights.h5"
    _top_weights(path, 1000)
    assert train(tmp_path / "run", *APP, f"model.weights={path}") == 2
    err = capsys.readouterr().err
    assert "model.head.include_top" in err and "1000 classes" in err and "the data 10" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_include_top_with_the_data_class_count_keeps_that_classifier(tmp_path):
    path = tmp_path / "mnv2_top10.weights.h5"
    _top_weights(path, 10)
    run = tmp_path / "run"
    assert train(run, *APP, f"model.weights={path}", "optimizer.learning_rate=1e-9") == 0
    source = keras.applications.MobileNetV2(include_top=True, weights=None, input_shape=(32, 32, 3),
                                            classes=10)
    source.load_weights(str(path))
    after = keras.models.load_model(str(run / "export" / "model.keras"))
    inner = next(layer for layer in after.layers if isinstance(layer, keras.Model))
    # a learning rate of 1e-9: the classifier is still the file's (kept, not a new random head)
    np.testing.assert_allclose(inner.get_layer("predictions").get_weights()[0],
                               source.get_layer("predictions").get_weights()[0], atol=1e-6)
