"""A chain of time slots that renews itself (issue 27 item 2), and ``hpcjobs cancel`` on a
running chain (item 3): on the real local Slurm cluster, compressed to one-minute slots.

Each slot's stop is caused by the test (USR1 to the batch shell once the slot's training holds
at its step for a stop signal: tests/hold_for_signal.py), never by betting on the machine's
speed; only the last slot is left to end."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time

import pytest

from hpcjobs import cli, slurm

import forked
from conftest import HOLD_AT, HOLD_HOOK, LEAN, QUICKSTART
from slurm_cluster import job_done, squeue_states, status, wait_for

# the first slots' sessions hold after the calls reaching steps 15, 35 and 55 (HOLD_AT, set by each
# test) until their stop signal; 4 epochs (180 steps) leave the last slot little to do
SETS = ["training.epochs=4", "checkpoint.every_minutes=null", "training.log_every_steps=100000", HOLD_HOOK, *LEAN]
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


def _holds(run, job: str) -> bool:
    return "holding at step" in _log(run, job)


def _all_logs(run) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run / "slurm").glob("*.out")))


def _stop_while_it_holds(run, job: str, what: str):
    wait_for(lambda: _holds(run, job) or job_done(job), 240, f"{what} to hold for its signal", job, run)
    assert not job_done(job), _all_logs(run)[-4000:]
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, capture_output=True)


# --------------------------------------------------------------------------- the job script's logic, stubbed
FAKE_PYTHON = """\
import os, sys
# python for the job script: the real one for hpcjobs' own helpers; else a training that exits with $FAKE_RC
if sys.argv[1:2] == ["-c"] or sys.argv[1:3] in (["-m", "hpcjobs.rundir"], ["-m", "hpcjobs.slurm.chain"]):
    os.execv(os.environ["REAL_PYTHON"], [os.environ["REAL_PYTHON"]] + sys.argv[1:])
open(os.environ["CALLS"], "a").write("train\\n")
sys.exit(int(os.environ["FAKE_RC"]))
"""
FAKE_BIN = {
    "srun": 'while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n',
    "scontrol": 'echo "scontrol $*" >>"$CALLS"\n',
    "sbatch": 'echo "sbatch $* SLURM_JOB_ID=${SLURM_JOB_ID:-unset}" >>"$CALLS"\necho 78\n',
}


@pytest.fixture
def slot_script(tmp_path):
    """A rendered train script of a renewing chain (slot 1 = job 77 recorded in jobs.json), run
    with stand-ins for srun, scontrol, sbatch and the training."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_BIN.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").write_text(f"#!{sys.executable}\n" + FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    script = run / "slurm" / "train.sbatch"
    script.write_text(slurm.render("train", python=str(bin_dir / "python"), run_dir=str(run),
                                   config=str(run / "config.yaml"), job_name="t", time="00:01:00", signal_margin=5,
                                   max_requeues=3, on_stop="renew"))
    begin = (dt.datetime.now() - dt.timedelta(seconds=90)).replace(microsecond=0)
    (run / "slurm" / "jobs.json").write_text(json.dumps([dict(
        job_id="77", kind="train", script=str(script), log=str(run / "slurm" / "t-77.out"), slot=1,
        begin=begin.isoformat(), every=60, renews=True)]))
    calls = tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), REAL_PYTHON=sys.executable,
               SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node1", PYTHONPATH=os.environ.get("PYTHONPATH", ""))

    def run_it(rc: int):
        p = subprocess.run(["bash", str(script)], env=dict(env, FAKE_RC=str(rc)), capture_output=True, text=True,
                           timeout=120)
        return p, calls.read_text() if calls.exists() else ""
    return run_it, run, begin


def test_a_slot_stopped_with_more_to_do_submits_the_next_at_the_next_time(slot_script):
    run_it, run, begin = slot_script
    before = dt.datetime.now()
    p, calls = run_it(75)
    assert p.returncode == 0, p.stdout + p.stderr
    sbatch, = [line for line in calls.splitlines() if line.startswith("sbatch ")]
    when = dt.datetime.fromisoformat(re.search(r"--begin=(\S+)", sbatch).group(1))
    assert (when - begin).total_seconds() % 60 == 0 and before < when <= before + dt.timedelta(seconds=61)
    assert sbatch.endswith(f"{run / 'slurm' / 'train.sbatch'} SLURM_JOB_ID=unset")  # the job's own SLURM_* left out
    assert "scontrol" not in calls
    jobs = slurm.read_jobs(str(run))
    assert [(j["job_id"], j["slot"]) for j in jobs] == [("77", 1), ("78", 2)] and jobs[1]["begin"] == when.isoformat()
    assert status(run)["chain"] == dict(slots=2, last_job="77", next_job="78", next_begin=when.isoformat())
    assert "submitted slot 2 of the chain: job 78" in p.stdout


@pytest.mark.parametrize("rc", [1, 2])
def test_a_failed_slot_submits_nothing_and_says_so_in_the_log_and_run_json(slot_script, rc):
    run_it, run, _ = slot_script
    p, calls = run_it(rc)
    assert p.returncode == rc
    assert f"this slot failed (exit {rc}): the chain ends here" in p.stdout
    assert "sbatch" not in calls and "scontrol" not in calls and len(slurm.read_jobs(str(run))) == 1
    chain = status(run)["chain"]
    assert chain["next_job"] is None and f"(job 77) failed with exit {rc}" in chain["ended"]


def test_a_finished_run_submits_no_next_slot(slot_script):
    run_it, run, _ = slot_script
    (run / "run.json").write_text(json.dumps({"status": "finished"}))
    p, calls = run_it(75)
    assert p.returncode == 0 and "finished already" in p.stdout and calls == ""


@pytest.mark.parametrize("on_stop", ["renew", "requeue"])
def test_a_cancelled_run_neither_requeues_nor_renews_nor_starts(slot_script, on_stop):
    run_it, run, _ = slot_script
    script = run / "slurm" / "train.sbatch"
    script.write_text(script.read_text().replace("ON_STOP=renew", f"ON_STOP={on_stop}"))
    (run / "CANCELLED").write_text("{}")
    p, calls = run_it(75)
    assert p.returncode == 0 and "was cancelled" in p.stdout and calls == ""  # not even started
    # the cancel comes while the training runs: it stops (75), and nothing follows
    body = script.read_text().replace('if [ -e "$RUN_DIR/CANCELLED" ]; then\n    echo "$RUN_DIR was cancelled (hpcjobs',
                                      'if false; then\n    echo "$RUN_DIR was cancelled (hpcjobs', 1)
    assert body != script.read_text()
    script.write_text(body)
    p, calls = run_it(75)
    assert p.returncode == 0 and calls == "train\n", p.stdout
    assert "cancelled (hpcjobs cancel): not requeued, no next slot" in p.stdout
    assert len(slurm.read_jobs(str(run))) == 1


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
def test_a_run_that_needs_four_slots_ends_with_exactly_four_jobs(on_cluster, tmp_path, monkeypatch):
    run = tmp_path / "chain"
    monkeypatch.setenv(HOLD_AT, "15,35,55")
    assert submit([QUICKSTART, "--run-dir", str(run), "--slot", "00:01:00", "--every", "00:01:00",
                   "--at", _soon(), "--signal-margin", "5", *SET_ARGS]) == 0
    assert len(_jobs(run)) == 1  # the first slot only: the chain renews itself
    try:
        for k in range(3):
            wait_for(lambda: len(_jobs(run)) > k, 10, f"slot {k + 1} in jobs.json", None, run)
            job = _jobs(run)[k]
            _stop_while_it_holds(run, job, f"slot {k + 1}")
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
def test_cancel_stops_a_running_chain_with_a_checkpoint_and_train_resumes_it(on_cluster, tmp_path, capsys,
                                                                             monkeypatch):
    run = tmp_path / "cancelled"
    monkeypatch.setenv(HOLD_AT, "15")
    assert submit([QUICKSTART, "--run-dir", str(run), "--slot", "00:01:00", "--every", "00:01:00",
                   "--at", _soon(), "--signal-margin", "5", *SET_ARGS]) == 0
    job = _jobs(run)[0]
    try:
        wait_for(lambda: _holds(run, job) or job_done(job), 240, "the first slot to hold for its signal", job, run)
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
        assert 15 <= stopped_at < st["total_steps"]
        assert cli.main(["runs", str(tmp_path)]) == 0
        assert "stopped (cancelled)" in capsys.readouterr().out
    finally:
        subprocess.run(["scancel", *_jobs(run)], capture_output=True)
    # trained again by hand: the cancel is cleared and the run resumes from its checkpoint
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != HOLD_AT}
    p = forked.run(["train", run / "config.yaml", "--run-dir", run], env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "the cancel is cleared" in p.stderr and not (run / "CANCELLED").exists()
    st = status(run)
    assert st["status"] == "finished" and st["sessions"][-1]["start_step"] == stopped_at, st["sessions"]
