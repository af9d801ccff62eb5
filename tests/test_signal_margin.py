"""A submission sized from measured sessions (issue 27 item 5): each session records what it
cost in run.json, ``slurm.signal_margin: auto`` renders what the slowest save and the longest
call need into ``--signal``, and a job whose checkpoint writes are slow (``HPCJOBS_TEST_SLOW_SAVE``,
a test-only sleep inside the measured write) still stops with a checkpoint before its limit.

Every stop is caused by the test (a time budget here, Slurm's own warning under a limit no
training can outlast on the cluster), never by betting on the machine's speed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from hpcjobs import cli
from hpcjobs.cluster import costs

from conftest import LEAN_ARGS, QUICKSTART
from slurm_cluster import job_done, last_job, logs, squeue_states, status, wait_for

SLOW = 3.0  # seconds each checkpoint write of the slow session sleeps
SETS = ["--set", "training.epochs=2", "--set", "checkpoint.every_steps=20", "--set", "checkpoint.every_minutes=null",
        *LEAN_ARGS]


def _train(run_dir, slow: float | None, *extra):
    saved = os.environ.pop(costs.SLOW_SAVE_ENV, None)
    try:
        if slow:
            os.environ[costs.SLOW_SAVE_ENV] = str(slow)
        assert cli.main(["train", QUICKSTART, "--run-dir", str(run_dir), *SETS, *extra]) == 0
    finally:
        os.environ.pop(costs.SLOW_SAVE_ENV, None)
        if saved is not None:
            os.environ[costs.SLOW_SAVE_ENV] = saved


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short training with ordinary checkpoint writes; and a copy of it trained one epoch
    further in a second session whose writes are slow."""
    base = tmp_path_factory.mktemp("margin")
    _train(base / "fast", None)
    shutil.copytree(base / "fast", base / "slow")
    _train(base / "slow", SLOW, "--set", "training.epochs=3")
    return base / "fast", base / "slow"


def _costs(run) -> dict:
    return status(run)["sessions"][-1]["costs"]


def _auto_margin(run, capsys, *extra) -> int:
    assert cli.main(["submit", QUICKSTART, "--run-dir", str(run), "--signal-margin", "auto", "--dry-run", *SETS,
                     *extra]) == 0
    return int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", capsys.readouterr().out, re.M).group(1))


def test_each_session_records_its_start_up_compile_calls_and_every_save(runs):
    fast, slow = runs
    for run in runs:
        c = _costs(run)
        assert 0 < c["first_call_seconds"] <= c["startup_seconds"], c
        assert c["longest_call_seconds"] > 0, c
        # one figure per checkpoint written: the files on disk are the last max_to_keep of them
        kept = len([n for n in os.listdir(run / "checkpoints") if n.endswith(".index")])
        assert len(c["save_seconds"]) >= min(kept, 1) > 0, (c, kept)
    sessions = status(slow)["sessions"]
    assert len(sessions) == 2 and sessions[0]["costs"] == _costs(fast)  # the earlier session's figures kept
    # the slow knob sleeps inside the write that Checkpoints measures (for StopSignals too)
    assert min(_costs(slow)["save_seconds"]) >= SLOW


def test_auto_margin_covers_the_largest_save_recorded_and_grows_with_slow_saves(runs, capsys):
    fast, slow = runs
    before, after = _auto_margin(fast, capsys), _auto_margin(slow, capsys)
    assert before >= 1.5 * max(_costs(fast)["save_seconds"]) + costs.SAFETY_SECONDS, before
    largest = max(x for s in status(slow)["sessions"] for x in s["costs"]["save_seconds"])
    assert after >= 1.5 * largest + costs.SAFETY_SECONDS >= 1.5 * SLOW + costs.SAFETY_SECONDS, (after, largest)
    assert after >= before


def test_a_margin_shorter_than_a_stop_needs_is_one_line_with_the_value_to_use(runs, capsys):
    fast, slow = runs
    need = _auto_margin(slow, capsys)
    rc = cli.main(["doctor", QUICKSTART, "--fast", "--json", "--run-dir", str(slow), *SETS,
                   "--set", f"slurm.signal_margin={need - 1}"])
    rows = [r for r in json.loads(capsys.readouterr().out) if r["name"] == "time"]
    short = [r for r in rows if r["level"] == "warning"]
    assert rc == 0 and len(short) == 1 and f"use signal_margin: {need}" in short[0]["message"], rows
    assert "\n" not in short[0]["message"]
    cli.main(["doctor", QUICKSTART, "--fast", "--json", "--run-dir", str(slow), *SETS,
              "--set", f"slurm.signal_margin={need}"])
    assert all(r["level"] == "ok" for r in json.loads(capsys.readouterr().out) if r["name"] == "time")


def test_a_slot_shorter_than_a_sessions_fixed_cost_is_refused_with_the_length_to_use(runs, capsys, monkeypatch):
    # the record says a session's start-up costs 300 s (a staged store, say): a 3-minute slot
    # would train nothing
    fast, slow = runs
    run = fast.parent / "slot"
    shutil.copytree(fast, run)
    record = status(run)
    record["sessions"][-1]["costs"]["startup_seconds"] = 300.0
    (run / "run.json").write_text(json.dumps(record))
    monkeypatch.setattr("hpcjobs.slurm._sbatch", lambda script, extra=(): pytest.fail("queued despite a blocker"))
    rc = cli.main(["submit", QUICKSTART, "--run-dir", str(run), *SETS, "--slot", "00:03:00", "--at", "22:00",
                   "--count", "2", "--signal-margin", "60"])
    err = capsys.readouterr().err
    refused = [line for line in err.splitlines() if "refused" in line]
    assert rc == 2 and len(refused) == 1 and "slurm.slot 00:03:00" in refused[0], err
    assert re.search(r"use slurm\.slot: \d\d:\d\d:\d\d or more", refused[0]), refused


def test_with_no_session_measured_the_margin_is_estimated_from_the_checkpoint_and_the_write_rate(runs, capsys):
    fast, _ = runs
    run = fast.parent / "copied"
    os.makedirs(run)
    shutil.copytree(fast / "checkpoints", run / "checkpoints")  # checkpoints, no run.json
    found = costs.for_run(str(run), {})
    assert found is not None and found.source.startswith("estimated from"), found
    assert _auto_margin(run, capsys) == found.margin >= costs.SAFETY_SECONDS


@pytest.mark.slurm
def test_a_job_with_slow_saves_stops_with_a_checkpoint_before_its_limit_under_an_auto_margin(
        on_cluster, tmp_path, monkeypatch, capsys):
    # session 1 here, stopped by its time budget, records slow saves; the job (its slow saves
    # too: it inherits the environment) gets --signal from them under a 2-minute limit that
    # 100,000 epochs cannot outlast, and must stop with a checkpoint, not time out
    slow = 6.0
    monkeypatch.setenv(costs.SLOW_SAVE_ENV, str(slow))
    run = tmp_path / "slow-job"
    sets = ["--set", "training.epochs=100000", "--set", "checkpoint.every_minutes=null",
            "--set", "checkpoint.every_steps=400", *LEAN_ARGS]
    assert cli.main(["train", QUICKSTART, "--run-dir", str(run), *sets, "--time-budget", "20s"]) == 75
    first = status(run)["sessions"][0]
    assert max(first["costs"]["save_seconds"]) >= slow
    capsys.readouterr()
    assert cli.main(["submit", QUICKSTART, "--run-dir", str(run), *sets, "--time", "2", "--signal-margin", "auto",
                     "--max-requeues", "0"]) == 0
    margin = int(re.search(r"--signal=B:USR1@(\d+)", (run / "slurm" / "train.sbatch").read_text()).group(1))
    assert margin >= 1.5 * slow + costs.SAFETY_SECONDS, margin
    job = last_job(run)
    try:
        wait_for(lambda: job_done(job), 400, "the job to stop", job, run)
        states, text = squeue_states(job), logs(run)
        assert "TIMEOUT" not in states, (states, text[-4000:])
        assert "exited with 75" in text, text[-4000:]
        last = status(run)["sessions"][-1]
        assert len(status(run)["sessions"]) == 2 and last["stopped_by"] in ("SIGUSR1", "time_budget"), last
        assert (run / "checkpoints" / f"ckpt-{last['end_step']}.index").exists(), os.listdir(run / "checkpoints")
        assert max(last["costs"]["save_seconds"]) >= slow, last  # the job's own final save was a slow one
        print(f"margin {margin} s; job states {states}; session 2 {last['stopped_by']} at step {last['end_step']}, "
              f"costs {last['costs']}")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
