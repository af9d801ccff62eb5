"""The handbook's training recipe through the public config, on real data (digits):
optimizers, weight decay, L2, clipping, schedules, reduce-on-plateau, stop_at, the
diagnosis of bad signs, and class weights.  Each test fails if its knob is ignored."""
import csv
import json
import math

import numpy as np
import pytest

from hpcjobs import cli
from hpcjobs.train.hooks import diagnose
from hpcjobs.train.trainer import class_weights

from conftest import LEAN, LEAN_ARGS, QUICKSTART

FAST = ["export.plots=false", "training.epochs=2", "training.steps_per_epoch=12", "training.batch_size=64",
        "training.deterministic=true", "checkpoint.every_minutes=null"]


def train(run, *sets):  # LEAN: no test here looks at the plots
    return cli.main(["train", QUICKSTART, "--run-dir", str(run),
                     *sum((["--set", s] for s in (*LEAN, *sets)), [])])


def rows(run):
    return list(csv.DictReader(open(run / "metrics.csv")))


def status(run):
    return json.loads((run / "run.json").read_text())


def kernel_norm(run, layer="conv2"):
    import keras

    model = keras.models.load_model(str(run / "export" / "model.keras"), safe_mode=True)
    return float(np.linalg.norm(model.get_layer(layer).get_weights()[0]))


@pytest.mark.parametrize("opt", ["adamw", "adamax", "lion"])
def test_new_optimizers_learn(tmp_path, opt):
    lr = "optimizer.learning_rate=0.0003" if opt == "lion" else "optimizer.learning_rate=0.001"
    assert train(tmp_path / opt, *FAST, f"optimizer.name={opt}", lr) == 0
    assert float(rows(tmp_path / opt)[-1]["val_accuracy"]) > 0.5


def test_weight_decay_and_l2_shrink_the_kernels(tmp_path):
    assert train(tmp_path / "plain", *FAST, "optimizer.name=adamw", "optimizer.weight_decay=0") == 0
    assert train(tmp_path / "wd", *FAST, "optimizer.name=adamw", "optimizer.weight_decay=2.0") == 0
    assert train(tmp_path / "l2", *FAST, "optimizer.name=adamw", "optimizer.weight_decay=0", "model.l2=0.05") == 0
    plain = kernel_norm(tmp_path / "plain")
    assert kernel_norm(tmp_path / "wd") < 0.95 * plain
    assert kernel_norm(tmp_path / "l2") < 0.95 * plain


def test_amsgrad_and_clipping_change_training(tmp_path):
    assert train(tmp_path / "adam", *FAST) == 0
    assert train(tmp_path / "ams", *FAST, "optimizer.amsgrad=true") == 0
    assert train(tmp_path / "clip", *FAST, "optimizer.name=sgd", "optimizer.learning_rate=0.1",
                 "optimizer.global_clipnorm=0.001") == 0
    assert train(tmp_path / "noclip", *FAST, "optimizer.name=sgd", "optimizer.learning_rate=0.1") == 0
    assert status(tmp_path / "ams")["weights_sha256"] != status(tmp_path / "adam")["weights_sha256"]
    # steps of norm 1e-4 barely move the weights: the loss stays far above the unclipped run's
    assert float(rows(tmp_path / "clip")[-1]["loss"]) > float(rows(tmp_path / "noclip")[-1]["loss"]) + 0.5


def _cyclic(step, base, top, size, mode):
    cycle = math.floor(1 + step / (2 * size))
    x = abs(step / size - 2 * cycle + 1)
    amp = (top - base) * max(0.0, 1 - x)
    return base + (amp / 2 ** (cycle - 1) if mode == "triangular2" else amp)


SCHEDULES = {
    "linear": (["optimizer.schedule.decay_steps=30", "optimizer.schedule.alpha=0.1"],
               lambda s: 1e-3 - (1e-3 - 1e-4) * min(s, 30) / 30),
    "inverse_time": (["optimizer.schedule.decay_steps=10", "optimizer.schedule.decay_rate=1.0"],
                     lambda s: 1e-3 / (1 + s / 10)),
    "piecewise": (["optimizer.schedule.boundaries=[10, 20]", "optimizer.schedule.values=[0.01, 0.005, 0.001]"],
                  lambda s: 0.01 if s <= 10 else 0.005 if s <= 20 else 0.001),
    "cyclic": (["optimizer.schedule.max_learning_rate=0.01", "optimizer.schedule.step_size=5",
                "optimizer.schedule.mode=triangular2"], lambda s: _cyclic(s, 1e-3, 0.01, 5, "triangular2")),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_schedules_follow_their_curve(tmp_path, kind):
    sets, expected = SCHEDULES[kind]
    # epochs of 7 steps land at several points of every curve
    assert train(tmp_path / kind, *FAST, "training.epochs=4", "training.steps_per_epoch=7", "optimizer.learning_rate=0.001",
                 f"optimizer.schedule.kind={kind}", *sets) == 0
    for row in rows(tmp_path / kind):
        assert float(row["lr"]) == pytest.approx(expected(int(row["step"])), rel=1e-4), (kind, row)


def test_one_cycle_rises_then_falls(tmp_path):
    assert train(tmp_path / "oc", *FAST, "training.epochs=6", "training.steps_per_epoch=5",
                 "optimizer.schedule.kind=one_cycle", "optimizer.learning_rate=0.01") == 0
    lrs = [float(r["lr"]) for r in rows(tmp_path / "oc")]
    peak = int(np.argmax(lrs))
    assert 0 < peak < len(lrs) - 1 and lrs[peak] <= 0.01 + 1e-9
    assert lrs[0] < lrs[peak] and lrs[-1] < lrs[0]


def test_reduce_on_plateau_lowers_the_rate(tmp_path, capsys):
    # min_delta so large that no epoch after the first counts as an improvement
    assert train(tmp_path / "p", *FAST, "training.epochs=4", "optimizer.learning_rate=0.001",
                 "optimizer.reduce_on_plateau.patience=1",
                 "optimizer.reduce_on_plateau.min_delta=10", "optimizer.reduce_on_plateau.factor=0.5") == 0
    lrs = [float(r["lr"]) for r in rows(tmp_path / "p")]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])
    assert "reduce on plateau" in capsys.readouterr().out


def test_stop_at_finishes_early(tmp_path):
    assert train(tmp_path / "s", *FAST, "training.epochs=10", "training.stop_at.val_accuracy=0.5") == 0
    st = status(tmp_path / "s")
    assert st["sessions"][-1]["stopped_by"] == "stop_at" and st["step"] < st["total_steps"]
    assert float(rows(tmp_path / "s")[-1]["val_accuracy"]) >= 0.5
    assert (tmp_path / "s" / "export" / "model.keras").is_file()


def test_diagnosis_signs():
    class C:
        window, plateau_delta, bounces = 3, 0.01, 2

    def hist(val, train):
        return [{"epoch": i + 1, "loss": t, "val_loss": v} for i, (v, t) in enumerate(zip(val, train))]

    assert diagnose(hist([1.0, 1.1, 1.2, 1.3], [1.0, 0.9, 0.8, 0.7]), C) == ["diverging"]
    assert diagnose(hist([1.0, 1.001, 1.0, 1.002], [1.0, 1.0, 1.0, 1.0]), C) == ["plateau", "bouncing"]
    assert diagnose(hist([1.0, 0.8, 0.9, 0.7], [1.0, 0.9, 0.8, 0.7]), C) == ["bouncing"]
    assert diagnose(hist([1.0, 0.8, 0.6, 0.5], [1.0, 0.9, 0.8, 0.7]), C) == []
    assert diagnose(hist([1.0, 0.8], [1.0, 0.9]), C) == []  # fewer epochs than the window


def test_stop_on_a_sign_stops_and_records_it(tmp_path):
    # a plateau threshold so wide that any three epochs count as one
    assert train(tmp_path / "d", *FAST, "training.epochs=8", "training.diagnose.plateau_delta=100",
                 "training.stop_on=[plateau]") == 0
    st = status(tmp_path / "d")
    assert st["sessions"][-1]["stopped_by"] == "diagnosis_plateau"
    assert st["diagnosis"]["plateau"] == 4 and st["step"] == 4 * st["steps_per_epoch"]


def test_class_weight_changes_the_loss(tmp_path):
    assert train(tmp_path / "none", *FAST, "training.epochs=1") == 0
    assert train(tmp_path / "w", *FAST, "training.epochs=1", "training.class_weight={'0': 20, '1': 20}") == 0
    assert train(tmp_path / "b", *FAST, "training.epochs=1", "training.class_weight=balanced") == 0
    loss = {k: float(rows(tmp_path / k)[-1]["loss"]) for k in ("none", "w", "b")}
    assert loss["w"] > 1.5 * loss["none"]
    assert status(tmp_path / "b")["weights_sha256"] != status(tmp_path / "none")["weights_sha256"]


def test_balanced_weights_match_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 50 + [1] * 10 + [2] * 5)  # an imbalanced subset
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(class_weights("balanced", labels, 3, ["a", "b", "c"]), expected)
    assert class_weights({"b": 3.0}, labels, 3, ["a", "b", "c"]) == [1.0, 3.0, 1.0]


def test_bad_recipe_values_are_one_line(tmp_path, capsys):
    for bad in (["optimizer.schedule.kind=cyclic"], ["optimizer.name=sgd", "optimizer.amsgrad=true"],
                ["optimizer.clipnorm=-1"], ["training.stop_on=[sideways]"],
                ["optimizer.schedule.kind=piecewise", "optimizer.schedule.boundaries=[5]"]):
        assert train(tmp_path / "x", "training.epochs=1", *bad) == 2, bad
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # a class name the data does not have: refused when the data is known
    assert train(tmp_path / "y", "training.epochs=1", "training.class_weight={'cat': 2}") == 2
    err = capsys.readouterr().err
    assert "training.class_weight" in err and "cat" in err and "Traceback" not in err


def test_folds_are_stratified_disjoint_and_cover_the_pool():
    from hpcjobs import config
    from hpcjobs.data import load_data
    from hpcjobs.data.subsets import fold_indices

    base = load_data(config.load(QUICKSTART))
    pool = np.concatenate([base.splits["train"].source_index, base.splits["val"].source_index])
    labels = np.concatenate([base.splits["train"].labels, base.splits["val"].labels])
    folds = fold_indices(labels, 5, 0)
    joined = np.concatenate(folds)
    assert len(joined) == len(pool) and len(np.unique(joined)) == len(pool)  # disjoint, cover exactly once
    for c in range(10):
        counts = [int(np.sum(labels[f] == c)) for f in folds]
        assert max(counts) - min(counts) <= 1, (c, counts)  # stratified
    vals = []
    for i in range(5):
        d = load_data(config.load(QUICKSTART, ["data.folds=5", f"data.fold={i}"]))
        train_ids, val_ids = set(d.splits["train"].source_index), set(d.splits["val"].source_index)
        assert not train_ids & val_ids and train_ids | val_ids == set(pool)
        assert set(d.splits["test"].source_index) == set(base.splits["test"].source_index)
        vals.append(val_ids)
    assert set().union(*vals) == set(pool) and sum(len(v) for v in vals) == len(pool)


def test_five_fold_run_reports_mean_and_std(tmp_path, capsys):
    run = tmp_path / "cv"
    rc = cli.main(["train", QUICKSTART, "--run-dir", str(run), "--set", "data.folds=5", "--set", "training.epochs=1",
                   "--set", "training.steps_per_epoch=8", "--set", "checkpoint.every_minutes=null",
                   *LEAN_ARGS])
    assert rc == 0
    st = status(run)
    accs = [status(run / "folds" / f"fold-{i}")["test_accuracy"] for i in range(5)]
    s = st["fold_summary"]["test_accuracy"]
    assert s["n"] == 5 and s["mean"] == pytest.approx(np.mean(accs)) and s["std"] == pytest.approx(np.std(accs))
    assert "5-fold test_accuracy: mean" in capsys.readouterr().out
    assert cli.main(["status", str(run)]) == 0
    assert "test_accuracy: mean" in capsys.readouterr().out


def test_one_fold_trained_alone_updates_its_parents_summary(tmp_path):
    # what a task of `hpcjobs submit --folds` runs: one fold into RUN/folds/fold-I
    run = tmp_path / "cv"
    rc = cli.main(["train", QUICKSTART, "--run-dir", str(run / "folds" / "fold-1"), "--set", "data.folds=3",
                   "--set", "data.fold=1", "--set", "training.epochs=1", "--set", "training.steps_per_epoch=4",
                   "--set", "checkpoint.every_minutes=null"])
    assert rc == 0
    st = status(run)
    assert st["fold_status"] == ["not started", "finished", "not started"] and st["status"] == "stopped"
    assert st["fold_summary"]["test_accuracy"]["n"] == 1
    assert st["fold_summary"]["test_accuracy"]["mean"] == status(run / "folds" / "fold-1")["test_accuracy"]
