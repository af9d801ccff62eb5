"""Transfer learning end to end: backbones with their own preprocessing, weights from
local files or the Keras cache (fetched from a local HTTP server, never at training
time), stages in one run with exact resume after SIGKILL, and the two-run flow."""
import functools
import hashlib
import http.server
import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

from hpcjobs import cli

from conftest import LEAN, QUICKSTART, REPO
from forked import Forked

DET = ["export.plots=false",
       "training.deterministic=true", "checkpoint.every_minutes=null", "checkpoint.async_write=false"]
APP = ["data.channels=3", "data.image_size=[32, 32]", "training.batch_size=32", "training.steps_per_epoch=4"]


def train(run, *sets, extra=()):  # LEAN: no test here looks at the plots
    return cli.main(["train", QUICKSTART, "--run-dir", str(run), *extra,
                     *sum((["--set", s] for s in (*LEAN, *sets)), [])])


def status(run):
    return json.loads((run / "run.json").read_text())


def legacy_notop_file(arch, path, shape=(32, 32, 3)):
    """A no-top weights file in the legacy layout Keras downloads (random weights: no
    ImageNet weights exist offline)."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    base = getattr(keras.applications, arch)(include_top=False, weights=None, input_shape=shape)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, base)
    return base


@pytest.mark.parametrize("arch, module", [("ResNet50", "resnet"), ("MobileNetV2", "mobilenet_v2"),
                                          ("DenseNet121", "densenet")], ids=["caffe", "tf", "torch"])
def test_export_on_raw_pixels_equals_preprocess_input_then_backbone(tmp_path, arch, module):
    import importlib

    import keras

    from hpcjobs import config
    from hpcjobs.models import build as models

    cfg = config.load(QUICKSTART, [f"model.arch={arch}", "data.channels=3"]).model
    model = models.build(cfg, (32, 32, 3), 4, None, None)
    path = tmp_path / "m.keras"
    model.save(path)
    exported = keras.models.load_model(path, safe_mode=True)
    raw = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    preprocess = importlib.import_module(f"keras.applications.{module}").preprocess_input
    base = next(layer for layer in exported.layers if isinstance(layer, keras.Model))
    ref = exported.get_layer("head")(exported.get_layer("pool")(base(preprocess(raw.copy()))))
    np.testing.assert_allclose(exported.predict(raw, verbose=0), keras.ops.convert_to_numpy(ref), atol=1e-5)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_weights_fetch_from_a_mirror_and_a_wrong_hash(tmp_path, mirror, capsys):
    from hpcjobs.models import backbones

    folder, url = mirror
    cache = tmp_path / "cache"
    # MobileNetV2: Keras publishes no hash for it; the file lands in the cache as served
    name = backbones.weights_request("MobileNetV2", (224, 224, 3))["fname"]
    (folder / name).write_bytes(b"weights of a mirror")
    assert cli.main(["weights", "fetch", "MobileNetV2", "--cache", str(cache), "--base-url", url]) == 0
    assert (cache / name).read_bytes() == b"weights of a mirror"
    # ResNet50: Keras publishes its md5; a file that does not match is refused and not kept
    req = backbones.weights_request("ResNet50", (224, 224, 3))
    assert req["file_hash"]
    (folder / req["fname"]).write_bytes(b"not the real file")
    assert cli.main(["weights", "fetch", "ResNet50", "--cache", str(cache), "--base-url", url]) == 2
    err = capsys.readouterr().err
    assert "is not the" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in cache.iterdir()) == [name]  # no partial or wrong file left


def test_imagenet_weights_from_the_cache_and_no_network_in_training(tmp_path, monkeypatch, capsys):
    from hpcjobs.models import backbones

    cache = tmp_path / "cache"
    cache.mkdir()
    sets = ["model.arch=MobileNetV2", "model.weights=imagenet", f"model.weights_cache={cache}", *APP,
            "training.epochs=1"]
    # missing: one line naming the file and the command that fetches it
    assert train(tmp_path / "missing", *sets) == 2
    err = capsys.readouterr().err
    assert "hpcjobs weights fetch MobileNetV2" in err and "is missing" in err and "Traceback" not in err
    name = backbones.weights_request("MobileNetV2", (32, 32, 3))["fname"]
    base = legacy_notop_file("MobileNetV2", cache / name)
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise OSError("network use during training")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert train(tmp_path / "cached", *sets, "checkpoint.async_write=false") == 0
    assert calls == []
    import keras

    model = keras.models.load_model(str(tmp_path / "cached" / "export" / "model.keras"))
    inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    # the first conv trained a little, but started from the cached file: same shapes, close values
    assert inner.get_layer("Conv1").get_weights()[0].shape == base.get_layer("Conv1").get_weights()[0].shape


STAGES = ("training.stages=[{epochs: 1, trainable: head, learning_rate: 0.01}, "
          "{epochs: 2, trainable: {top_blocks: 2}, learning_rate: 0.001}, "
          "{epochs: 1, trainable: all, learning_rate: 0.0001}]")


@pytest.mark.slow
def test_three_stages_on_a_keras_application_resume_exactly_after_sigkill(tmp_path):
    import keras

    wfile = tmp_path / "mnv2_notop.weights.h5"
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(wfile)
    sets = ["model.arch=MobileNetV2", f"model.weights={wfile}", *APP, *DET, STAGES, "checkpoint.every_steps=2"]
    whole = tmp_path / "whole"
    assert train(whole, *sets) == 0
    rows = [json.loads(json.dumps(r)) for r in __import__("csv").DictReader(open(whole / "metrics.csv"))]
    assert [r["stage"] for r in rows] == ["1", "2", "2", "3"]
    run = tmp_path / "killed"
    p = Forked(["train", QUICKSTART, "--run-dir", run, *sum((["--set", s] for s in (*LEAN, *sets)), [])], cwd=REPO)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "ckpt-8.index").exists():  # ckpt-6 is complete: stage 2 (steps 5..12)
        assert p.poll() is None and time.time() < deadline, "training ended before stage 2"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert train(run, *sets) == 0
    st = status(run)
    assert len(st["sessions"]) == 2 and 6 <= st["sessions"][-1]["start_step"] < 12  # resumed mid-stage 2
    assert st["weights_sha256"] == status(whole)["weights_sha256"]
    # the export takes raw pixels: its predictions on the raw test images give the test accuracy
    from hpcjobs import config
    from hpcjobs.data import load_data

    data = load_data(config.load(QUICKSTART, sets))
    model = keras.models.load_model(str(run / "export" / "model.keras"), safe_mode=True)
    x, y = data.splits["test"].images.astype(np.float32), data.splits["test"].labels
    assert abs(np.mean(model.predict(x, verbose=0).argmax(1) == y) - st["test_accuracy"]) < 1e-6


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_two_run_flow_carries_head_and_backbone(tmp_path, capsys):
    import keras

    base = tmp_path / "base"
    assert train(base, "training.epochs=1") == 0
    head_only = tmp_path / "head"
    assert train(head_only, "training.epochs=1", f"model.init_from={base}", "model.freeze_backbone=true") == 0
    a = keras.models.load_model(str(head_only / "export" / "model.keras"))
    b0 = keras.models.load_model(str(base / "export" / "model.keras"))
    np.testing.assert_array_equal(a.get_layer("conv1").get_weights()[0], b0.get_layer("conv1").get_weights()[0])
    capsys.readouterr()
    # the seeds' fine-tune: --from the head-only run with the backbone unfrozen (crashed before)
    fine = tmp_path / "fine"
    assert train(fine, "training.epochs=1", "model.freeze_backbone=false", extra=["--from", str(head_only)]) == 0
    assert "starting from the model weights" in capsys.readouterr().out
    # --init-weights with another trainable set: head and backbone carried over
    staged = tmp_path / "staged"
    assert train(staged, "training.stages=[{epochs: 1, trainable: head}]", "optimizer.learning_rate=1e-12",
                 extra=["--init-weights", str(head_only)]) == 0
    out = capsys.readouterr().out
    carried = [layer.name for layer in a.layers if layer.weights]  # conv1, conv2, dense1 and the head
    assert "head" in carried and f"initialised {len(carried)} layers" in out and "fresh head" not in out
    c = keras.models.load_model(str(staged / "export" / "model.keras"))
    np.testing.assert_allclose(c.get_layer("head").get_weights()[0], a.get_layer("head").get_weights()[0],
                               atol=1e-6)


def test_a_resumed_init_from_run_needs_no_source(tmp_path):
    import keras

    base = tmp_path / "base"
    assert train(base, "training.epochs=1", "training.steps_per_epoch=5") == 0
    conv1 = keras.models.load_model(str(base / "export" / "model.keras")).get_layer("conv1").get_weights()[0]
    run = tmp_path / "head"
    sets = ("training.epochs=3", "training.steps_per_epoch=5", f"model.init_from={base}", "model.freeze_backbone=true",
            "checkpoint.every_minutes=null")
    assert train(run, *sets, extra=["--time-budget", "1s"]) == 75  # stopped with a checkpoint, more to do
    assert json.loads((run / "run.json").read_text())["status"] == "stopped"
    plan = json.loads((run / "init_from.json").read_text())
    assert "conv1" in plan["layers"] and plan["frozen"] is True
    os.rename(base, tmp_path / "moved")  # the source is gone
    assert train(run, *sets) == 0
    st = json.loads((run / "run.json").read_text())
    assert st["status"] == "finished" and len(st["sessions"]) == 2
    after = keras.models.load_model(str(run / "export" / "model.keras"))
    np.testing.assert_array_equal(after.get_layer("conv1").get_weights()[0], conv1)  # still frozen
    # a run that has not started needs its source, and says so in one line
    assert train(tmp_path / "fresh", *sets) == 2


def test_transfer_mismatches_are_one_line(tmp_path, capsys):
    faces = tmp_path / "faces"
    assert train(faces, "data.source=lfw", "model.arch=small_resnet", "model.width=8", "training.epochs=1") == 0
    capsys.readouterr()
    # another architecture: exit 2 naming the layers that differ
    assert train(tmp_path / "x", "training.epochs=1", f"model.init_from={faces}") == 2
    err = capsys.readouterr().err
    assert "architectures differ" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # another number of classes: the backbone comes along, the head is fresh, and it says so
    assert train(tmp_path / "y", "training.epochs=1", "model.arch=small_resnet", "model.width=8",
                 f"model.init_from={faces}") == 0
    assert "a fresh head" in capsys.readouterr().out


def test_negative_transfer_check_records_both_curves(tmp_path, capsys):
    base = tmp_path / "base"
    assert train(base, "training.epochs=1", "training.steps_per_epoch=5") == 0
    run = tmp_path / "t"
    assert train(run, "training.epochs=2", "data.max_per_class=20", f"model.init_from={base}",
                 "transfer.compare_scratch_epochs=2") == 0
    st = status(run)["transfer_check"]
    assert st["epochs"] == 2 and len(st["transferred_curve"]) == 2 and len(st["scratch_curve"]) == 2
    assert (run / "scratch-baseline" / "run.json").exists()
    out = capsys.readouterr().out
    assert ("negative transfer" in out) == st["behind"] and "from scratch" in out


def test_transfer_beats_scratch_on_little_data(tmp_path):
    """The small version of benchmarks/transfer.py: a backbone trained by hpcjobs on the
    digits 0-4, moved to the digits 5-9 it never saw with 20 training images per class;
    against scratch at equal epochs and the same seed (deterministic)."""
    arch = ["model.arch=small_resnet", "model.width=16", "training.deterministic=true"]
    source = tmp_path / "source"
    assert train(source, "data.classes=['0', '1', '2', '3', '4']", "training.epochs=5", *arch) == 0
    target = ["data.classes=['5', '6', '7', '8', '9']", "data.max_per_class=20", "training.epochs=10",
              "training.batch_size=20", *arch]
    assert train(tmp_path / "scratch", *target) == 0
    assert train(tmp_path / "transfer", *target, f"model.init_from={source}") == 0
    scratch, transferred = (status(tmp_path / k)["test_accuracy"] for k in ("scratch", "transfer"))
    assert transferred >= scratch + 0.05, (scratch, transferred)
