"""training.loss: path/to/file.py:function, the user's own per-example loss (issue 24 item 3):
loaded by the plugin loader, copied into RUN/code with the other user code, used for
loss and val_loss, and a bad one is one line naming the key."""
import json

import pytest
import yaml

from hpcjobs import cli

from conftest import QUICKSTART

LOSS = '''import tensorflow as tf


def halved(y_true, y_pred):
    """Half of sparse categorical crossentropy, per example."""
    y_true = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
    p = tf.gather(y_pred, y_true, axis=1, batch_dims=1)
    return -0.5 * tf.math.log(tf.clip_by_value(p, 1e-7, 1.0))


def raises(y_true, y_pred):
    raise RuntimeError("my loss is broken")


def mean(y_true, y_pred):
    return tf.reduce_mean(y_pred)
'''


def project(tmp_path, loss):
    (tmp_path / "my_loss.py").write_text(LOSS)
    cfg = {"base": QUICKSTART, "training": {"epochs": 1, "steps_per_epoch": 6, "batch_size": 32, "loss": loss,
                                            "deterministic": True}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train(config, run):
    return cli.main(["train", config, "--run-dir", str(run)])


def test_a_loss_from_a_file_trains_and_travels_with_the_run(tmp_path):
    halved, plain = tmp_path / "halved", tmp_path / "plain"
    assert train(project(tmp_path, "my_loss.py:halved"), halved) == 0
    assert train(project(tmp_path, "crossentropy"), plain) == 0
    record = json.loads((halved / "run.json").read_text())
    code = (halved / "code" / "code.json").read_text()
    assert "my_loss.py" in code and (halved / "code").is_dir()
    assert record["status"] == "finished"
    # the first epoch's training loss: half of crossentropy's, the same batches and first weights
    rows = {name: (run / "metrics.csv").read_text().splitlines() for name, run in (("h", halved), ("p", plain))}
    header = rows["h"][0].split(",")
    loss_h = float(rows["h"][1].split(",")[header.index("loss")])
    loss_p = float(rows["p"][1].split(",")[header.index("loss")])
    assert 0.3 * loss_p < loss_h < 0.7 * loss_p  # trained on a halved loss: about half, not equal


@pytest.mark.parametrize("spec,words", [("my_loss.py:raises", "my loss is broken"),
                                        ("my_loss.py:gone", "has no 'gone'"),
                                        ("nope.py:f", "no such file"),
                                        ("my_loss.py:mean", "expected one loss per example")])
def test_a_bad_loss_is_one_line_naming_the_key(tmp_path, capsys, spec, words):
    assert train(project(tmp_path, spec), tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training.loss" in err and words in err and "Traceback" not in err
