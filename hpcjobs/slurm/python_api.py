"""The Python API: :func:`submit` queues training through submitit, running it in the job's
own Python process (:class:`TrainCall`), with the same validation as ``hpcjobs submit``.

(Not named ``submitit.py``: a module of that name in this package would be easy to
mistake for, and in relative imports to shadow, the real ``submitit``.)
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import time

import submitit.helpers

from .. import compat
from ..config import SlurmConfig, dump, to_dict
from ..errors import EX_TEMPFAIL
from ..rundir import RunDir, atomic_write
from ..units import format_slurm_mem, slurm_seconds
from .options import slurm_section
from .jobs import _record, _sbatch_binary
from .render import _error, _option, _setup_lines, render, template_params


class TrainCall(submitit.helpers.Checkpointable):
    """A checkpointable training callable for submitit; runs ``train`` in the job's process.

    Near the time limit submitit's signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)
    is turned into USR1 for the training loop, which finishes its compiled call, checkpoints
    and returns 75; then submitit's own handler checkpoints this callable (``checkpoint``
    returns a DelayedSubmission of the same call) and requeues the job, whose next run
    resumes from the run directory's checkpoint.
    """

    def __init__(self, config: dict, run_dir: str):
        self.config = config
        self.run_dir = run_dir

    def __call__(self) -> int:
        from ..config import from_dict
        from ..train import train

        cfg = from_dict(self.config, "<submitted config>")
        usr_sig, saved = compat.submitit_signal()
        if usr_sig is not None and usr_sig != signal.SIGUSR1:
            signal.signal(usr_sig, lambda signum, frame: os.kill(os.getpid(), signal.SIGUSR1))
        try:
            rc = train(cfg, self.run_dir)
        finally:
            if usr_sig is not None and usr_sig != signal.SIGUSR1:
                signal.signal(usr_sig, saved)
        if rc == EX_TEMPFAIL and getattr(saved, "__func__", None) is compat.submitit_requeue_handler():
            # submitit's own handler: checkpoint this call (see checkpoint()), requeue the job, exit
            saved(usr_sig, None)
        return rc

    def checkpoint(self, *args, **kwargs):
        """Requeue the same call: the training resumes from the run directory's checkpoint."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _executor_parameters(s: SlurmConfig, params: dict) -> dict:
    """submitit's ``update_parameters`` keywords for the slurm section ``s``."""
    additional = {}
    for extra in s.extra_sbatch:
        opt, value = _option(extra)
        if not opt.startswith("--"):
            raise _error("extra_sbatch", f"{extra!r}: use the long option form with submitit")
        additional[opt[2:].replace("-", "_")] = True if value is None else value
    setup = [line for line in _setup_lines(s).splitlines() if not line.startswith("#")]
    kw = dict(name=params["job_name"], nodes=s.nodes, tasks_per_node=params["ntasks_per_node"],
              timeout_min=max(1, int(-(-slurm_seconds(s.time) // 60))), slurm_signal_delay_s=params["signal_margin"],
              slurm_setup=setup, slurm_additional_parameters=additional)
    for name in ("partition", "account", "qos"):
        if getattr(s, name):
            kw[f"slurm_{name}"] = getattr(s, name)
    if s.mem:
        kw["slurm_mem"] = format_slurm_mem(s.mem)
    if s.gpus_per_node:
        kw["gpus_per_node"] = s.gpus_per_node
    if s.cpus_per_task:
        kw["cpus_per_task"] = s.cpus_per_task
    return kw


def submit(config, run_dir: str, **slurm_overrides):
    """Submit training through submitit; returns the submitit Job.

    ``config`` is a Config or a path; ``slurm_overrides`` are SlurmConfig fields.  The job
    runs ``hpcjobs.train.train`` in-process on every task (one per node, or per GPU with
    Horovod), resumes from the run directory's checkpoint, and is requeued on a timeout.
    """
    import submitit

    from .. import config as config_mod

    cfg = config_mod.load(config) if isinstance(config, (str, os.PathLike)) else config
    unknown = sorted(set(slurm_overrides) - {f.name for f in dataclasses.fields(SlurmConfig)})
    if unknown:
        raise _error(unknown[0], "unknown slurm setting; valid: "
                     + ", ".join(f.name for f in dataclasses.fields(SlurmConfig)))
    s = slurm_section(cfg, slurm_overrides)
    if s.launcher != "srun":
        raise _error("slurm.launcher", f"{s.launcher}: submitit starts its tasks with srun; "
                     "`hpcjobs submit` renders an mpirun job")
    cfg = dataclasses.replace(cfg, slurm=s)
    run_dir = os.path.abspath(run_dir)
    params = template_params(cfg, s, "train", run_dir, os.path.join(run_dir, "config.yaml"))
    render("train", **params)  # the same validation as hpcjobs submit
    _sbatch_binary()
    RunDir(run_dir).claim()  # new, empty or hpcjobs' own, as for hpcjobs submit
    folder = os.path.join(run_dir, "slurm", "submitit")
    os.makedirs(folder, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=s.max_requeues,
                                     slurm_python=shlex.quote(s.python or sys.executable))
    executor.update_parameters(**_executor_parameters(s, params))
    atomic_write(os.path.join(run_dir, "config.yaml"), dump(cfg), fsync=False)
    job = executor.submit(TrainCall(to_dict(cfg), run_dir))
    _record(run_dir, dict(job_id=str(job.job_id), kind="submitit", script=None,
                          log=str(job.paths.stdout), sbatch_args=[], submitted=time.time()))
    return job
