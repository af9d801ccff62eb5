"""Per-class metrics and ``hpcjobs evaluate`` on the quickstart (digits, 10 classes) and
on lfw (2 classes), with real runs trained here through the CLI."""
import csv
import json
import shutil

import numpy as np
import pytest
import yaml

from hpcjobs import cli, config
from hpcjobs.evaluation import metrics
from hpcjobs.export.formats import open_runner
from hpcjobs.data import prepare_store

from bundle_runs import DATASETS, status, test_split, train


@pytest.fixture(scope="module", params=list(DATASETS))
def run(request, tmp_path_factory):
    return train(tmp_path_factory, request.param)


def export_predictions(run):
    split = test_split(run)
    return np.asarray(split.labels), open_runner(str(run / "export")).predict(split.images)


def test_confusion_matrix_sums_to_the_test_count(run):
    st = status(run)
    n = len(test_split(run))
    tm = st["test_metrics"]
    assert np.sum(tm["confusion_matrix"]) == tm["count"] == n
    assert sum(c["support"] for c in tm["per_class"]) == n
    rows = list(csv.reader(open(run / "evaluation" / "confusion_matrix.csv")))
    assert rows[0][1:] == tm["class_names"] and [r[0] for r in rows[1:]] == tm["class_names"]
    assert sum(int(v) for r in rows[1:] for v in r[1:]) == n
    assert (run / "evaluation" / "confusion_matrix.png").stat().st_size > 1000
    assert st["test_accuracy"] == pytest.approx(np.trace(tm["confusion_matrix"]) / n)
    assert set(tm["top_k"]) == ({"top_1", "top_3", "top_5"} if len(tm["class_names"]) == 10 else {"top_1"})


def test_per_class_metrics_equal_sklearn(run):
    from sklearn.metrics import classification_report

    labels, probs = export_predictions(run)
    names = status(run)["test_metrics"]["class_names"]
    ours = metrics.from_predictions(labels, probs, names).to_dict()
    theirs = classification_report(labels, probs.argmax(1), labels=range(len(names)), target_names=names,
                                   output_dict=True, zero_division=0)
    for row in ours["per_class"]:
        ref = theirs[row["class"]]
        for m, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert row[m] == pytest.approx(ref[key], abs=1e-12), (row["class"], m)
        assert row["support"] == ref["support"]
    for kind in ("macro", "weighted"):
        for m, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert ours["averages"][kind][m] == pytest.approx(theirs[f"{kind} avg"][key], abs=1e-12)
    assert ours["accuracy"] == pytest.approx(theirs["accuracy"])
    # the compiled evaluation at the end of training (run.json) counted the same predictions
    assert ours["confusion_matrix"] == status(run)["test_metrics"]["confusion_matrix"]
    assert status(run)["test_f1"] == pytest.approx(ours["macro_f1"], abs=1e-12)


def test_top_k_counts_like_in_top_k():
    probs = np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    r = metrics.from_predictions([1, 0, 3], probs, ["a", "b", "c", "d"])
    assert r.top_k_hits == {1: 1, 3: 2}  # ties straddling the boundary count as in the top k
    assert r.confusion.sum() == 3 and r.confusion[1, 0] == 1 and r.confusion[3, 0] == 1


def test_val_f1_every_epoch(run):
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["val_f1"] != "" for r in rows] == [True, True]
    assert 0 <= float(rows[-1]["val_f1"]) <= 1


def evaluate(*args):
    return cli.main(["evaluate", *map(str, args)])


def test_evaluate_a_run_prints_the_table_and_writes_evaluation(run, capsys, tmp_path):
    out = tmp_path / "ev"
    assert evaluate(run, "--output", out) == 0
    text = capsys.readouterr().out
    names = status(run)["test_metrics"]["class_names"]
    for name in names:
        assert any(line.startswith(name + " ") for line in text.splitlines()), name
    assert "macro avg" in text and "weighted avg" in text
    got = json.loads((out / "metrics.json").read_text())
    assert got["confusion_matrix"] == status(run)["test_metrics"]["confusion_matrix"]
    assert got["format"] == "keras" and "test split" in got["data"]
    for name in ("per_class.csv", "confusion_matrix.csv", "confusion_matrix.png"):
        assert (out / name).is_file()


def _photos(split, names, folder):
    """The test images as PNG files in class folders."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(np.asarray(split.images), split.labels)):
        d = folder / names[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(d / f"{i:04d}.png")
    return folder


def test_evaluate_an_export_copied_elsewhere(run, tmp_path, capsys):
    export = tmp_path / "elsewhere" / "shared-model"
    shutil.copytree(run / "export", export)
    expected = status(run)["test_metrics"]["confusion_matrix"]
    cfg = tmp_path / "data.yaml"  # the data part of the run's config, nothing of the run itself
    cfg.write_text(yaml.safe_dump({"data": yaml.safe_load((run / "config.yaml").read_text())["data"]}))
    assert evaluate(export, "--data", cfg) == 0
    assert json.loads((export / "evaluation" / "metrics.json").read_text())["confusion_matrix"] == expected
    store = tmp_path / "store.h5"
    prepare_store(config.load(str(cfg)), str(store), progress=False).close()
    assert evaluate(export, "--data", store, "--output", tmp_path / "ev-store") == 0
    assert json.loads((tmp_path / "ev-store" / "metrics.json").read_text())["confusion_matrix"] == expected
    names = status(run)["test_metrics"]["class_names"]
    folder = _photos(test_split(run), names, tmp_path / "photos")
    assert evaluate(export / "model.keras", "--data", folder, "--output", tmp_path / "ev-png") == 0
    got = json.loads((tmp_path / "ev-png" / "metrics.json").read_text())
    assert got["count"] == np.sum(expected) and got["confusion_matrix"] == expected  # PNG round trip is lossless
    capsys.readouterr()
    # without its run, the export has no test split of its own
    assert evaluate(export) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data" in err


def test_a_run_without_a_test_split_is_one_line(run, tmp_path, capsys):
    fake = tmp_path / "no-test"
    fake.mkdir()
    shutil.copytree(run / "export", fake / "export")
    shutil.copy(run / "run.json", fake / "run.json")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["test_split"] = 0.0
    (fake / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert evaluate(fake) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no test split" in err and "--data" in err


def test_labels_the_model_does_not_know_are_one_line(run, tmp_path, capsys):
    folder = tmp_path / "other"
    for name in ("cats", "dogs"):
        (folder / name).mkdir(parents=True)
        from PIL import Image

        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / name / "a.png")
    assert evaluate(run, "--data", folder, "--output", tmp_path / "ev") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cats" in err
