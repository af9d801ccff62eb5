"""Jobs: hand a script to sbatch, keep the record in ``RUN/slurm/jobs.json``, and report
each recorded job's state from squeue (else sacct)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Optional

from ..rundir import atomic_write
from .render import _error


# --------------------------------------------------------------------------- sbatch
def _sbatch_binary() -> str:
    path = shutil.which("sbatch")
    if not path:
        raise _error("sbatch", "not found on PATH: run this on a Slurm login node (or load its module), or for "
                               "tests start slurm/local-cluster.sh start and export SLURM_CONF as it says")
    return path


def _sbatch(script: str, extra: list[str] = ()) -> str:
    """Submit ``script`` (with ``extra`` sbatch options); returns the job id."""
    cmd = [_sbatch_binary(), "--parsable", *extra, script]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise _error("sbatch", "did not answer within 120 s (is slurmctld reachable?)") from None
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        raise _error("sbatch", msg)
    return p.stdout.strip().splitlines()[-1].split(";")[0]


# --------------------------------------------------------------------------- records
def _record(run_dir: str, entry: dict):
    path = os.path.join(run_dir, "slurm", "jobs.json")
    jobs = read_jobs(run_dir)
    jobs.append(entry)
    atomic_write(path, json.dumps(jobs, indent=2) + "\n", fsync=False)


def read_jobs(run_dir: str) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "slurm", "jobs.json"), encoding="utf-8") as f:
            jobs = json.load(f)
        return jobs if isinstance(jobs, list) else []
    except (OSError, json.JSONDecodeError):
        return []


# --------------------------------------------------------------------------- job states
def _run(cmd: list[str]) -> Optional[subprocess.CompletedProcess]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None


def job_states(run_dir: str) -> list[str]:
    """One line per job recorded in RUN/slurm/jobs.json: id, kind, state (from squeue, else sacct)."""
    jobs = read_jobs(run_dir)
    lines = []
    for job in jobs:
        job_id = str(job.get("job_id", "?"))
        kind = job.get("kind", "?")
        states = _squeue_states(job_id)
        if not states:
            states = _sacct_states(job_id)
        if states:
            lines.append(f"job {job_id} ({kind}): " + ", ".join(states))
        else:
            lines.append(f"job {job_id} ({kind}): unknown (no longer in squeue; no accounting)"
                         if shutil.which("squeue") else f"job {job_id} ({kind}): unknown (no Slurm commands here)")
    return lines


def _query_rows(cmd: list[str], fields: int) -> list[list[str]]:
    """The ``|``-separated rows a Slurm query prints; none if the command is missing or fails."""
    if not shutil.which(cmd[0]):
        return []
    p = _run(cmd)
    if p is None or p.returncode != 0:
        return []
    return [(line.split("|") + [""] * fields)[:fields] for line in p.stdout.strip().splitlines()]


def _squeue_states(job_id: str) -> list[str]:
    out = []
    for jid, state, elapsed, limit, where, reason in _query_rows(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i|%T|%M|%l|%R|%r"], 6):
        detail = f"{state} {elapsed}/{limit}"
        if state == "RUNNING":
            detail += f" on {where}"
        elif reason and reason not in ("None", "(null)"):
            detail += f" ({reason})"
        out.append(detail if jid == job_id else f"{jid} {detail}")
    return out


def _sacct_states(job_id: str) -> list[str]:
    out = []
    for jid, state, elapsed, code in _query_rows(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,Elapsed,ExitCode"], 4):
        detail = f"{state} {elapsed} exit {code}"
        out.append(detail if jid == job_id else f"{jid} {detail}")
    return out
