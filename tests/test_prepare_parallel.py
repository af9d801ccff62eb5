"""Parallel, resumable ``hpcjobs prepare`` (issue 26 items 1 and 2).

* the store is the same, dataset by dataset and attribute by attribute, on 1 and on 2 workers;
* a prepare SIGKILLed three times (each time after a random number of chunks is seen
  committed, never a timing bet) and run again ends with the uninterrupted store's bytes;
* SIGTERM stops it at a chunk boundary with exit 75, and a run again continues ("continuing at");
* a changed source or config is refused, not mixed in;
* one image path: a stored image is what ``images.model_image`` makes of its file (what
  infer runs), and a store without a recorded path reads as the old ``tf/1`` one.
"""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import FASHION, REPO, need_fashion_mnist
from hpcjobs.cli import main

SPLITS = ("train", "val", "test")


def _digests(path):
    import h5py

    with h5py.File(path, "r") as f:
        out = {f"{s}/{k}": hashlib.sha256(f[s][k][...].tobytes()).hexdigest() for s in SPLITS
               for k in ("images", "labels", "source_index")}
        out["attrs"] = f.attrs["hpcjobs"]
    return out


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """Fashion-MNIST images as JPEG files in class folders, enlarged to 96 x 72 so a 16 px
    target decodes with JPEG draft (scale 1/2)."""
    need_fashion_mnist()
    from PIL import Image

    from hpcjobs.data.sources import read_idx_folder

    s = read_idx_folder(FASHION)
    root = tmp_path_factory.mktemp("jpegs")
    for c in range(4):
        os.makedirs(root / f"class{c}")
        for j, i in enumerate(np.flatnonzero(s.labels == c)[:40]):
            Image.fromarray(s.arrays[i]).resize((96, 72), Image.BICUBIC).save(root / f"class{c}" / f"{j:03d}.jpg",
                                                                              quality=90)
    return root


def _config(tmp_path, source, size, name="p"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"name: {name}\ndata:\n  source: {source}\n  image_size: [{size}, {size}]\n")
    return str(cfg)


@pytest.mark.tf214
def test_store_is_identical_on_one_and_two_workers(tmp_path, jpeg_folder, capsys):
    cfg = _config(tmp_path, jpeg_folder, 16)
    for n in (1, 2):
        assert main(["prepare", cfg, "--output", str(tmp_path / f"w{n}.h5"), "--workers", str(n)]) == 0
    capsys.readouterr()
    one, two = _digests(tmp_path / "w1.h5"), _digests(tmp_path / "w2.h5")
    assert one == two
    assert json.loads(one["attrs"])["image_path"] == "pil-draft/1"
    assert not os.path.exists(tmp_path / "w1.h5.partial")  # removed once the store is in place


@pytest.mark.tf214
def test_one_image_path_for_training_and_serving(tmp_path, jpeg_folder, capsys):
    """Each stored image is ``model_image`` of its file (the function infer's predictor calls),
    and train's in-memory prepare makes the same images as the store."""
    import h5py

    from hpcjobs import config
    from hpcjobs.data import load_data, open_store
    from hpcjobs.data.images import IMAGE_PATH, LEGACY_PATH, model_image
    from hpcjobs.data.sources import open_source

    cfg = _config(tmp_path, jpeg_folder, 16)
    out = tmp_path / "s.h5"
    assert main(["prepare", cfg, "--output", str(out), "--workers", "2"]) == 0
    capsys.readouterr()
    samples = open_source(str(jpeg_folder))
    store = open_store(str(out))
    assert store.image_path == IMAGE_PATH
    test = store.splits["test"]
    for j in range(0, len(test), 5):
        path = samples.paths[int(test.source_index[j])]
        assert np.array_equal(model_image(path, (16, 16), 1), test.images[j])
    memory = load_data(config.load(cfg))
    for s in SPLITS:
        assert np.array_equal(memory.splits[s].images, store.splits[s].images[...])
    assert np.array_equal(memory.mean, store.mean) and np.array_equal(memory.std, store.std)
    store.close()
    # a store written before the path was recorded reads as it is, as the old path's
    with h5py.File(out, "r+") as f:
        meta = json.loads(f.attrs["hpcjobs"])
        del meta["image_path"]
        f.attrs["hpcjobs"] = json.dumps(meta)
    old = open_store(str(out))
    assert old.image_path == LEGACY_PATH
    # the export records the path its model was trained with (infer and evaluate read it), and
    # the model card says which path made the store
    from hpcjobs.export.card import data_section
    from hpcjobs.export.model import preprocessing_info

    assert preprocessing_info(old, "standard")["image_path"] == LEGACY_PATH
    assert preprocessing_info(memory, "standard")["image_path"] == IMAGE_PATH
    assert f"Image path: `{LEGACY_PATH}`" in data_section(config.load(cfg), old)
    old.close()


# --------------------------------------------------------------------------- kills and stops
def _start(cfg, out, *extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "hpcjobs", "prepare", cfg, "--output", out, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: the workers with it


def _live_members(pgid):
    """Processes of the group that still run (zombies, whose parent died, do not count)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(pid))
    return found


def _group_gone(pgid, limit=120):
    """Until no process of the group runs (a worker whose parent was killed ends by itself)."""
    end = time.monotonic() + limit
    while _live_members(pgid):
        assert time.monotonic() < end, f"workers of a killed prepare still run: {_live_members(pgid)}"
        time.sleep(0.05)


def _chunks(out):
    try:
        return {n for n in os.listdir(f"{out}.partial") if n.endswith(".npz") and not n.startswith(".tmp-")}
    except FileNotFoundError:
        return set()


def _wait_for_chunks(proc, out, count, limit=600):
    """Until ``count`` chunk files are committed (the process's own progress), or it ends."""
    end = time.monotonic() + limit  # a safety net against a hang, not a bet on speed
    while len(_chunks(out)) < count and proc.poll() is None:
        assert time.monotonic() < end, "prepare made no progress"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """Fashion-MNIST (70,000 images) at 32 px: 70 chunks; and its uninterrupted store."""
    need_fashion_mnist()
    tmp = tmp_path_factory.mktemp("fashion")
    cfg = _config(tmp, FASHION, 32, "fm")
    ref = str(tmp / "reference.h5")
    p = _start(cfg, ref, "--workers", "2")
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert "continuing at" not in err
    return cfg, ref, _digests(ref)


@pytest.mark.slow
def test_sigkilled_three_times_then_finished_equals_uninterrupted(tmp_path, fashion):
    cfg, _, reference = fashion
    out = str(tmp_path / "killed.h5")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    total = 70
    for kill in range(3):
        have = len(_chunks(out))
        at = have + rng.randint(1, max(1, (total - have) // 3))
        p = _start(cfg, out, "--workers", "2")
        _wait_for_chunks(p, out, at)
        if kill == 0:  # the prepare process alone (an OOM kill): its workers finish their chunk and end
            p.kill()
        else:  # the whole job at once (a node failure, a job's end)
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        assert p.returncode == -signal.SIGKILL, f"seed {seed}: prepare ended before kill {kill + 1}"
        _group_gone(p.pid)
        assert not os.path.exists(out)
    before = len(_chunks(out))
    p = _start(cfg, out, "--workers", "2")
    _, err = p.communicate()
    assert p.returncode == 0, err
    lines = [x for x in err.splitlines() if x.startswith("continuing at ")]
    assert len(lines) == 1 and f"({before} of {total} chunks done" in lines[0], (seed, err)
    assert before < total, seed
    assert _digests(out) == reference, f"seed {seed}"
    assert not os.path.exists(f"{out}.partial")


@pytest.mark.slow
def test_sigterm_stops_at_a_chunk_boundary_with_75_and_a_changed_config_is_refused(tmp_path, fashion, capsys):
    cfg, _, reference = fashion
    out = str(tmp_path / "stopped.h5")
    p = _start(cfg, out, "--workers", "2")
    _wait_for_chunks(p, out, 2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    assert p.returncode == 75, err
    assert "stopped at a chunk boundary" in err and "SIGTERM" in err
    names = os.listdir(f"{out}.partial")
    assert not [n for n in names if n.startswith(".tmp-")]  # the chunks under way finished first
    done = _chunks(out)
    assert 2 <= len(done) < 70
    for name in done:  # every chunk kept is whole
        with np.load(os.path.join(f"{out}.partial", name)) as z:
            assert z["images"].shape[1:] == (32, 32, 1) and len(z["images"]) == len(z["kept"])

    # another config (a different seed) or another source is refused, in one line, exit 2
    capsys.readouterr()
    assert main(["prepare", cfg, "--output", out, "--set", "data.seed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs in seed" in err and f"{out}.partial" in err
    other = _config(tmp_path, "digits", 32, "fm")
    assert main(["prepare", other, "--output", out]) == 2
    err = capsys.readouterr().err
    assert "differs in fingerprint" in err and "source" in err
    assert _chunks(out) == done  # nothing of the other source mixed in

    p = _start(cfg, out, "--workers", "1")  # continues, on another number of workers
    _, err = p.communicate()
    assert p.returncode == 0, err
    assert f"continuing at {sum(_rows(n) for n in done):,}/70,000" in err
    assert _digests(out) == reference


def _rows(name):
    """Samples in a chunk named <split>-<k>.npz of the fashion store (1,024 a chunk; the last of
    each split holds the rest)."""
    split, k = name[:-4].rsplit("-", 1)
    n = {"train": 70000 - 7000 - 3500, "val": 7000, "test": 3500}[split]
    return min(1024, n - 1024 * int(k))


def test_workers_must_be_a_positive_number(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", _config(tmp_path, "digits", 8), "--workers", "0"])
    assert e.value.code == 2
