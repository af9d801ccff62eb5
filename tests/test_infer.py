"""hpcjobs infer on real photos (scikit-image's bundled images) with a model trained here.

The model is trained once per module through the public CLI (quickstart on the digits,
1 epoch, 32x32x3).  Most runs are in-process through ``hpcjobs.cli.main``; killing,
signalling and MPI use real subprocesses.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from hpcjobs import cli, infer
from hpcjobs.cluster.info import ClusterInfo
from hpcjobs.data import images, store
from hpcjobs.data.sources import SourceError, read_folder

import forked
from forked import Forked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
LAUNCHER_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID", "SLURM_STEP_ID",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMIX_RANK", "TF_CONFIG")


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for k in LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    rc = cli.main(["train", QUICKSTART, "--run-dir", str(tmp), "--set", "training.epochs=1",
                   "--set", "training.steps_per_epoch=10",
                   "--set", "data.channels=3", "--set", "data.image_size=[32,32]"])
    assert rc == 0
    assert os.path.isfile(tmp / "export" / "preprocessing.json")
    return str(tmp)


GOOD = ["astronaut.png", "camera.jpg", "chelsea.png", "coffee.jpg", "logo_rgba.png", "moon_16bit.png",
        "rocket.jpg", "sub/coins.png"]
BAD = {"empty.png": "empty", "notes.png": "not an image", "truncated.png": "truncated"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos of varied sizes, channels and bit depths, and three bad files."""
    from PIL import Image
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    (d / "sub").mkdir()
    Image.fromarray(data.astronaut()).save(d / "astronaut.png")  # 512x512 RGB
    Image.fromarray(data.camera()).save(d / "camera.jpg", quality=90)  # gray JPEG
    Image.fromarray(data.chelsea()).save(d / "chelsea.png")  # 300x451
    Image.fromarray(data.coffee()).save(d / "coffee.jpg", quality=90)  # 400x600
    Image.fromarray(data.logo()).save(d / "logo_rgba.png")  # RGBA
    Image.fromarray(data.moon().astype(np.uint16) * 257).save(d / "moon_16bit.png")  # 16-bit gray
    Image.fromarray(data.rocket()).save(d / "rocket.jpg", quality=90)  # 427x640
    Image.fromarray(data.coins()).save(d / "sub" / "coins.png")  # gray PNG
    raw = (d / "astronaut.png").read_bytes()
    (d / "truncated.png").write_bytes(raw[: len(raw) // 3])
    (d / "notes.png").write_text("not an image at all\n")
    (d / "empty.png").write_bytes(b"")
    (d / ".hidden.png").write_bytes(raw)  # dot-files are not inputs
    (d / "README.txt").write_text("not listed: no image extension\n")
    return str(d)


def read_h5(path) -> dict:
    with h5py.File(path, "r") as f:
        return {"path": list(f["path"].asstr()[...]), "row": f["row"][...], "probabilities": f["probabilities"][...],
                "top_i": f["top_k/indices"][...], "top_p": f["top_k/probabilities"][...],
                "class_names": [str(c) for c in f.attrs["class_names"]],
                "errors": list(zip(f["errors/path"].asstr()[...], f["errors/reason"].asstr()[...]))}


def assert_same(a: dict, b: dict):
    assert a["path"] == b["path"]
    np.testing.assert_array_equal(a["row"], b["row"])
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a["top_i"][:, 0], b["top_i"][:, 0])
    assert a["errors"] == b["errors"]


def run(*argv) -> int:
    return cli.main(["infer", *map(str, argv)])


@pytest.fixture(scope="module")
def unsharded(run_dir, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "preds.h5"
    assert run("--model", run_dir, "--input", photos, "--output", out, "--set", "infer.format=both",
               "--set", "infer.chunk_size=3", "--set", "infer.batch_size=4") == 0
    return out


# --------------------------------------------------------------------------- (a) real photos, bad files
def test_every_good_photo_has_one_row_and_bad_files_are_listed(unsharded, photos, capsys):
    res = read_h5(unsharded)
    assert res["path"] == [os.path.join(photos, g) for g in GOOD]  # sorted, one row each
    assert res["probabilities"].shape == (len(GOOD), 10) and res["probabilities"].dtype == np.float32
    np.testing.assert_allclose(res["probabilities"].sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(res["top_i"][:, 0], res["probabilities"].argmax(1))
    np.testing.assert_allclose(res["top_p"], np.take_along_axis(res["probabilities"], res["top_i"], 1))
    assert res["class_names"] == [str(i) for i in range(10)]
    errs = {os.path.basename(p): reason for p, reason in res["errors"]}
    assert set(errs) == set(BAD)
    for name, word in BAD.items():
        assert word in errs[name]

    with open(str(unsharded)[:-3] + ".csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == res["path"]
    for r, ti, tp in zip(rows, res["top_i"], res["top_p"]):
        assert r["class"] == str(ti[0]) and abs(float(r["probability"]) - tp[0]) < 1e-5
        assert [kv.split(":")[0] for kv in r["top_k"].split(";")] == [str(i) for i in ti]
    with open(str(unsharded)[:-3] + ".errors.csv", newline="", encoding="utf-8") as f:
        listed = {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}
    assert listed == errs


def test_prints_the_count_of_skipped_files(run_dir, photos, tmp_path, capsys):
    assert run("--model", run_dir, "--input", photos, "--output", tmp_path / "p.csv") == 0
    out = capsys.readouterr().out
    assert f"{len(GOOD)} predicted, {len(BAD)} skipped" in out
    assert os.path.exists(tmp_path / "p.csv") and not os.path.exists(tmp_path / "p.h5")
    assert not [n for n in os.listdir(tmp_path) if "part-" in n]  # no leftovers


# --------------------------------------------------------------------------- (b) same preprocessing
def test_infer_preprocessing_is_the_training_store_preprocessing(run_dir, photos, unsharded, tmp_path):
    assert infer.model_image is images.model_image  # one image path: prepare's chunks call it too
    classes = tmp_path / "classes"
    for i, name in enumerate(GOOD):
        dest = classes / ("ab"[i % 2]) / os.path.basename(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(photos, name), dest)
    samples = read_folder(str(classes))
    prepared = store.prepare(samples, (32, 32), 3, 0.0, 0.25, seed=0, out_path=str(tmp_path / "s.h5"))
    predictor = infer.Predictor(run_dir)
    for split in store.SPLITS:
        sp = prepared.splits[split]
        for j in range(len(sp)):
            path = samples.paths[sp.source_index[j]]
            np.testing.assert_array_equal(predictor.preprocess(path), sp.images[j])
    prepared.close()

    # the whole pipeline: the store's images and the files themselves give the same predictions
    assert run("--model", run_dir, "--input", tmp_path / "s.h5", "--split", "all", "--output",
               tmp_path / "s_preds.h5") == 0
    from_store = read_h5(tmp_path / "s_preds.h5")
    by_file = dict(zip(read_h5(unsharded)["path"], read_h5(unsharded)["probabilities"]))
    prepared = store.open_store(str(tmp_path / "s.h5"))
    k = 0
    for split in store.SPLITS:
        for j, src in enumerate(prepared.splits[split].source_index):
            assert from_store["path"][k] == f"{tmp_path / 's.h5'}:{split}[{j}]"
            name = os.path.relpath(samples.paths[src], classes).split(os.sep, 1)[1]
            match = [p for p in by_file if os.path.basename(p) == name]
            np.testing.assert_allclose(from_store["probabilities"][k], by_file[match[0]], rtol=1e-4, atol=1e-6)
            k += 1
    prepared.close()
    assert k == len(GOOD)


# --------------------------------------------------------------------------- (c) SIGKILL and resume
def _chunk_count(folder) -> int:
    try:
        return len([n for n in os.listdir(folder) if n.endswith(".npz") and not n.startswith(".")])
    except FileNotFoundError:
        return 0


def _wait_for_chunks(proc, folder, at_least: int, timeout: float = 120.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        n = _chunk_count(folder)
        if n >= at_least or proc.poll() is not None:
            return n
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {at_least} chunks in {folder} after {timeout}s")


@pytest.mark.slow
def test_sigkill_midway_then_restart_gives_the_uninterrupted_result(run_dir, photos, tmp_path):
    # a listing (path,label columns: the labels are ignored) of 192 rows of big photos
    listing = tmp_path / "many.csv"
    big = ["astronaut.png", "chelsea.png", "coffee.jpg", "rocket.jpg", "truncated.png", "sub/coins.png"]
    with open(listing, "w") as f:
        f.write("path,label\n")
        for i in range(192):
            f.write(f"{os.path.join(photos, big[i % len(big)])},x\n")
    # the uninterrupted run, in one chunk; the interrupted one in 24 chunks, slowly (one decoder)
    assert run("--model", run_dir, "--input", listing, "--output", tmp_path / "ref.h5") == 0
    reference = read_h5(tmp_path / "ref.h5")
    assert len(reference["path"]) == 160 and len(reference["errors"]) == 32
    opts = ["--set", "infer.chunk_size=8", "--set", "infer.batch_size=6", "--set", "infer.workers=1"]

    out = tmp_path / "out.h5"
    chunks = tmp_path / "out.part-00000-of-00001.chunks"
    args = ["infer", "--model", run_dir, "--input", listing, "--output", out, *opts]
    proc = Forked(args, env=clean_env())
    first = _wait_for_chunks(proc, chunks, 3)
    proc.kill()  # SIGKILL
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill ({first} chunks)"
    assert not out.exists()

    # restart; stop it with SIGUSR1 (as Slurm does before the time limit): exit 75
    proc = Forked(args, env=clean_env())
    second = _wait_for_chunks(proc, chunks, _chunk_count(chunks) + 3)
    proc.send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == infer.EX_TEMPFAIL, log
    assert "resuming at row" in log and "stopped by SIGUSR1" in log
    assert not out.exists() and second < 24

    # and finish in-process
    assert run("--model", run_dir, "--input", listing, "--output", out, *opts) == 0
    assert_same(read_h5(out), reference)
    assert not chunks.exists()


def test_time_budget_stops_after_a_chunk_and_a_different_run_is_refused(run_dir, photos, unsharded, tmp_path,
                                                                         capsys):
    out = tmp_path / "p.h5"
    common = ["--model", run_dir, "--input", photos, "--output", out, "--set", "infer.chunk_size=2"]
    assert run(*common, "--time-budget", "0.01s") == infer.EX_TEMPFAIL
    assert not out.exists() and _chunk_count(tmp_path / "p.part-00000-of-00001.chunks") >= 1
    capsys.readouterr()
    assert run(*common, "--set", "infer.top_k=3") == 2  # other settings: not mixed into these rows
    assert "different run" in capsys.readouterr().err
    assert run(*common) == 0
    assert_same(read_h5(out), read_h5(unsharded))


# --------------------------------------------------------------------------- (d) shards + merge
def test_three_shards_and_merge_equal_the_unsharded_run(run_dir, photos, unsharded, tmp_path, capsys):
    out = tmp_path / "p.h5"
    assert run("--merge", "--output", out) == 2  # nothing to merge yet
    for i in range(3):
        assert run("--model", run_dir, "--input", photos, "--output", out, "--shard", f"{i}/3",
                   "--set", "infer.chunk_size=2") == 0
        if i == 1:
            capsys.readouterr()
            assert run("--merge", "--output", out) == 2
            assert "1 of 3 shards not finished (2/3)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == [f"p.part-0000{i}-of-00003.h5" for i in range(3)]
    # a finished shard run again is a no-op
    assert run("--model", run_dir, "--input", photos, "--output", out, "--shard", "1/3") == 0
    assert run("--merge", "--output", out) == 0
    assert_same(read_h5(out), read_h5(unsharded))
    assert sorted(os.listdir(tmp_path)) == ["p.errors.csv", "p.h5"]


def test_slurm_array_task_picks_the_shard(run_dir, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 3600))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert run("--model", run_dir, "--input", photos, "--output", tmp_path / "p.h5") == 0
    assert os.listdir(tmp_path) == ["p.part-00001-of-00004.h5"]


def test_choose_shard():
    assert infer.choose_shard(None, ClusterInfo())[0] == infer.Shard(0, 1)
    assert infer.choose_shard("2/5", ClusterInfo())[0] == infer.Shard(2, 5)
    array = ClusterInfo(launcher="slurm", job_id="1", array_task_id=3, array_task_count=8)
    assert infer.choose_shard(None, array)[0] == infer.Shard(3, 8)
    mpi = ClusterInfo(launcher="mpi", rank=1, world_size=2)
    assert infer.choose_shard(None, mpi)[0] == infer.Shard(1, 2)
    with pytest.raises(infer.InferError, match="outside 0..7"):
        infer.choose_shard(None, ClusterInfo(launcher="slurm", job_id="1", array_task_id=8, array_task_count=8))
    with pytest.raises(infer.InferError, match="same shard"):
        infer.choose_shard("0/2", mpi)
    with pytest.raises(infer.InferError):
        infer.parse_shard("3/3")
    assert [infer.Shard(i, 3).rows(10) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_output_names():
    o = infer.outputs_for("x/preds.h5")
    assert (o.h5, o.csv, o.errors, o.part(infer.Shard(3, 8))) == \
        ("x/preds.h5", None, "x/preds.errors.csv", "x/preds.part-00003-of-00008.h5")
    assert infer.outputs_for("p.csv").files == ["p.csv"]
    assert infer.outputs_for("p.h5", "both").files == ["p.h5", "p.csv"]
    assert infer.outputs_for("p", "both").files == ["p.h5", "p.csv"]
    with pytest.raises(infer.InferError, match="extension"):
        infer.outputs_for("p.txt")


# --------------------------------------------------------------------------- inputs
def test_listings_without_labels_npz_and_store_splits(photos, tmp_path):
    (tmp_path / "a.csv").write_text("".join(f"{os.path.join(photos, g)}\n" for g in GOOD[:3]))
    assert infer.open_inputs(str(tmp_path / "a.csv")).names == [os.path.join(photos, g) for g in GOOD[:3]]
    shutil.copy(os.path.join(photos, "camera.jpg"), tmp_path / "cam.jpg")
    (tmp_path / "b.json").write_text(json.dumps(["cam.jpg", {"path": "cam.jpg", "label": "x"}]))
    inp = infer.open_inputs(str(tmp_path / "b.json"))
    assert inp.names == ["cam.jpg", "cam.jpg"]
    assert os.path.samefile(inp.load(1), tmp_path / "cam.jpg")  # a file row reads as its path, relative to the listing
    np.savez(tmp_path / "c.npz", images=np.zeros((5, 8, 8), np.uint8))
    assert len(infer.open_inputs(str(tmp_path / "c.npz"))) == 5
    labels = np.repeat(np.arange(2), 10)
    from hpcjobs.data.sources import Samples

    s = Samples(labels, ["a", "b"], "mem", arrays=np.zeros((20, 8, 8), np.uint8))
    store.prepare(s, None, 1, 0.2, 0.2, 0, out_path=str(tmp_path / "s.h5")).close()
    assert len(infer.open_inputs(str(tmp_path / "s.h5"))) == 4  # the test split
    assert len(infer.open_inputs(str(tmp_path / "s.h5"), "all")) == 20
    with pytest.raises(SourceError):
        infer.open_inputs(str(tmp_path / "missing"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(SourceError, match="unknown input type"):
        infer.open_inputs(str(tmp_path / "d.txt"))


# --------------------------------------------------------------------------- (e) export errors
@pytest.mark.parametrize("damage", ["missing", "shape", "classes", "no_export"])
def test_a_bad_export_is_a_clear_error_before_any_work(run_dir, photos, tmp_path, capsys, damage):
    export = tmp_path / "export"
    shutil.copytree(os.path.join(run_dir, "export"), export)
    pp = export / "preprocessing.json"
    info = json.loads(pp.read_text())
    if damage == "missing":
        pp.unlink()
    elif damage == "shape":
        pp.write_text(json.dumps(dict(info, input_shape=[28, 28, 1])))
    elif damage == "classes":
        pp.write_text(json.dumps(dict(info, class_names=info["class_names"][:5])))
    else:
        shutil.rmtree(export)
    out = tmp_path / "out" / "p.h5"
    assert run("--model", export, "--input", photos, "--output", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpcjobs: error:") and len(err.splitlines()) == 1
    assert {"missing": "preprocessing.json: missing", "shape": "does not match the model",
            "classes": "5 class names", "no_export": f"{export}: no such file or folder"}[damage] in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- replicas and ranks
MIRRORED = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from hpcjobs import infer
from hpcjobs.config import InferConfig
p = infer.Predictor(sys.argv[1], devices=["/cpu:0", "/cpu:1"])
assert p.replicas == 2
sys.exit(infer.infer(InferConfig(model=sys.argv[1], input=sys.argv[2], output=sys.argv[3], batch_size=3,
                                 chunk_size=4), predictor=p))
"""


@pytest.mark.multiprocess
def test_mirrored_replicas_keep_the_row_order(run_dir, photos, unsharded, tmp_path):
    """The MirroredStrategy path (used with several GPUs), here on two logical CPUs."""
    out = tmp_path / "p.h5"
    r = subprocess.run([sys.executable, "-c", MIRRORED, run_dir, photos, str(out)], env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same(read_h5(out), read_h5(unsharded))


@pytest.mark.multiprocess
def test_two_mpi_ranks_and_rank0_merges(run_dir, photos, unsharded, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not installed")
    pytest.importorskip("mpi4py")
    out = tmp_path / "p.h5"
    r = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m",
                        "hpcjobs", "infer", "--model", run_dir, "--input", photos, "--output", str(out),
                        "--set", "infer.chunk_size=2"],
                       env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mpi rank 1 of 2" in r.stdout and "merged 2 parts" in r.stdout
    assert_same(read_h5(out), read_h5(unsharded))
    assert sorted(os.listdir(tmp_path)) == ["p.errors.csv", "p.h5"]


def test_config_infer_section_and_run_dir_as_the_model(run_dir, photos, unsharded, tmp_path):
    cfg = tmp_path / "infer.yaml"
    cfg.write_text(f"infer:\n  input: {photos}\n  output: {tmp_path / 'p.h5'}\n  batch_size: 5\n  top_k: 3\n")
    assert cli.main(["infer", str(cfg), "--run-dir", run_dir, "--set", "infer.chunk_size=4"]) == 0
    res, ref = read_h5(tmp_path / "p.h5"), read_h5(unsharded)
    assert res["top_i"].shape == (len(GOOD), 3)
    np.testing.assert_allclose(res["probabilities"], ref["probabilities"], rtol=1e-4, atol=1e-6)
    assert cli.main(["infer", str(cfg), "--set", "infer.shard=5/2"]) == 2  # checked like any config value


# --------------------------------------------------------------------------- hostile --output (issue 17)
def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cli(*argv):
    """``python -m hpcjobs infer ...``: (exit code, stderr)."""
    r = forked.run(["infer", *argv], env=clean_env(), timeout=300)
    return r.returncode, r.stderr


def _refused(argv, keep, folder, word):
    """The command is exit 2 with one line naming ``word``; ``keep`` and the folder are as they were."""
    before, listed = _sha256(keep), sorted(os.listdir(folder))
    rc, err = _cli(*argv)
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("hpcjobs: error:"), err
    assert word in err, err
    assert _sha256(keep) == before
    assert sorted(os.listdir(folder)) == listed  # no chunks, parts or results left behind


@pytest.fixture
def hostile_inputs(photos, tmp_path):
    from hpcjobs.data.sources import Samples

    s = Samples(np.repeat(np.arange(2), 10), ["a", "b"], "mem", arrays=np.zeros((20, 8, 8), np.uint8))
    store.prepare(s, None, 1, 0.2, 0.2, 0, out_path=str(tmp_path / "s.h5")).close()
    (tmp_path / "l.csv").write_text("".join(f"{os.path.join(photos, g)}\n" for g in GOOD[:3]))
    return tmp_path


@pytest.mark.parametrize("inp, out, extra", [
    ("s.h5", "s.h5", []),  # a store onto itself
    ("l.csv", "l.csv", []),  # a listing onto itself
    ("l.csv", "l.h5", ["--set", "infer.format=both"]),  # the CSV results would be the listing
    ("p.errors.csv", "p.h5", []),  # the errors CSV would be the listing
    ("p.part-00001-of-00003.h5", "p.h5", ["--shard", "1/3"]),  # the shard's part file would be the store
    ("s.h5", "link.h5", []),  # a symbolic link to the input
])
def test_results_never_replace_their_input(run_dir, hostile_inputs, inp, out, extra):
    d = hostile_inputs
    if inp == "p.errors.csv":
        shutil.copy(d / "l.csv", d / inp)
    elif inp.startswith("p.part"):
        shutil.copy(d / "s.h5", d / inp)
    if out == "link.h5":
        os.symlink(d / inp, d / out)
    _refused(["--model", run_dir, "--input", d / inp, "--output", d / out, *extra], d / inp, d, "is the input")


@pytest.mark.parametrize("name, content", [
    ("notes.csv", "my notes, not results\n"),
    ("config.h5", None),  # an HDF5 file that is not a result (a store)
    ("p.errors.csv", "a,b\n1,2\n"),  # the errors CSV beside the results
])
def test_an_existing_file_infer_did_not_write_is_not_replaced(run_dir, photos, hostile_inputs, name, content):
    d = hostile_inputs
    if content is None:
        shutil.copy(d / "s.h5", d / name)
    else:
        (d / name).write_text(content)
    out = d / ("p.h5" if name == "p.errors.csv" else name)
    _refused(["--model", run_dir, "--input", photos, "--output", out], d / name, d, "not an hpcjobs infer result")


def test_an_existing_result_is_replaced(run_dir, photos, tmp_path):
    listing = tmp_path / "l.csv"
    listing.write_text(f"{os.path.join(photos, GOOD[0])}\n")
    for _ in range(2):
        assert run("--model", run_dir, "--input", listing, "--output", tmp_path / "p.csv",
                   "--set", "infer.format=both") == 0
    assert len(read_h5(tmp_path / "p.h5")["path"]) == 1


def _read_only_folder(tmp_path):
    """A folder nobody may write in: a chmod 555 one, or (as root, who writes anywhere) /sys."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").touch()
    except OSError:
        return ro
    (ro / "probe").unlink()
    import tempfile

    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return "/sys"
    pytest.skip("no read-only folder here")


def test_an_unwritable_output_is_one_line(run_dir, photos, tmp_path):
    (tmp_path / "a_file").write_text("x\n")
    listing = tmp_path / "l.csv"
    listing.write_text(f"{os.path.join(photos, GOOD[0])}\n")
    for out, word in ((os.path.join(_read_only_folder(tmp_path), "preds", "p.h5"), "cannot write in"),
                      (tmp_path / "a_file" / "p.h5", "is a file, not a folder")):
        _refused(["--model", run_dir, "--input", listing, "--output", out], listing, tmp_path, word)


def test_kaggle_style_submission_csv(run_dir, photos, unsharded, tmp_path):
    out = tmp_path / "preds.h5"
    assert run("--model", run_dir, "--input", str(photos), "--output", str(out),
               "--set", "infer.submission={id_column: Id, label_column: Category, id: stem}") == 0
    rows = list(csv.reader(open(tmp_path / "preds.submission.csv")))
    results = read_h5(out)
    names = [os.path.splitext(os.path.basename(p))[0] for p in results["path"]]
    assert rows[0] == ["Id", "Category"] and [r[0] for r in rows[1:]] == names
    classes = results["class_names"]
    assert [r[1] for r in rows[1:]] == [classes[i] for i in results["probabilities"].argmax(1)]
    # the KAUST tutorial's form: ImageId from 1 in input order, no other columns
    assert run("--model", run_dir, "--input", str(photos), "--output", str(tmp_path / "k.csv"),
               "--set", "infer.submission={}") == 0
    rows = list(csv.reader(open(tmp_path / "k.submission.csv")))
    assert rows[0] == ["ImageId", "Label"] and rows[1][0] == str(int(results["row"][0]) + 1)
