"""Node-local staging of the store (data.stage, issue 26 item 4): the copy is verified, one
per node (the ranks of a node wait on a lock), reused by a later run, and a run that stages
ends bitwise equal to one that reads in place; a stage folder without room (the free-space
probe stood in for: a full disk cannot be made here) or one that cannot be written reads in
place, with one line saying why."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys

import pytest

from hpcjobs import cli
from hpcjobs.data import stage

from conftest import QUICKSTART

# a hybrid feed over a small budget: training reads the store (the staged copy) by mapping it
TINY = ["--set", "training.epochs=1", "--set", "data.feed=hybrid", "--set", "data.memory_budget=48KiB"]


def _record(run) -> dict:
    with open(os.path.join(run, "run.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "digits.h5")
    assert cli.main(["prepare", QUICKSTART, "--output", path]) == 0
    return path


@pytest.fixture(scope="module")
def in_place(store, tmp_path_factory):
    """The run that reads the store where it lies."""
    run = str(tmp_path_factory.mktemp("runs") / "in-place")
    assert cli.main(["train", QUICKSTART, "--run-dir", run, "--set", f"data.store={store}", *TINY]) == 0
    return _record(run)


def test_copy_verified_copies_the_bytes_and_returns_their_digest(tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(3 * 1000 + 17)
    src.write_bytes(data)
    n, digest = stage.copy_verified(str(src), str(tmp_path / "dst.bin"), chunk=1000)  # several chunks, a short last
    assert n == len(data) and (tmp_path / "dst.bin").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["dst.bin", "src.bin"]  # no temporary file left


def test_staged_run_reads_the_copy_and_ends_bitwise_equal_to_the_run_in_place(store, in_place, tmp_path, capsys):
    folder = tmp_path / "scratch"
    run = str(tmp_path / "staged")
    assert cli.main(["train", QUICKSTART, "--run-dir", run, "--set", f"data.store={store}",
                     "--set", f"data.stage={folder}", *TINY]) == 0
    out = capsys.readouterr().out
    rec = _record(run)
    st = rec["stage"]
    assert st["path"].startswith(str(folder)) and st["bytes"] == os.path.getsize(store) and not st["reused"]
    assert st["seconds"] > 0
    with open(st["path"], "rb") as a, open(store, "rb") as b:
        assert a.read() == b.read()
    assert len(re.findall(r"^staged the store .* verified$", out, re.M)) == 1, out
    assert rec["weights_sha256"] == in_place["weights_sha256"]
    assert rec["feed"] == in_place["feed"] == "hybrid"

    # a second run on this node finds the verified copy: no second copy
    again = str(tmp_path / "again")
    assert cli.main(["train", QUICKSTART, "--run-dir", again, "--set", f"data.store={store}",
                     "--set", f"data.stage={folder}", *TINY]) == 0
    assert "staged the store" not in capsys.readouterr().out
    st2 = _record(again)["stage"]
    assert st2["reused"] and st2["path"] == st["path"] and st2["seconds"] == 0
    assert _record(again)["weights_sha256"] == in_place["weights_sha256"]


def test_a_stage_folder_without_room_reads_in_place_with_one_line(store, in_place, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stage, "free_bytes", lambda folder: os.path.getsize(store) + 1)  # fits, but not the margin
    folder = tmp_path / "full"
    run = str(tmp_path / "run")
    assert cli.main(["train", QUICKSTART, "--run-dir", run, "--set", f"data.store={store}",
                     "--set", f"data.stage={folder}", *TINY]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "data.stage" in x]
    assert len(lines) == 1 and "reading the store in place" in lines[0] and "does not fit" in lines[0], lines
    rec = _record(run)
    assert rec["stage"]["in_place"] and "does not fit" in rec["stage"]["reason"]
    assert rec["weights_sha256"] == in_place["weights_sha256"]
    assert not any(f.endswith(".h5") for _, _, fs in os.walk(folder) for f in fs)  # nothing copied


def test_a_stage_folder_that_cannot_be_made_reads_in_place(store, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    said = []
    got = stage.stage(store, str(blocker), say=said.append)
    assert got.path == store and not got.staged
    assert len(said) == 1 and said[0].startswith("data.stage: reading the store in place: cannot use the stage folder")


def test_a_copy_that_fails_its_check_is_not_used(store, tmp_path, monkeypatch):
    def corrupt(src, dest, chunk=stage.CHUNK):
        raise stage.CopyError("the copy's SHA-256 differs from the store's")

    monkeypatch.setattr(stage, "copy_verified", corrupt)
    said = []
    got = stage.stage(store, str(tmp_path), job="7", say=said.append)
    assert not got.staged and got.path == store and "SHA-256 differs" in said[0]
    # another rank of the same job reads in place at once, silently: the node said it once
    more = []
    assert stage.stage(store, str(tmp_path), job="7", say=more.append).path == store and more == []


def _stage_in_child(store, folder, queue):
    said = []
    got = stage.stage(store, folder, say=said.append)
    queue.put((got.path, got.reused, said))


def test_two_processes_on_a_node_make_one_copy(store, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_stage_in_child, args=(store, str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    paths = {g[0] for g in got}
    assert len(paths) == 1 and paths.pop().startswith(str(tmp_path))
    assert sorted(g[1] for g in got) == [False, True]  # one copied, the other waited and reused it
    assert sum(len(g[2]) for g in got) == 1


def test_stage_needs_a_store(tmp_path, capsys):
    assert cli.main(["train", QUICKSTART, "--run-dir", str(tmp_path / "r"), "--set", "data.stage=auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.stage" in err[0] and "data.store" in err[0], err


@pytest.mark.slurm
def test_two_ranks_on_one_node_make_one_copy_on_the_cluster(on_cluster, store, in_place, tmp_path):
    from slurm_cluster import job_done, last_job, logs, squeue_states, status, wait_for

    run = tmp_path / "two"
    folder = tmp_path / "node-scratch"
    assert cli.main(["submit", QUICKSTART, "--run-dir", str(run), "--nodes", "1", "--time", "5",
                     "--set", "slurm.ntasks_per_node=2", "--set", "distribute.strategy=multiworker",
                     "--set", f"data.store={store}", "--set", f"data.stage={folder}", *TINY]) == 0
    job = last_job(run)
    wait_for(lambda: job_done(job), 300, "the 2-rank job", job, run)
    text = logs(run)
    assert squeue_states(job) == ["COMPLETED"], text[-4000:]
    digests = dict(re.findall(r"worker (\d)/2 step \d+ weights sha256 (\w+)", text))
    assert set(digests) == {"0", "1"}, text[-3000:]
    assert len(re.findall(r"^staged the store ", text, re.M)) == 1, text[-3000:]
    copies = [f for _, _, fs in os.walk(folder) for f in fs if f.endswith(".h5")]
    assert copies == [os.path.basename(store)]
    st = status(run)
    assert st["replicas"] == 2 and st["stage"]["path"].startswith(str(folder))
    assert st["feed_check"]["step_samples_per_s"] > 0  # the check's steps ran on both ranks (collectives)
    print("\n".join(x for x in text.splitlines() if x.startswith(("staged", "feed check", "worker", "data.stage"))))
