"""A chain of time slots that renews itself (issue 27 item 2), and ``hpcjobs cancel`` on a
running chain (item 3): on the real local Slurm cluster, compressed to one-minute slots.

Each slot's stop is caused by the test (USR1 to the batch shell once the slot's log shows an
epoch of its own), never by betting on the machine's speed; only the last slot is left to end."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import time

import pytest

from hpcjobs import cli, slurm

from conftest import QUICKSTART
from slurm_cluster import job_done, squeue_states, status, wait_for

# 12 short epochs: a slot stopped a moment after its first epoch has not finished them all (a stop
# comes within an epoch or two of the signal), and what is left is little enough for one slot of a minute
SETS = ["training.epochs=12", "checkpoint.every_minutes=null", "training.log_every_steps=100000"]
SET_ARGS = [a for s in SETS for a in ("--set", s)]


def submit(argv: list[str]) -> int:
    return cli.main(["submit", *argv])


def _soon() -> str:
    return (dt.datetime.now() + dt.timedelta(seconds=8)).strftime("%H:%M:%S")


def _jobs(run) -> list[str]:
    return [j["job_id"] for j in slurm.read_jobs(str(run))]


def _log(run, job: str) -> str:
    path = next((p for p in (run / "slurm").glob(f"*-{job}.out")), None)
    return path.read_text(errors="replace") if path else ""


def _epochs(run, job: str) -> int:
    return len(re.findall(r"^epoch \d+/\d+ step \d+ ", _log(run, job), re.M))


def _all_logs(run) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run / "slurm").glob("*.out")))


def _stop_after_an_epoch(run, job: str, what: str):
    wait_for(lambda: _epochs(run, job) > 0 or job_done(job), 240, f"an epoch of {what}", job, run)
    assert not job_done(job), _all_logs(run)[-4000:]
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, capture_output=True)


def test_dry_run_shows_one_slot_that_renews_itself_or_a_fixed_count(tmp_path, capsys):
    assert submit([QUICKSTART, "--run-dir", str(tmp_path / "r"), "--slot", "01:00:00", "--at", "22:00",
                   "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ON_STOP=renew" in out and out.count("# slot ") == 1 and "submits the next one" in out
    assert submit([QUICKSTART, "--run-dir", str(tmp_path / "r"), "--slot", "01:00:00", "--at", "22:00",
                   "--count", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ON_STOP=next-slot" in out and out.count("# slot ") == 3 and "submits the next one" not in out


@pytest.mark.slurm
def test_a_run_that_needs_four_slots_ends_with_exactly_four_jobs(on_cluster, tmp_path):
    run = tmp_path / "chain"
    assert submit([QUICKSTART, "--run-dir", str(run), "--slot", "00:01:00", "--every", "00:01:00",
                   "--at", _soon(), "--signal-margin", "5", *SET_ARGS]) == 0
    assert len(_jobs(run)) == 1  # the first slot only: the chain renews itself
    try:
        for k in range(3):
            wait_for(lambda: len(_jobs(run)) > k, 10, f"slot {k + 1} in jobs.json", None, run)
            job = _jobs(run)[k]
            _stop_after_an_epoch(run, job, f"slot {k + 1}")
            wait_for(lambda: job_done(job), 180, f"slot {k + 1} to end", job, run)
            wait_for(lambda: len(_jobs(run)) > k + 1, 10, f"slot {k + 1} to submit slot {k + 2}", job, run)
        last = _jobs(run)[3]
        wait_for(lambda: job_done(last), 240, "the last slot to finish the run", last, run)
        time.sleep(5)  # long enough for a wrongly renewed slot to be in jobs.json
        jobs = _jobs(run)
        text = _all_logs(run)
        st = status(run)
        assert st["status"] == "finished", text[-4000:]
        assert len(jobs) == 4, (jobs, text[-4000:])
        assert [squeue_states(j) for j in jobs] == [["COMPLETED"]] * 4, text[-4000:]
        sessions = st["sessions"]
        assert [s["stopped_by"] for s in sessions] == ["SIGUSR1"] * 3 + ["finished"], sessions
        assert [s["job_id"] for s in sessions] == jobs, sessions
        assert all(a["end_step"] == b["start_step"] > 0 for a, b in zip(sessions, sessions[1:])), sessions
        recorded = slurm.read_jobs(str(run))
        assert [j["slot"] for j in recorded] == [1, 2, 3, 4]
        begins = [dt.datetime.fromisoformat(j["begin"]) for j in recorded]
        assert all((b - begins[0]).total_seconds() % 60 == 0 and b > a for a, b in zip(begins, begins[1:]))
        assert st["chain"]["slots"] == 4 and st["chain"]["next_job"] == jobs[3]
        assert text.count("submitted slot ") == 3
    finally:
        subprocess.run(["scancel", *_jobs(run)], capture_output=True)


@pytest.mark.slurm
def test_a_failed_slot_does_not_renew_and_says_so(on_cluster, tmp_path):
    # the run directory's config.yaml is broken after submit: the slot's training exits 2
    run = tmp_path / "failing"
    assert submit([QUICKSTART, "--run-dir", str(run), "--slot", "00:01:00", "--every", "00:01:00",
                   "--at", _soon(), "--signal-margin", "5", *SET_ARGS]) == 0
    (run / "config.yaml").write_text("training: [not, a, mapping\n")
    job = _jobs(run)[0]
    try:
        wait_for(lambda: job_done(job), 240, "the failing slot", job, run)
        time.sleep(3)
        text = _all_logs(run)
        assert _jobs(run) == [job], text[-3000:]
        assert "this slot failed (exit 2): the chain ends here" in text, text[-3000:]
        chain = status(run)["chain"]
        assert chain["next_job"] is None and f"job {job}) failed with exit 2" in chain["ended"], chain
    finally:
        subprocess.run(["scancel", *_jobs(run)], capture_output=True)


@pytest.mark.slurm
def test_cancel_stops_a_running_chain_with_a_checkpoint_and_train_resumes_it(on_cluster, tmp_path, capsys):
    import sys

    run = tmp_path / "cancelled"
    assert submit([QUICKSTART, "--run-dir", str(run), "--slot", "00:01:00", "--every", "00:01:00",
                   "--at", _soon(), "--signal-margin", "5", *SET_ARGS]) == 0
    job = _jobs(run)[0]
    try:
        wait_for(lambda: _epochs(run, job) > 0 or job_done(job), 240, "an epoch of the first slot", job, run)
        assert not job_done(job)
        capsys.readouterr()
        assert cli.main(["cancel", str(run)]) == 0
        assert f"job {job}: " in capsys.readouterr().out
        assert (run / "CANCELLED").exists()
        wait_for(lambda: job_done(job), 120, "the cancelled slot to end", job, run)
        time.sleep(5)  # long enough for a wrongly renewed slot to be in jobs.json
        text = _all_logs(run)
        assert _jobs(run) == [job], text[-3000:]  # no slot follows
        assert squeue_states(job) == ["COMPLETED"] and "requeueing job" not in text, text[-3000:]
        assert "was cancelled (hpcjobs cancel): not requeued, no next slot" in text, text[-3000:]
        st = status(run)
        assert st["status"] == "stopped" and st["sessions"][-1]["stopped_by"] == "SIGUSR1", st
        stopped_at = st["step"]
        assert 0 < stopped_at < st["total_steps"]
        assert cli.main(["runs", str(tmp_path)]) == 0
        assert "stopped (cancelled)" in capsys.readouterr().out
    finally:
        subprocess.run(["scancel", *_jobs(run)], capture_output=True)
    # trained again by hand: the cancel is cleared and the run resumes from its checkpoint
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run([sys.executable, "-m", "hpcjobs", "train", str(run / "config.yaml"), "--run-dir", str(run)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "the cancel is cleared" in p.stderr and not (run / "CANCELLED").exists()
    st = status(run)
    assert st["status"] == "finished" and st["sessions"][-1]["start_step"] == stopped_at, st["sessions"]
