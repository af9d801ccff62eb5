"""model.arch: kerashub:PATH (issue 24 item 7): a KerasHub preset saved in a local folder by
the test (a small ResNet backbone built from its config, random weights, its image
converter) trains with a new head, with the preset's weights and preprocessing, stages
and freezing; without keras-hub, or with a folder that is no preset, it is one line, exit 2.

keras-hub is optional and installed without its dependencies (the README's "KerasHub presets"
and tests/setup.sh name the packages: its tensorflow-text dependency would pull a second
TensorFlow over tensorflow-cpu).  The tests that need it are skipped where it
is absent; the missing-package path is tested everywhere."""
import json
import sys

import numpy as np
import pytest

from hpcjobs import cli

from conftest import QUICKSTART, need_keras_hub

CHEAP = ["export.plots=false",
         "training.epochs=2", "training.steps_per_epoch=3", "training.batch_size=32", "checkpoint.every_minutes=null",
         "data.channels=1"]


def sets(*items):
    return sum((["--set", s] for s in items), [])


def train(run, *items):
    return cli.main(["train", QUICKSTART, "--run-dir", str(run), *sets(*CHEAP, *items)])


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    keras_hub = need_keras_hub()
    folder = tmp_path_factory.mktemp("kerashub") / "tiny_resnet"
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3))
    converter = keras_hub.layers.ResNetImageConverter(image_size=(24, 24), scale=1 / 255.0, offset=-0.5)
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder, backbone


def test_preset_trains_with_a_new_head_and_its_own_preprocessing(tmp_path, preset, capsys):
    import keras

    folder, backbone = preset
    run = tmp_path / "run"
    # the backbone frozen: after training it still holds the preset's weights
    assert train(run, f"model.arch=kerashub:{folder}", "model.freeze_backbone=true") == 0
    st = json.loads((run / "run.json").read_text())
    assert st["status"] == "finished" and st["test_accuracy"] is not None
    import zipfile

    with zipfile.ZipFile(run / "export" / "model.keras") as z:  # the bundle loads without KerasHub
        assert "keras_hub" not in z.read("config.json").decode()
    model = keras.models.load_model(str(run / "export" / "model.keras"))
    assert model.get_layer("resize_to_backbone").get_config()["height"] == 24
    rescale = model.get_layer("preprocess_kerashub").get_config()
    assert rescale["scale"] == pytest.approx(1 / 255.0) and rescale["offset"] == pytest.approx(-0.5)
    assert model.get_layer("head").get_weights()[0].shape[-1] == 10
    inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    conv = inner.get_layer("conv1_conv").get_weights()[0]
    np.testing.assert_array_equal(conv, backbone.get_layer("conv1_conv").get_weights()[0])


def test_preset_stages_unfreeze_its_blocks(tmp_path, preset, capsys):
    import keras

    folder, backbone = preset
    run = tmp_path / "run"
    stages = ("training.stages=[{epochs: 1, trainable: head}, {epochs: 1, trainable: {top_blocks: 1}}]")
    # export.from latest: the best epoch may be stage 1's, before the blocks trained
    assert train(run, f"model.arch=kerashub:{folder}", stages, "export.from=latest") == 0
    out = capsys.readouterr().out
    assert "the top 1 of" in out  # the preset's backbone was cut into blocks
    model = keras.models.load_model(str(run / "export" / "model.keras"))
    inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    stem = inner.get_layer("conv1_conv").get_weights()[0]
    np.testing.assert_array_equal(stem, backbone.get_layer("conv1_conv").get_weights()[0])  # never trained
    top = inner.get_layer("stack1_block0_2_conv").get_weights()[0]
    assert not np.array_equal(top, backbone.get_layer("stack1_block0_2_conv").get_weights()[0])  # trained


def test_without_keras_hub_it_is_one_line_naming_the_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub raises ImportError, as when absent
    folder = tmp_path / "preset"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert train(tmp_path / "run", f"model.arch=kerashub:{folder}") == 2
    err = capsys.readouterr().err
    assert "model.arch" in err and "KerasHub is not installed" in err and "keras-hub" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_folder_that_is_no_preset_is_one_line(tmp_path, capsys):
    need_keras_hub()
    assert train(tmp_path / "run", f"model.arch=kerashub:{tmp_path}") == 2
    err = capsys.readouterr().err
    assert "model.arch" in err and "not a KerasHub preset folder" in err and "Traceback" not in err
