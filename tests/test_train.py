"""The training loop through the public interface, on real data."""
import csv
import json

import numpy as np
import pytest

from hpcjobs import cli, config
from hpcjobs.data import load_data
from hpcjobs.train import Trainer

from conftest import LEAN, QUICKSTART


def train(run, *sets):
    return cli.main(["train", QUICKSTART, "--run-dir", str(run), *sum((["--set", s] for s in sets), [])])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("quick") / "run"
    assert train(run, "training.epochs=2") == 0
    return run


def test_run_directory_layout(quick_run):
    for rel in ("config.yaml", "run.json", "metrics.csv", "plots/training.png", "export/model.keras",
                "export/preprocessing.json"):
        assert (quick_run / rel).is_file(), rel
    assert list((quick_run / "tensorboard").iterdir())
    status = json.loads((quick_run / "run.json").read_text())
    assert status["status"] == "finished"
    assert status["step"] == status["total_steps"] == 2 * status["steps_per_epoch"]
    assert 0.5 < status["test_accuracy"] <= 1.0
    assert status["sessions"][-1]["stopped_by"] == "finished"
    rows = list(csv.DictReader(open(quick_run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0])[:9] == ["epoch", "step", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds",
                                 "val_f1"]  # new columns are appended after these
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])
    resolved = config.load(str(quick_run / "config.yaml"))
    assert resolved.training.epochs == 2


def test_a_run_without_plots_leaves_its_figures_as_csv_and_json_only(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "training.epochs=1", "training.steps_per_epoch=3", "export.plots=false") == 0
    assert (run / "metrics.csv").is_file() and (run / "export" / "model.keras").is_file()
    for name in ("metrics.json", "per_class.csv", "confusion_matrix.csv"):
        assert (run / "evaluation" / name).is_file(), name
    assert not list(run.rglob("*.png"))
    assert "plots:" not in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["test_metrics"]["confusion_matrix"]


def test_export_loads_with_plain_keras_and_predicts_the_same(quick_run):
    import keras

    model = keras.models.load_model(str(quick_run / "export" / "model.keras"), safe_mode=True)
    info = json.loads((quick_run / "export" / "preprocessing.json").read_text())
    assert info["input_shape"] == [8, 8, 1] and len(info["class_names"]) == 10
    cfg = config.load(str(quick_run / "config.yaml"))
    data = load_data(cfg)
    x = data.splits["test"].images[:64].astype(np.float32)
    probs = model.predict(x, verbose=0)
    acc = np.mean(probs.argmax(1) == data.splits["test"].labels[:64])
    status = json.loads((quick_run / "run.json").read_text())
    assert abs(acc - status["test_accuracy"]) < 0.1
    # the same weights restored from the last checkpoint (and the best epoch's, which the
    # export holds) predict identically
    t = Trainer(cfg, str(quick_run), verbose=False)
    assert t.checkpoints.restore_latest()
    if status["final_weights"] == "best":
        t.model.load_weights(str(quick_run / "checkpoints" / "best" / f"epoch-{status['best_epoch']:05d}.weights.h5"))
    np.testing.assert_allclose(t.model.predict(x, verbose=0), probs, rtol=1e-5, atol=1e-6)


def test_second_run_resumes_finished_run_without_training(quick_run, capsys):
    before = (quick_run / "metrics.csv").read_text()
    assert train(quick_run, "training.epochs=2") == 0
    out = capsys.readouterr().out
    total = json.loads((quick_run / "run.json").read_text())["total_steps"]
    assert "resuming from" in out and f"at step {total}/{total}" in out
    assert (quick_run / "metrics.csv").read_text() == before
    assert len(json.loads((quick_run / "run.json").read_text())["sessions"]) == 2


def test_early_stopping_restores_best(tmp_path, capsys):
    run = tmp_path / "es"
    # min_delta so large that nothing after epoch 1 counts as an improvement
    assert train(run, "training.epochs=10", "training.early_stopping.patience=2",
                 "training.early_stopping.min_delta=10", "training.early_stopping.monitor=val_accuracy") == 0
    out = capsys.readouterr().out
    assert "early stopping" in out
    status = json.loads((run / "run.json").read_text())
    assert status["sessions"][-1]["stopped_by"] == "early_stopping"
    assert status["epoch"] == 3 and status["best_epoch"] == 1
    # the best epoch's weights only: the later epochs' were never better
    assert [p.name for p in (run / "checkpoints" / "best").iterdir()] == ["epoch-00001.weights.h5"]


def test_nan_loss_stops_with_a_clear_message(tmp_path, capsys):
    run = tmp_path / "nan"
    assert train(run, "optimizer.name=sgd", "optimizer.learning_rate=1e12", "training.epochs=3",
                 "data.normalize=rescale") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpcjobs: training failed: the loss became") and len(err.splitlines()) == 1
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("opt", ["sgd", "rmsprop", "adagrad", "adadelta", "nadam"])
def test_optimizers_and_schedules_train(tmp_path, opt):
    sched = {"sgd": "step", "rmsprop": "exponential", "adagrad": "cosine", "adadelta": "constant",
             "nadam": "cosine"}[opt]
    run = tmp_path / opt
    sets = [f"optimizer.name={opt}", f"optimizer.schedule.kind={sched}", "optimizer.schedule.decay_steps=20",
            "optimizer.schedule.warmup_steps=5", "training.epochs=1", "training.steps_per_epoch=30",
            *LEAN]
    if opt == "sgd":
        sets += ["optimizer.momentum=0.9", "optimizer.nesterov=true", "optimizer.learning_rate=0.05"]
    if opt == "adadelta":
        sets += ["optimizer.learning_rate=1.0"]
    assert train(run, *sets) == 0
    row = list(csv.DictReader(open(run / "metrics.csv")))[-1]
    assert float(row["val_accuracy"]) > 0.3, row
    if sched != "constant":
        assert float(row["lr"]) != pytest.approx(config.load(QUICKSTART).optimizer.learning_rate)


def test_small_resnet_and_transfer_from_another_dataset(tmp_path):
    """Train small_resnet on lfw faces, then start digits from its weights (transfer learning)."""
    src = tmp_path / "faces"
    assert train(src, "data.source=lfw", "model.arch=small_resnet", "model.width=8", "training.epochs=1",
                 "training.batch_size=16") == 0
    dst = tmp_path / "digits"
    assert train(dst, "model.arch=small_resnet", "model.width=8", "training.epochs=1",
                 f"model.init_from={src}", "model.freeze_backbone=true") == 0
    import keras

    a = keras.models.load_model(str(src / "export" / "model.keras"))
    b = keras.models.load_model(str(dst / "export" / "model.keras"))
    # frozen backbone: conv weights identical to the source; the head was trained anew
    np.testing.assert_array_equal(a.get_layer("stage2_conv1").get_weights()[0],
                                  b.get_layer("stage2_conv1").get_weights()[0])
    assert b.get_layer("head").get_weights()[0].shape[-1] == 10


def test_keras_application_by_name_with_weights_file(tmp_path):
    import keras

    # weights file made here, the way a user brings ImageNet weights: never downloaded
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3),
                                          pooling="avg")
    wfile = tmp_path / "mnv2_notop.weights.h5"
    base.save_weights(str(wfile))
    run = tmp_path / "app"
    assert train(run, "model.arch=MobileNetV2", f"model.weights={wfile}", "data.channels=3",
                 "data.image_size=[32, 32]", "training.epochs=1", "training.steps_per_epoch=3") == 0
    bad = tmp_path / "bad"
    assert train(bad, "model.arch=ResNet5O", "training.epochs=1") == 2


def test_unknown_arch_is_user_error(tmp_path, capsys):
    assert train(tmp_path / "r", "model.arch=simple_cnm") == 2
    assert "did you mean 'simple_cnn'" in capsys.readouterr().err


def _digest(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_finished_run_refuses_another_model_and_touches_nothing(quick_run, capsys):
    before = _digest(quick_run)
    assert train(quick_run, "training.epochs=2", "model.arch=small_resnet") == 2
    err = capsys.readouterr().err
    assert "model.arch ('simple_cnn' -> 'small_resnet')" in err and "--restart" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    after = _digest(quick_run)
    after.pop(".lock", None), before.pop(".lock", None)
    assert after == before  # config.yaml, run.json, metrics.csv unchanged


def test_restart_with_a_bad_config_leaves_the_old_run_in_place(tmp_path, capsys):
    run = tmp_path / "r"
    assert train(run, "training.epochs=1") == 0
    before = _digest(run)
    rc = cli.main(["train", QUICKSTART, "--run-dir", str(run), "--restart", "--set", "model.arch=ResNet5O"])
    assert rc == 2 and "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # nothing moved aside, nothing left behind
    after = _digest(run)
    after.pop(".lock", None), before.pop(".lock", None)
    assert after == before


def test_bad_time_budget_is_one_line(tmp_path, capsys):
    rc = cli.main(["train", QUICKSTART, "--run-dir", str(tmp_path / "r"), "--time-budget", "abc"])
    err = capsys.readouterr().err
    assert rc == 2 and "--time-budget" in err and "not a duration" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
