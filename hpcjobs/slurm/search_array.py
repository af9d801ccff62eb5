"""``hpcjobs submit CONFIG --search`` (bare: the config's ``search:`` section; or ``--search
KEY=V1,V2`` flags: a grid over those values) as a job array of search workers
(``slurm/trials.sbatch``).

Each array task runs ``hpcjobs search CONFIG --workers K`` (K = ``--trials-per-node``, one
GPU each), which pulls trials until the budget is spent and no trial is left running
(:mod:`hpcjobs.search.worker`).  The number of tasks is ``--array N`` if given, else one
per K trials; since tasks pull, any number of them finishes the same search.  It must
stay within the cluster's ``MaxArraySize`` (``scontrol show config``): a number that
came from the trials is lowered to it, a ``--array`` over it is refused in one line.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from typing import Optional

from ..config import Config, SlurmConfig
from .render import _error, template_params

SECTION = "@search-section"  # what a bare --search stands for in the parsed flags


def max_array_size() -> Optional[int]:
    """The cluster's MaxArraySize (array indices must be below it), or None without Slurm."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        out = subprocess.run([scontrol, "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else None


def tasks(cfg: Config, s: SlurmConfig, limit: Optional[int]) -> tuple[int, Optional[str]]:
    """(array tasks, a note to print or None)."""
    from ..search.space import total_trials

    k = s.trials_per_node
    if s.array:
        if limit is not None and s.array > limit:
            raise _error("--array", f"{s.array} tasks: over the cluster's MaxArraySize ({limit}); give at most "
                                    f"{limit} (each task pulls trials, so fewer tasks finish the same search)")
        return s.array, None
    n = math.ceil(total_trials(cfg.search) / k)
    if limit is not None and n > limit:
        return limit, f"note: {n} tasks would pass the cluster's MaxArraySize ({limit}): {limit} tasks pull the trials"
    return n, None


def grid_from_flags(cfg: Config, s: SlurmConfig, where: str) -> Config:
    """``--search KEY=V1,V2`` (repeatable): the config's ``search:`` section as a grid over
    those values (its other settings, such as metric, epochs and pruning, kept), run by the
    same pulling workers as a bare ``--search``.  Each value is read as ``--set`` reads one."""
    from ..config import from_dict, to_dict
    from ..config import parse_override

    space = {}
    for entry in s.search:
        key, _, values = entry.partition("=")
        space[key.strip()] = {"choice": [parse_override(f"{key}={v.strip()}")[1]
                                         for v in values.split(",") if v.strip()]}
    d = to_dict(cfg)
    d["search"] = dict(d["search"], method="grid", trials=None, space=space)
    d["slurm"]["search"] = []
    return from_dict(d, where)


def check(cfg: Config, s: SlurmConfig, where: str, run_dir: str):
    from ..search.space import centre_lr, check_space

    check_space(centre_lr(cfg, run_dir, where) if cfg.search.lr_center else cfg, where)
    if s.nodes != 1:
        raise _error("--nodes", "a search worker trains on one node: pack trials with --trials-per-node instead")
    if s.gpus_per_node and s.gpus_per_node != s.trials_per_node:
        raise _error("--trials-per-node", f"one GPU per trial: --gpus-per-node ({s.gpus_per_node}) must equal "
                                          f"--trials-per-node ({s.trials_per_node})")
    if s.ntasks_per_node not in (None, 1):
        raise _error("--ntasks-per-node", "a search task is one process (it starts its --trials-per-node workers)")


def params(cfg: Config, s: SlurmConfig, run_dir: str, config_path: str) -> tuple[dict, Optional[str]]:
    """render('trials', ...) parameters, and a note about the task count."""
    p = template_params(cfg, s, "train", run_dir, config_path)
    p.pop("on_stop", None)
    n, note = tasks(cfg, s, max_array_size())
    p.update(ntasks_per_node=1, array=n, array_parallel=s.array_parallel, workers=s.trials_per_node,
             job_name=s.job_name or f"{cfg.name}-search")
    return p, note
