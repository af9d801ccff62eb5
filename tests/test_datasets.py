"""The dataset recipes give the same samples through every source kind."""
import os
import subprocess
import sys

import numpy as np
import pytest

from hpcjobs.data.sources import open_source

from conftest import REPO, need_fashion_mnist


@pytest.mark.parametrize("kind, entry", [("folder", ""), ("csv", "list.csv"), ("json", "list.json"),
                                         ("npz", None)])
def test_lfw_recipes_match_the_builtin(tmp_path, kind, entry):
    out = tmp_path / ("lfw.npz" if kind == "npz" else "lfw")
    subprocess.run([sys.executable, os.path.join(REPO, "datasets", "export.py"), "lfw", kind, str(out)],
                   check=True, capture_output=True)
    src = open_source(str(out if entry is None else out / entry))
    ref = open_source("lfw")
    assert len(src) == len(ref) == 200
    assert sorted(src.class_names) == sorted(ref.class_names)
    # the same image bytes per class, whatever the order the source lists them in
    for c in ref.class_names:
        a = sorted(ref.load(i).tobytes() for i in range(len(ref)) if ref.class_names[ref.labels[i]] == c)
        b = sorted(np.asarray(src.load(i)).tobytes() for i in range(len(src))
                   if src.class_names[src.labels[i]] == c)
        assert a == b


def test_fashion_mnist_idx_source():
    need_fashion_mnist()
    s = open_source("fashion-mnist")
    assert len(s) == 70000 and s.class_names[9] == "Ankle boot"
    assert np.bincount(s.labels).tolist() == [7000] * 10
    assert s.load(0).shape == (28, 28) and s.load(0).dtype == np.uint8
