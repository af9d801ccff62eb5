"""Two stacks, one code base (issue 25): TensorFlow >= 2.16 + Keras 3 and TensorFlow 2.14 +
Keras 2.  Every test here runs on either; tests/tf214.sh runs the tf214-marked set on 2.14."""
import json
import os
import shutil
import zipfile

import numpy as np
import pytest

from hpcjobs import cli
from hpcjobs.compat import keras_major, stack

from conftest import QUICKSTART
from stops import train_in_sessions

pytestmark = pytest.mark.tf214


def train(run, *sets):
    return cli.main(["train", QUICKSTART, "--run-dir", str(run), *sum((["--set", s] for s in sets), [])])


def status(run):
    return json.loads((run / "run.json").read_text())


@pytest.fixture(scope="module")
def qs_run(tmp_path_factory):
    """The quickstart as the README runs it."""
    run = tmp_path_factory.mktemp("stacks") / "quickstart"
    assert train(run) == 0
    return run


def test_quickstart_trains_and_records_its_stack(qs_run):
    st = status(qs_run)
    assert st["status"] == "finished" and st["test_accuracy"] >= 0.95
    import keras
    import tensorflow as tf

    record = st["stack"]
    assert record["tensorflow"] == tf.__version__ and record["keras"] == str(keras.__version__)
    assert record["packages"]["numpy"] == np.__version__ and record["python"]
    text = (qs_run / "environment.txt").read_text()
    assert f"tensorflow: {tf.__version__}" in text and f"numpy=={np.__version__}" in text


def test_export_then_infer_on_a_folder(qs_run, tmp_path, capsys):
    from skimage.io import imsave
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(30):
        folder = tmp_path / "images" / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        imsave(folder / f"{i}.png", (digits.images[i] * 16).clip(0, 255).astype(np.uint8), check_contrast=False)
    assert cli.main(["export", str(qs_run), "--format", "keras,saved_model"]) == 0
    for model in (str(qs_run), str(qs_run / "export" / "saved_model")):
        out = tmp_path / f"{os.path.basename(model)}.csv"
        assert cli.main(["infer", "--model", model, "--input", str(tmp_path / "images"), "--output", str(out)]) == 0
        rows = out.read_text().splitlines()[1:]
        assert len(rows) == 30
        right = sum(r.split(",")[0].split("/")[-2] == r.split(",")[1] for r in rows)
        assert right >= 27, rows


def _other_major() -> dict:
    return {"tensorflow": "2.14.1", "keras": "2.14.0"} if keras_major() >= 3 else \
        {"tensorflow": "2.21.0", "keras": "3.15.1"}


def test_a_run_from_the_other_keras_is_refused_in_one_line(qs_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(qs_run, run)
    st = status(run)
    st["stack"] = dict(st["stack"], **_other_major())
    (run / "run.json").write_text(json.dumps(st))
    capsys.readouterr()
    assert train(run) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and stack.describe(st["stack"]) in err and stack.describe(stack.current()) in err
    assert status(run)["step"] == st["step"]  # nothing trained, nothing written


def test_a_run_with_no_stack_record_is_keras_3(qs_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(qs_run, run)
    st = status(run)
    del st["stack"]
    (run / "run.json").write_text(json.dumps(st))
    code = train(run)
    if keras_major() >= 3:
        assert code == 0 and status(run)["stack"]["keras"].startswith("3.")
    else:
        assert code == 2 and "TensorFlow >=2.16 + Keras 3" in capsys.readouterr().err


def test_a_model_keras_from_the_other_keras_says_what_it_needs(qs_run, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(qs_run / "export", export)
    src = qs_run / "export" / "model.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(export / "model.keras", "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "metadata.json":
                data = json.dumps(dict(json.loads(data), keras_version=_other_major()["keras"])).encode()
            zout.writestr(item, data)
    from skimage.io import imsave

    (tmp_path / "in").mkdir()
    imsave(tmp_path / "in" / "a.png", np.zeros((8, 8), np.uint8), check_contrast=False)
    capsys.readouterr()
    assert cli.main(["infer", "--model", str(export), "--input", str(tmp_path / "in"), "--output",
                     str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"saved by Keras {_other_major()['keras']}" in err and "saved_model" in err


def test_mixed_float16_trains_and_resumes_exactly(tmp_path):
    sets = ["training.precision=mixed_float16", "training.loss_scale_growth_steps=3", "training.deterministic=true",
            "training.steps_per_epoch=6", "training.batch_size=32", "training.epochs=4", "training.steps_per_call=2",
            "checkpoint.every_minutes=null", "model.width=8"]  # narrow: CPU float16 costs 10x float32
    assert train(tmp_path / "whole", *sets) == 0
    codes = train_in_sessions(tmp_path / "parts", sets, stops=(1, 13))  # calls of 2: stops at 4 and 16 of 24
    whole, parts = status(tmp_path / "whole"), status(tmp_path / "parts")
    assert codes == [75, 75, 0] and [s["start_step"] for s in parts["sessions"]] == [0, 4, 16]
    assert parts["weights_sha256"] == whole["weights_sha256"]
