"""Slurm: render the job templates, submit them, requeue, and report job states.

* :mod:`.render`: the templates in ``slurm/*.sbatch`` are data, filled by one function,
  :func:`render`, which validates and quotes every value (``template_params`` and
  ``trials`` turn a config into its parameters).
* :mod:`.options`: ``SlurmConfig``'s fields as flags, and the section with them on top.
* :mod:`.command`: ``hpcjobs submit CONFIG`` (the CLI's table imports it); it writes the script and the resolved config into ``RUN/`` and ``RUN/slurm/``,
  calls sbatch and records the job.
* :mod:`.jobs`: sbatch, the record ``RUN/slurm/jobs.json``, and :func:`job_states` from
  squeue or sacct.
* :mod:`.python_api`: :func:`submit`, the Python API, built on submitit.

``read_template`` and ``_sbatch`` are called through this package, so replacing them here
(``monkeypatch.setattr(hpcjobs.slurm, "_sbatch", ...)``) reaches every caller.
"""
from .render import (SRUN_WAIT, TEMPLATE_DIR, TEMPLATES, read_template, render, slurm_arguments, template_params,
                     trials)
from .jobs import _sbatch, _sbatch_binary, job_states, read_jobs
from .options import slot_begins, slurm_section
from .python_api import TrainCall, submit

__all__ = ["SRUN_WAIT", "TEMPLATE_DIR", "TEMPLATES", "TrainCall", "job_states",
           "read_jobs", "read_template", "render", "slot_begins", "slurm_arguments", "slurm_section", "submit",
           "template_params", "trials"]
