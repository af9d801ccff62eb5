"""data.test_split: source (issue 24 item 6): a source's own test set is the test split
(Fashion-MNIST's t10k, an .npz's x_test/y_test, a folder's test/ class tree); validation is
split from the rest, stratified; the count is in the start line, run.json and the model card."""
import json
import os

import h5py
import numpy as np
import pytest

from hpcjobs import cli
from hpcjobs.data.sources import FASHION_MNIST_DIR, read_idx

from conftest import QUICKSTART

T10K_IMAGES = os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")
T10K_LABELS = os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")
FASHION = ["data.source=fashion-mnist", "data.test_split=source"]


def sets(*items):
    return sum((["--set", s] for s in items), [])


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fashion") / "run"
    cheap = ["training.epochs=1", "training.steps_per_epoch=3", "training.batch_size=64",
             "checkpoint.every_minutes=null"]
    assert cli.main(["train", QUICKSTART, "--run-dir", str(run), *sets(*FASHION, *cheap)]) == 0
    return run


def test_fashion_mnist_run_tests_on_exactly_t10k(fashion_run):
    st = json.loads((fashion_run / "run.json").read_text())
    assert st["test_images"] == 10000
    assert "t10k" in st["test_source"]
    card = (fashion_run / "export" / "model_card.md").read_text()
    assert "the source's own test set, 10,000 images" in card and "t10k-images-idx3-ubyte" in card
    assert "On the 10,000 test images" in card  # the test metrics were measured on them


def test_the_stored_test_split_is_t10k_image_for_image(tmp_path):
    store = tmp_path / "fashion.h5"
    assert cli.main(["prepare", QUICKSTART, "--output", str(store), *sets(*FASHION)]) == 0
    images, labels = read_idx(T10K_IMAGES), read_idx(T10K_LABELS)
    with h5py.File(store, "r") as f:
        test_x, test_y = f["test"]["images"][...], f["test"]["labels"][...]
        train_y, val_y = f["train"]["labels"][...], f["val"]["labels"][...]
        val_origin = f["val"]["source_index"][...]
        meta = json.loads(f.attrs["hpcjobs"])
    assert test_x.shape[0] == 10000
    np.testing.assert_array_equal(test_x[..., 0], images)  # same order, same pixels
    np.testing.assert_array_equal(test_y, labels)
    assert len(train_y) + len(val_y) == 60000 and (val_origin < 60000).all()
    counts = np.bincount(val_y, minlength=10)
    assert counts.min() == counts.max() == 600  # stratified: 10% of each class's 6,000
    assert meta["test_share"] == "source" and "t10k" in meta["test_origin"]


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


def _train(tmp_path, source, *extra):
    run = tmp_path / "run"
    code = cli.main(["train", QUICKSTART, "--run-dir", str(run),
                     *sets(f"data.source={source}", "data.test_split=source", "training.epochs=1",
                           "training.steps_per_epoch=2", *extra)])
    return code, run


def test_npz_with_x_test_keeps_it_as_the_test_split(tmp_path, capsys):
    x, y = _digits()
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=x[:1500], y_train=y[:1500], x_test=x[1500:], y_test=y[1500:])
    code, run = _train(tmp_path, path)
    out = capsys.readouterr().out
    assert code == 0
    assert "/ 297 test images (the source's own" in out
    st = json.loads((run / "run.json").read_text())
    assert st["test_images"] == 297 and "x_test" in st["test_source"]


def test_folder_with_train_and_test_trees(tmp_path):
    from PIL import Image

    x, y = _digits()
    root = tmp_path / "tree"
    for part, idx in (("train", range(0, 300)), ("test", range(300, 360))):
        for i in idx:
            folder = root / part / f"digit{y[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(folder / f"{i}.png")
    code, run = _train(tmp_path, root)
    assert code == 0
    st = json.loads((run / "run.json").read_text())
    assert st["test_images"] == 60 and st["test_source"].endswith(os.path.join("tree", "test"))
    assert st["class_names"] == [f"digit{i}" for i in range(10)]  # the classes, not train and test


def test_a_source_without_its_own_test_set_is_one_line(tmp_path, capsys):
    code, _ = _train(tmp_path, "digits")
    err = capsys.readouterr().err
    assert code == 2 and "data.test_split: source" in err and "no test set of its own" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
