"""A chain of time slots that renews itself (``hpcjobs submit --slot ... --at ...`` without
``--count``): ``submit`` queues the first slot only, and each slot whose training stops
with more to do (exit 75) submits the next one, the same script at the next ``--at`` /
``--every`` time, until the run is done.  A slot that finds the run finished submits
nothing; a slot that fails (exit 1) submits nothing either and says so in run.json
(``chain``); a cancelled run (``hpcjobs cancel``, RUN/CANCELLED) is not renewed.

The job script calls it in its batch shell (slurm/_job_body.sh)::

    python -m hpcjobs.slurm.chain renew RUN JOB    # exit 0: the next slot is queued (or none is due)
    python -m hpcjobs.slurm.chain failed RUN JOB RC
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
import time

from ..errors import EX_FAILURE, EX_USAGE, UserError
from ..rundir import RunDir, cancelled
from .jobs import _record, read_jobs
from .options import next_begin
from .render import _package


def _slots(run_dir: str) -> list[dict]:
    return [j for j in read_jobs(run_dir) if j.get("slot")]


def _this_slot(run_dir: str, job_id: str) -> dict:
    slots = _slots(run_dir)
    if not slots:
        raise UserError(f"{os.path.join(run_dir, 'slurm', 'jobs.json')}: no slot of a chain recorded")
    return next((j for j in slots if str(j.get("job_id")) == str(job_id)), slots[-1])


def _sbatch_env():
    """The environment sbatch runs in: this job's own SLURM_* variables left out (sbatch would
    take some of them as options of the new job); SLURM_CONF kept."""
    for k in [k for k in os.environ if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del os.environ[k]


def renew(run_dir: str, job_id: str, now: _dt.datetime | None = None) -> str | None:
    """Submit the slot after job ``job_id``'s; its job id, or None when none is due."""
    rd = RunDir(run_dir)
    if cancelled(run_dir):
        print(f"{run_dir} was cancelled (hpcjobs cancel): no next slot")
        return None
    if rd.read_record().finished:
        print(f"{run_dir} is finished: no next slot")
        return None
    this = _this_slot(run_dir, job_id)
    later = [j for j in _slots(run_dir) if int(j["slot"]) > int(this["slot"])]
    if later:  # submitted already (a fixed chain, or this slot ran twice)
        print(f"slot {later[0]['slot']} is queued already: job {later[0]['job_id']}")
        return None
    now = now or _dt.datetime.now().replace(microsecond=0)
    begin = next_begin(_dt.datetime.fromisoformat(this["begin"]), int(this["every"]), now)
    extra = [f"--begin={begin.isoformat()}"]
    _sbatch_env()
    new = _package()._sbatch(this["script"], extra)
    slot = int(this["slot"]) + 1
    log = this.get("log", "").replace(f"-{this['job_id']}.out", f"-{new}.out")
    _record(run_dir, dict(job_id=new, kind=this.get("kind", "train"), script=this["script"], log=log,
                          sbatch_args=extra, submitted=time.time(), slot=slot, begin=begin.isoformat(),
                          every=this["every"], renews=True))
    rd.update_record(chain=dict(slots=slot, last_job=str(job_id), next_job=new, next_begin=begin.isoformat()))
    print(f"submitted slot {slot} of the chain: job {new}, from {begin.isoformat()}\n  log: {log}")
    return new


def failed(run_dir: str, job_id: str, rc: int):
    """A slot failed: the chain ends; run.json says so."""
    this = _this_slot(run_dir, job_id)
    why = f"slot {this['slot']} (job {job_id}) failed with exit {rc}: no next slot; fix the cause and submit again"
    RunDir(run_dir).update_record(chain=dict(slots=int(this["slot"]), last_job=str(job_id), next_job=None,
                                             ended=why))
    print(why)


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 3 and argv[0] == "renew":
            renew(argv[1], argv[2])
            return 0
        if len(argv) == 4 and argv[0] == "failed":
            failed(argv[1], argv[2], int(argv[3]))
            return 0
    except UserError as e:
        print(f"hpcjobs: error: {e}", file=sys.stderr)
        return EX_FAILURE
    print("usage: python -m hpcjobs.slurm.chain renew RUN JOB | failed RUN JOB RC", file=sys.stderr)
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
