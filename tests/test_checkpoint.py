"""Resumable sessions: exact resume after time-budget stops, signals, damaged checkpoints,
the run-directory lock, and SIGKILL fault injection."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from hpcjobs import cli
from hpcjobs.data import prepare_store
from hpcjobs import config
from hpcjobs.train import train as train_api

import forked
from conftest import LEAN, QUICKSTART, REPO, latest_checkpoint_step
from forked import Forked
from stops import train_in_sessions

# Deterministic, with Dropout (simple_cnn) and random augmentation on.
DET = ["training.deterministic=true", "export.plots=false", "training.epochs=4", "training.steps_per_epoch=12",
       "training.batch_size=64",
       "data.augment.flip_horizontal=true", "data.augment.rotation=10", "data.augment.zoom=0.1",
       "checkpoint.every_minutes=null"]


def sets(*items):
    return sum((["--set", s] for s in items), [])


def train(run, *items, budget=None):  # LEAN: no test here looks at the plots
    extra = ["--time-budget", budget] if budget else []
    return cli.main(["train", QUICKSTART, "--run-dir", str(run), *sets(*LEAN, *items), *extra])


def status(run):
    return json.loads((run / "run.json").read_text())


def metrics_without_seconds(run):
    return [{k: v for k, v in row.items() if k != "seconds"}
            for row in csv.DictReader(open(run / "metrics.csv"))]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "digits.h5"
    prepare_store(config.load(QUICKSTART), str(path), progress=False).close()
    return str(path)


SCHEDULE_STATE = {  # learning-rate state that must resume exactly too
    "plateau": ["optimizer.reduce_on_plateau.patience=1", "optimizer.reduce_on_plateau.min_delta=10",
                "optimizer.reduce_on_plateau.factor=0.5"],
    # the loss scale; a narrow net: float16 convolutions are emulated on a CPU, at 10x float32's cost
    "fp16": ["training.precision=mixed_float16", "training.loss_scale_growth_steps=3", "model.width=8"],
    "cyclic": ["optimizer.schedule.kind=cyclic", "optimizer.schedule.max_learning_rate=0.01",
               "optimizer.schedule.step_size=7", "optimizer.schedule.mode=triangular2"],
}


def feed_settings(feed, store):
    if feed == "memory-async":  # asynchronous writes, several per session
        feed, feed_sets = "memory", ["checkpoint.async_write=true", "checkpoint.every_steps=5"]
    elif feed.startswith("memory-"):
        feed, feed_sets = "memory", list(SCHEDULE_STATE[feed[7:]])
    else:
        feed_sets = []
    feed_sets += [f"data.feed={feed}"]
    if feed != "memory":
        feed_sets += [f"data.store={store}"]
    if feed == "hybrid":
        feed_sets += ["data.memory_budget=60000", "data.epochs_per_segment=2"]  # several segments
    return feed_sets


def assert_equal_runs(parts, whole):
    st = status(parts)
    assert st["status"] == "finished"
    assert st["weights_sha256"] == status(whole)["weights_sha256"]
    assert metrics_without_seconds(parts) == metrics_without_seconds(whole)
    assert st["test_accuracy"] == status(whole)["test_accuracy"]


@pytest.mark.parametrize("feed", ["disk", "hybrid", "memory-async", "memory-plateau", "memory-cyclic",
                                  "memory-fp16"])
def test_sessions_stopped_mid_epoch_equal_uninterrupted_run(tmp_path, store, feed):
    cfg = config.load(QUICKSTART, DET + feed_settings(feed, store))
    whole, parts = str(tmp_path / "whole"), tmp_path / "parts"
    assert train_api(cfg, whole, verbose=False) == 0
    # calls of 10 steps cut at the 12-step epochs (and at every 5th step with async writes): each
    # session stops inside an epoch, the first after 12->22 (10->15), the second after 36->46 (36->40)
    assert train_in_sessions(parts, DET + feed_settings(feed, store), stops=(11, 36)) == [75, 75, 0]
    (s0, s1, s2) = status(parts)["sessions"]
    assert [s["stopped_by"] for s in (s0, s1, s2)] == ["test_stop", "test_stop", "finished"]
    assert (s0["start_step"], s1["start_step"], s2["start_step"]) == (0, s0["end_step"], s1["end_step"])
    assert 11 < s0["end_step"] < 24 and 35 < s1["end_step"] < 48 and s2["end_step"] == 48
    assert s0["end_step"] % 12 and s1["end_step"] % 12  # inside an epoch
    assert_equal_runs(parts, tmp_path / "whole")


@pytest.mark.tf214
def test_time_budget_sessions_equal_uninterrupted_run(tmp_path, store):
    """The time budget itself: 1 s is less than the stop's own margin (1.5 saves, 3 calls and
    1 s), and a session always trains the call it voted to stop in, so every session stops by its
    budget after exactly one call (of 10 steps, or to the epoch's end), on a machine of any speed.
    (A budget sized from costs measured in the test is a bet: a busy moment while it measures makes
    the budget cover the rest of the run.)"""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(whole, *DET, "data.feed=memory") == 0
    codes = []
    for _ in range(8):
        codes.append(train(parts, *DET, "data.feed=memory", budget="1s"))
        if codes[-1] == 75:
            assert status(parts)["status"] == "stopped"
    assert codes == [75] * 7 + [0], codes
    st = status(parts)
    assert [s["stopped_by"] for s in st["sessions"]] == ["time_budget"] * 7 + ["finished"]
    assert [s["end_step"] for s in st["sessions"]] == [10, 12, 22, 24, 34, 36, 46, 48]  # 12-step epochs
    assert_equal_runs(parts, whole)


def _spawn(run, *items, env_extra=None):
    """``hpcjobs train`` in a process of its own (forked: see forked.py), output and errors in one."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env_extra or {}))
    return Forked(["train", QUICKSTART, "--run-dir", run, *sets(*LEAN, *items)], env=env, cwd=REPO)


def _wait_for_step(run, proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if (run / "metrics.csv").exists():
            return
        if proc.poll() is not None:
            raise AssertionError(proc.output())
        time.sleep(0.1)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_exits_75(tmp_path, sig):
    run = tmp_path / "sig"
    p = _spawn(run, "training.epochs=200")
    _wait_for_step(run, p)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 75, out
    st = status(run)
    assert st["status"] == "stopped" and st["sessions"][-1]["stopped_by"] == sig.name
    assert os.path.exists(run / "checkpoints" / "checkpoint")
    assert f"ckpt-{st['step']}.index" in os.listdir(run / "checkpoints")


def test_second_process_on_same_run_is_refused(tmp_path):
    run = tmp_path / "locked"
    p = _spawn(run, "training.epochs=200")
    try:
        _wait_for_step(run, p)
        r = subprocess.run([sys.executable, "-m", "hpcjobs", "train", QUICKSTART, "--run-dir", str(run)],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        assert r.returncode == 2
        assert "in use by another hpcjobs process" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        p.kill()
        p.wait()


def test_damaged_newest_checkpoint_falls_back(tmp_path, capsys):
    run = tmp_path / "damaged"
    assert train(run, *DET, "checkpoint.every_steps=20") == 0
    whole = status(run)["weights_sha256"]
    ckpts = sorted((run / "checkpoints").glob("ckpt-*.index"), key=lambda p: int(p.name[5:-6]))
    newest = ckpts[-1].with_suffix("")
    data = next((run / "checkpoints").glob(newest.name + ".data-*"))
    data.write_bytes(data.read_bytes()[:100])  # truncated
    (run / "run.json").unlink()
    assert train(run, *DET, "checkpoint.every_steps=20") == 0
    out = capsys.readouterr().out
    assert f"checkpoint {newest} cannot be read" in out and "trying the previous one" in out
    assert status(run)["weights_sha256"] == whole  # retrained the lost steps exactly


def test_restart_moves_old_run_aside(tmp_path):
    run = tmp_path / "r"
    assert train(run, "training.epochs=1") == 0
    assert cli.main(["train", QUICKSTART, "--run-dir", str(run), "--restart", "--set", "training.epochs=1"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(aside) == 1 and (aside[0] / "run.json").exists()
    assert len(status(run)["sessions"]) == 1


def test_from_checkpoint_and_init_weights(tmp_path, capsys):
    src = tmp_path / "src"
    assert train(src, "training.epochs=1") == 0
    a = tmp_path / "a"
    assert cli.main(["train", QUICKSTART, "--run-dir", str(a), "--from", str(src),
                     "--set", "training.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "starting from checkpoint" in out
    st = status(a)
    assert st["sessions"][0]["start_step"] == status(src)["step"]
    b = tmp_path / "b"
    assert cli.main(["train", QUICKSTART, "--run-dir", str(b), "--init-weights",
                     str(src / "export" / "model.keras"), "--set", "training.epochs=1"]) == 0
    assert "initialised" in capsys.readouterr().out
    assert cli.main(["train", QUICKSTART, "--run-dir", str(tmp_path / "c"), "--from", str(tmp_path / "none")]) == 2


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_exactly(tmp_path):
    """Kill -9 the trainer at random moments (some while a checkpoint is being written);
    every restart resumes from the last complete checkpoint; final weights are exact."""
    items = [*DET, "training.epochs=20", "checkpoint.every_steps=7"]
    whole = tmp_path / "whole"
    assert train(whole, *items) == 0
    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(40):
        p = _spawn(run, *items)
        if kills < 12:
            # wait until this session is training, then kill after a random delay
            started = len(status(run)["sessions"]) if (run / "run.json").exists() else 0
            t0 = time.time()
            while time.time() - t0 < 60 and p.poll() is None:
                if (run / "run.json").exists() and len(status(run)["sessions"]) > started:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.2))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                continue
        out, _ = p.communicate(timeout=300)
        if p.returncode == 0:
            break
        assert p.returncode in (75, -9), out
    assert kills >= 10
    st = status(run)
    assert st["status"] == "finished"
    assert st["weights_sha256"] == status(whole)["weights_sha256"]
    assert metrics_without_seconds(run) == metrics_without_seconds(whole)
    print(f"SIGKILLs: {kills}, sessions: {len(st['sessions'])}")


@pytest.mark.slow
def test_sigkill_while_a_checkpoint_is_written(tmp_path):
    """Kill -9 exactly while a checkpoint is being written, synchronously and asynchronously
    (one run whose sessions change ``checkpoint.async_write``, a session key, in pairs): the
    moment its temporary folder appears (data half-written), or the moment its index appears
    (files written, not yet named latest).  Each restart resumes from the last complete
    checkpoint, and the final weights equal the uninterrupted run's."""
    # 17 MB checkpoints; 60 steps: the 12 kills' sessions go on 46 steps at most (2 x (skip + 1) each)
    items = [*DET, "model.width=256", "checkpoint.every_steps=2", "training.epochs=5"]
    whole = tmp_path / "whole"
    assert train(whole, *items) == 0
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    rng = random.Random(7)
    kills = []  # (async, step being written, latest complete step) at each kill
    for k in range(12):
        target = "_temp" if k % 2 == 0 else ".index"
        async_write = (k // 2) % 2 == 1  # sync, sync, async, async, sync, ...: each mode both targets
        skip = rng.randint(0, 2)  # saves of this session allowed to complete first
        seen = set(os.listdir(ckpts)) if ckpts.exists() else set()
        p = _spawn(run, *items, f"checkpoint.async_write={str(async_write).lower()}")
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < 120:
            names = set(os.listdir(ckpts)) if ckpts.exists() else set()
            fresh = sorted(n for n in names - seen if n.endswith(target))
            seen |= names
            if fresh and skip <= 0:
                p.send_signal(signal.SIGKILL)
                p.wait()
                writing = int(fresh[0][5:].split("_")[0].split(".")[0])
                kills.append((async_write, writing, latest_checkpoint_step(ckpts) or 0))
                break
            skip -= len(fresh)
            time.sleep(0.0005)
        else:
            out, _ = p.communicate(timeout=120)
            raise AssertionError(f"no kill in session {k} (exit {p.returncode}):\n{out}")
    for mode in (False, True):  # the checkpoint being written was not yet the latest
        mid_write = [(w, latest) for a, w, latest in kills if a == mode and w > latest]
        assert len(mid_write) >= 4, (mode, kills)
    assert train(run, *items) == 0
    st = status(run)
    starts = [s["start_step"] for s in st["sessions"]]
    assert starts[1:] == [latest for _, _, latest in kills], (starts, kills)  # the last complete one
    assert not [n for n in os.listdir(ckpts) if n.endswith("_temp") or n.startswith("checkpoint.tmp")]
    assert st["weights_sha256"] == status(whole)["weights_sha256"]
    assert metrics_without_seconds(run) == metrics_without_seconds(whole)
    print(f"kills while a checkpoint was written: {sum(w > latest for _, w, latest in kills)} of {len(kills)}: "
          f"{kills}")


def test_failed_session_keeps_the_earlier_sessions(tmp_path):
    run = tmp_path / "unreadable"
    assert train(run, "training.epochs=1") == 0
    for data in (run / "checkpoints").glob("ckpt-*.data-*"):
        data.write_bytes(b"")  # every checkpoint unreadable: a user error, exit 2
    assert train(run, "training.epochs=2") == 2
    st = status(run)
    assert st["status"] == "failed" and "no readable checkpoint" in st["error"]
    assert [s["stopped_by"] for s in st["sessions"]] == ["finished", "error: CheckpointError"]


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async"])
def test_a_checkpoint_that_cannot_be_written_fails_in_one_line(tmp_path, async_write):
    run = tmp_path / "nowrite"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".lock").write_text("")  # a run directory hpcjobs made (the run-dir rule)
    (run / "checkpoints" / "ckpt-5_temp").write_text("")  # a file where TF writes its temporary folder
    r = forked.run(["train", QUICKSTART, "--run-dir", run, *sets("training.epochs=1", "checkpoint.every_steps=5",
                                                                   f"checkpoint.async_write={str(async_write).lower()}")],
                   cwd=REPO, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("hpcjobs: training failed: cannot write checkpoint") and "ckpt-5" in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    st = status(run)
    assert st["status"] == "failed" and "cannot write checkpoint" in st["error"]
