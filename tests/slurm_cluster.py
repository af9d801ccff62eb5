"""The local Slurm cluster for the tests (slurm/local-cluster.sh) and the helpers that wait on its jobs.

Test processes share one cluster: pytest-xdist's workers each ask for it, the first starts it
under a file lock, and the pytest run that started it stops it at its end (conftest.py). Every
wait polls a condition with a deadline, so a job that hangs fails its test with squeue's view and
the run's logs; nothing waits on the machine's speed."""
from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import subprocess
import time

import pytest

from hpcjobs import slurm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(REPO, "slurm", "local-cluster.sh")
STATE = os.path.join(REPO, ".slurm-local")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def _started_marker(run_id: str) -> str:
    return os.path.join(STATE, f"started-by-{run_id}")


def ensure_cluster(run_id: str) -> str:
    """Start the cluster unless it runs (one process at a time); its slurm.conf. ``run_id``
    names the pytest run that started it, so that run's end stops it."""
    def unavailable(why):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"local Slurm cluster required in CI: {why}")
        pytest.skip(f"local Slurm cluster unavailable: {why}")

    have = all(shutil.which(b, path=os.environ["PATH"] + ":/usr/sbin:/sbin") for b in ("slurmctld", "slurmd", "munged"))
    if not have and not (os.geteuid() == 0 and shutil.which("apt-get")):
        unavailable("Slurm is not installed and this is not root with apt-get (apt-get install slurm-wlm munge)")
    os.makedirs(STATE, exist_ok=True)
    with open(os.path.join(STATE, ".test-start.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(["bash", CLUSTER, "status"], capture_output=True).returncode != 0:
            try:
                p = subprocess.run(["bash", CLUSTER, "start"], capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                unavailable("slurm/local-cluster.sh start took over 15 minutes")
            if p.returncode != 0:
                unavailable(f"slurm/local-cluster.sh start failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
            open(_started_marker(run_id), "w").close()
    return os.path.join(STATE, "slurm.conf")


def stop_if_started(run_id: str):
    if os.path.exists(_started_marker(run_id)):
        subprocess.run(["bash", CLUSTER, "stop"], capture_output=True, timeout=180)
        os.remove(_started_marker(run_id))


def squeue_states(job_id: str) -> list[str]:
    p = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return p.stdout.split() if p.returncode == 0 else []


def status(run) -> dict:
    try:
        with open(os.path.join(run, "run.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def logs(run) -> str:
    return "".join(open(p, errors="replace").read() for p in sorted(glob.glob(os.path.join(glob.escape(str(run)),
                                                                                              "slurm", "*.out"))))


def wait_for(predicate, timeout: float, what: str, job_id: str | None = None, run=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    detail = ""
    if job_id:
        detail += f"\nsqueue: {squeue_states(job_id)}"
        subprocess.run(["scancel", job_id], capture_output=True)
    if run is not None:
        detail += f"\nrun.json: {status(run)}\nlogs:\n{logs(run)[-4000:]}"
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{detail}")


def job_done(job_id: str, n: int = 1):
    states = squeue_states(job_id)
    return len(states) >= n and all(s in TERMINAL for s in states) and states


def last_job(run) -> str:
    return slurm.read_jobs(str(run))[-1]["job_id"]


def stop_twice_by_signal(run, job: str):
    """Cut a job's training into three sessions.  Its config holds each of the first two
    sessions after a set step until a stop signal comes (tests/hold_for_signal.py, with
    HPCJOBS_TEST_HOLD_AT="a,b" in the job's environment); each time the log says a session
    holds, USR1 to the batch shell (what Slurm sends before a time limit), then wait for the
    job to requeue itself.  No bet on the machine's speed: every session trains to its step
    and waits there for the signal, and the last one runs to the end."""
    for k in range(2):
        seen = logs(run).count("holding at step")
        wait_for(lambda: logs(run).count("holding at step") > seen or job_done(job), 600,
                 f"session {k + 1} to hold for its signal", job, run)
        assert not job_done(job), logs(run)[-4000:]
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, capture_output=True)
        wait_for(lambda: logs(run).count("requeueing job") > k or job_done(job), 300,
                 f"the job to requeue after stop {k + 1}", job, run)
