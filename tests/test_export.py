"""The export bundle: every format, parity with model.keras, the model card, SHA256SUMS,
``hpcjobs export`` and safe loading, on the quickstart (10 classes) and lfw (2 classes)."""
import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
import yaml

from hpcjobs import cli, config
from hpcjobs.export import formats
from hpcjobs.data import load_data

from bundle_runs import DATASETS, status, test_split, train
from conftest import QUICKSTART

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnxruntime"))
FORMATS = ["keras", "saved_model", "tflite", "tflite_int8"] + (["onnx"] if HAVE_ONNX else [])


@pytest.fixture(scope="module", params=list(DATASETS))
def run(request, tmp_path_factory):
    return train(tmp_path_factory, request.param, f"export.formats=[{','.join(FORMATS)}]")


def images_of(run):
    split = test_split(run)
    return np.asarray(split.images), np.asarray(split.labels)


def keras_probs(run, images):
    import keras

    model = keras.saving.load_model(str(run / "export" / "model.keras"), safe_mode=True)
    return model.predict(images.astype(np.float32), verbose=0)


def test_the_bundle_holds_every_format_and_its_sums(run):
    export = run / "export"
    for name in ("model.keras", "preprocessing.json", "labels.txt", "model_card.md", "SHA256SUMS",
                 "saved_model/saved_model.pb", "model.tflite", "model.int8.tflite"):
        assert (export / name).is_file(), name
    assert (export / "model.onnx").is_file() == HAVE_ONNX
    names = status(run)["test_metrics"]["class_names"]
    assert (export / "labels.txt").read_text().splitlines() == names
    listed = {}
    for line in (export / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    on_disk = {os.path.relpath(os.path.join(d, f), export) for d, _, fs in os.walk(export) for f in fs}
    assert set(listed) == on_disk - {"SHA256SUMS"}
    for rel, digest in listed.items():
        assert hashlib.sha256((export / rel).read_bytes()).hexdigest() == digest, rel
    assert not [n for n in os.listdir(export) if n.startswith(".")]  # no temporaries left


@pytest.mark.skipif(not HAVE_ONNX, reason="tf2onnx/onnxruntime not installed: pip install 'hpcjobs[onnx]'")
def test_onnx_is_there_when_tf2onnx_is(run):
    assert "onnx" in status(run)["export_parity"]


def test_every_format_agrees_with_model_keras(run):
    parity = status(run)["export_parity"]
    assert set(parity) == set(FORMATS) - {"keras"}
    images, _ = images_of(run)
    for fmt, p in parity.items():
        assert p["agreement"] >= 0.995, (fmt, p)
        assert p["images"] == len(images)
        assert p["max_prob_diff"] < (0.1 if fmt == "tflite_int8" else 1e-4), (fmt, p)
    # measured again here, format by format, through the same runners as hpcjobs infer
    reference = keras_probs(run, images)
    for fmt in parity:
        probs = formats.open_runner(str(run / "export" / formats.FILES[fmt])).predict(images)
        assert np.mean(probs.argmax(1) == reference.argmax(1)) >= 0.995, fmt


def test_tflite_runs_in_the_interpreter_tensorflow_supports(run):
    import tensorflow as tf

    if hasattr(tf, "lite") and hasattr(tf.lite, "Interpreter"):
        interpreter_class = tf.lite.Interpreter
    else:  # tf.lite is gone: LiteRT's interpreter
        from ai_edge_litert.interpreter import Interpreter as interpreter_class
    images, _ = images_of(run)
    reference = keras_probs(run, images).argmax(1)
    for name in ("model.tflite", "model.int8.tflite"):
        interpreter = interpreter_class(model_path=str(run / "export" / name))
        inp = interpreter.get_input_details()[0]
        assert inp["dtype"] == np.uint8 and list(inp["shape_signature"][1:]) == list(images.shape[1:])
        interpreter.resize_tensor_input(inp["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], images)
        interpreter.invoke()
        probs = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        assert np.mean(probs.argmax(1) == reference) >= 0.995, name


def test_saved_model_serves_raw_uint8_images_of_the_trained_size(run):
    import tensorflow as tf

    images, _ = images_of(run)
    serve = tf.saved_model.load(str(run / "export" / "saved_model")).signatures["serving_default"]
    spec = serve.structured_input_signature[1]["image"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, *images.shape[1:]]
    probs = serve(image=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(probs, keras_probs(run, images), atol=1e-5)


def card_of(run):
    text = (run / "export" / "model_card.md").read_text()
    _, head, body = text.split("---\n", 2)
    return yaml.safe_load(head), body


def test_model_card_renders_the_per_class_table_and_parity(run):
    head, body = card_of(run)
    assert head["library_name"] == "keras" and head["pipeline_tag"] == "image-classification"
    assert {"accuracy", "f1"} <= set(head["metrics"])
    st = status(run)
    assert head["model-index"][0]["results"][0]["metrics"][0]["value"] == round(st["test_accuracy"], 4)
    lines = body.splitlines()
    header = lines.index("| class | precision | recall | F1 | support |")
    for i, row in enumerate(st["test_metrics"]["per_class"]):
        cells = [c.strip() for c in lines[header + 2 + i].strip("|").split("|")]
        assert cells == [row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}",
                         str(row["support"])]
    for fmt, p in st["export_parity"].items():
        name = formats.FILES[fmt] + ("/" if fmt == "saved_model" else "")
        assert any(line.startswith(f"| `{name}` |") and f"{p['agreement']:.2%}" in line for line in lines), fmt
    for section in ("## Data and splits", "## Test metrics", "## Input format", "## Training",
                    "## Intended use and limits", "## Versions"):
        assert section in body
    assert "tensorflow 2." in body and "hpcjobs " in body
    assert f"the best by `{st['monitor']}`" in body and f"epoch {st['best_epoch']} of" in body


def export(*args):
    return cli.main(["export", *map(str, args)])


def test_hpcjobs_export_another_format_from_the_latest_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "latest"
    assert export(run, "--format", "keras,tflite", "--from", "latest", "--output", out) == 0
    text = capsys.readouterr().out
    assert "tflite: top-1 agreement" in text and "exported step" in text
    assert sorted(os.listdir(out)) == ["SHA256SUMS", "labels.txt", "model.keras", "model.tflite", "model_card.md",
                                       "preprocessing.json"]
    body = (out / "model_card.md").read_text()
    assert "the last weights (step" in body
    # the same weights as the run's last checkpoint
    import keras
    import tensorflow as tf

    from hpcjobs.models import build as models

    cfg = config.load(str(run / "config.yaml"))
    data = load_data(cfg)
    model = models.build(cfg.model, data.image_shape, data.num_classes, data.mean, data.std)
    tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(str(run / "checkpoints"))).expect_partial()
    exported = keras.saving.load_model(str(out / "model.keras"), safe_mode=True)
    for a, b in zip(model.get_weights(), exported.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_hpcjobs_export_from_a_checkpoint_prefix_and_a_bad_format(run, tmp_path, capsys):
    import tensorflow as tf

    prefix = tf.train.latest_checkpoint(str(run / "checkpoints"))
    assert export(run, "--from", prefix, "--output", tmp_path / "ck") == 0
    assert "exported step" in capsys.readouterr().out
    for name in ("model.keras", "model.tflite", "saved_model"):  # the run's own export.formats
        assert (tmp_path / "ck" / name).exists()
    assert "the last weights (step" in (tmp_path / "ck" / "model_card.md").read_text()
    capsys.readouterr()
    assert export(run, "--format", "keras,coreml") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "coreml" in err


def test_a_format_below_the_agreement_fails_naming_it(run, tmp_path, capsys, monkeypatch):
    import hpcjobs.export as bundle

    real = bundle.parity

    def worse(reference, paths, images):
        out = real(reference, paths, images)
        out["tflite"]["agreement"] = 0.9
        return out

    monkeypatch.setattr(bundle, "parity", worse)
    out = tmp_path / "bad"
    assert export(run, "--format", "keras,tflite", "--output", out) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export failed" in err and "tflite (90.00%)" in err
    assert not (out / "model.tflite").exists()  # not left to be shared
    assert "Removed for an agreement below" in (out / "model_card.md").read_text()


def test_infer_takes_the_tflite_and_saved_model_exports(run, tmp_path):
    import h5py

    images, _ = images_of(run)
    npz = tmp_path / "x.npz"
    np.savez(npz, images=images)
    top = {}
    for name in ("", "model.tflite", "saved_model"):
        out = tmp_path / f"out-{name or 'keras'}.h5"
        assert cli.main(["infer", "--model", str(run / "export" / name), "--input", str(npz),
                         "--output", str(out)]) == 0
        with h5py.File(out) as f:
            top[name] = f["probabilities"][...].argmax(1)
    assert np.mean(top["model.tflite"] == top[""]) >= 0.995
    assert np.mean(top["saved_model"] == top[""]) >= 0.995


@pytest.fixture(scope="module")
def lambda_export(tmp_path_factory):
    """An export whose model.keras holds a Lambda layer (Python code)."""
    import keras

    folder = tmp_path_factory.mktemp("lambda") / "export"
    folder.mkdir()
    x = keras.Input((8, 8, 1), name="image")
    y = keras.layers.Lambda(lambda t: t / 255.0, name="scale")(x)
    y = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(y))
    keras.Model(x, y).save(folder / "model.keras")
    info = {"format": "hpcjobs-preprocessing/1", "input_shape": [8, 8, 1], "class_names": [str(i) for i in range(10)]}
    (folder / "preprocessing.json").write_text(json.dumps(info))
    return folder


def test_a_model_with_a_lambda_layer_is_refused_unless_unsafe(lambda_export, tmp_path, capsys):
    npz = tmp_path / "x.npz"
    np.savez(npz, images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.arange(4))
    for argv in (["infer", "--model", str(lambda_export), "--input", str(npz), "--output", str(tmp_path / "o.csv")],
                 ["evaluate", str(lambda_export), "--data", str(npz)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Lambda layer (scale)" in err and "--unsafe" in err, err
    assert cli.main(["evaluate", str(lambda_export), "--data", str(npz), "--unsafe"]) == 0
    assert json.loads((lambda_export / "evaluation" / "metrics.json").read_text())["count"] == 4


def test_onnx_without_tf2onnx_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    assert cli.main(["train", QUICKSTART, "--run-dir", str(tmp_path / "r"), "--set", "export.formats=[onnx]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tf2onnx" in err and "hpcjobs[onnx]" in err
    assert not (tmp_path / "r" / "checkpoints").exists()
