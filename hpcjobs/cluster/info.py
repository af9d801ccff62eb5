"""The launcher's environment, read in one place, into a frozen ClusterInfo.

Nothing else in hpcjobs reads SLURM_*, OMPI_*, TF_CONFIG or CUDA_VISIBLE_DEVICES,
nor the CPU affinity mask.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Mapping, Optional

from ..errors import UserError


class ClusterError(UserError, RuntimeError):
    """The launch environment is inconsistent; the message names the fix (exit code 2)."""


@dataclass(frozen=True)
class ClusterInfo:
    launcher: str = "local"  # local | slurm | mpi | tf_config
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node_rank: int = 0
    nodes: tuple[str, ...] = ()
    gpus_per_node: int = 0
    job_id: Optional[str] = None
    array_job_id: Optional[str] = None
    array_task_id: Optional[int] = None
    array_task_count: Optional[int] = None
    job_end_time: Optional[float] = None  # unix time at which the job's limit is reached
    restart_count: int = 0
    tf_config: Optional[dict] = None
    cpus: int = 1  # CPUs this process should use (SLURM_CPUS_PER_TASK, the affinity mask)
    node: str = ""  # this process's node: Slurm's name for it (SLURMD_NODENAME), else the host name
    # whether output may reach a terminal: not in a Slurm batch job, whose log is a file even
    # where the launcher hands the ranks a pty (Open MPI's mpirun does); srun --pty is a terminal
    terminal: bool = True
    # node-local scratch for staging (data.stage: auto): $SLURM_TMPDIR, else $TMPDIR
    scratch: Optional[str] = None

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def in_slurm_job(self) -> bool:
        return self.job_id is not None


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list: ``node[1-3,7],gpu05`` -> node1 node2 node3 node7 gpu05."""
    hosts, depth, part = [], 0, ""
    pieces = []
    for ch in text:
        if ch == "," and depth == 0:
            pieces.append(part)
            part = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        part += ch
    if part:
        pieces.append(part)
    for piece in pieces:
        m = re.fullmatch(r"(.*?)\[([^\]]+)\](.*)", piece)
        if not m:
            hosts.append(piece)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> Optional[int]:
    v = env.get(key)
    if v is None or v == "":
        return default
    m = re.match(r"\d+", v)
    return int(m.group()) if m else default


def _gpus(env: Mapping[str, str]) -> int:
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() not in ("", "-1", "NoDevFiles")])
    return _int(env, "SLURM_GPUS_ON_NODE", 0) or 0


def _tasks_on_node(text: str, node: int) -> int:
    """Slurm's tasks-per-node list, e.g. ``2(x3),1``, for one node."""
    counts = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if node < len(counts) else 1


def _job_end_time(env: Mapping[str, str], job_id: str) -> Optional[float]:
    end = env.get("SLURM_JOB_END_TIME")
    if end and end.isdigit():
        return float(end)
    if env.get("HPCJOBS_NO_SQUEUE"):
        return None
    try:  # Slurm before 23.02 does not export SLURM_JOB_END_TIME
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        return time.mktime(time.strptime(out.splitlines()[0], "%Y-%m-%dT%H:%M:%S"))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def cpu_count(env: Mapping[str, str] | None = None) -> int:
    """CPUs this process should use: Slurm's ``SLURM_CPUS_PER_TASK`` where it is set, never
    more than the affinity mask allows (a task bound to fewer CPUs than it asked for);
    the affinity mask alone otherwise.  Not the node's core count."""
    env = os.environ if env is None else env
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (not Linux)
        allowed = os.cpu_count() or 1
    per_task = _int(env, "SLURM_CPUS_PER_TASK")
    return max(1, min(per_task, allowed) if per_task else allowed)


def detect(env: Mapping[str, str] | None = None) -> ClusterInfo:
    """Describe how this process was launched."""
    env = os.environ if env is None else env
    return replace(_detect(env), cpus=cpu_count(env), node=env.get("SLURMD_NODENAME") or os.uname().nodename,
                   terminal="SLURM_JOB_ID" not in env or "SLURM_PTY_PORT" in env,
                   scratch=env.get("SLURM_TMPDIR") or env.get("TMPDIR") or None)


def _detect(env: Mapping[str, str]) -> ClusterInfo:
    gpus = _gpus(env)
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        rank = _int(env, "OMPI_COMM_WORLD_RANK", _int(env, "PMIX_RANK", _int(env, "PMI_RANK", 0)))
        size = _int(env, "OMPI_COMM_WORLD_SIZE", _int(env, "PMI_SIZE", 1))
        info = ClusterInfo(launcher="mpi", rank=rank, world_size=size,
                           local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                           local_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1),
                           node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", 0) or 0, gpus_per_node=gpus)
        return _with_slurm_job(info, env)
    if "TF_CONFIG" in env:
        try:
            tf_config = json.loads(env["TF_CONFIG"])
            workers = tf_config["cluster"]["worker"]
            task = tf_config["task"]
            rank = int(task["index"]) if task.get("type", "worker") == "worker" else 0
        except (ValueError, KeyError, TypeError) as e:
            raise ClusterError(f"TF_CONFIG: not a valid multi-worker description ({e})") from None
        info = ClusterInfo(launcher="tf_config", rank=rank, world_size=len(workers),
                           nodes=tuple(w.rsplit(":", 1)[0] for w in workers), gpus_per_node=gpus,
                           tf_config=tf_config)
        return _with_slurm_job(info, env)
    if "SLURM_JOB_ID" in env:
        nnodes = _int(env, "SLURM_JOB_NUM_NODES", 1)
        if "SLURM_STEP_ID" not in env and "SLURM_PROCID" not in env and nnodes > 1:
            raise ClusterError(f"this is a {nnodes}-node Slurm job but the process was not started by srun: "
                               "launch with srun (e.g. `srun hpcjobs train ...`)")
        in_step = "SLURM_STEP_ID" in env
        ntasks = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1)) if in_step else 1
        info = ClusterInfo(
            launcher="slurm", rank=_int(env, "SLURM_PROCID", 0) if in_step else 0, world_size=ntasks,
            local_rank=_int(env, "SLURM_LOCALID", 0) if in_step else 0,
            local_size=_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1"),
                                      _int(env, "SLURM_NODEID", 0)) if in_step else 1,
            node_rank=_int(env, "SLURM_NODEID", 0) if in_step else 0,
            nodes=tuple(expand_hostlist(env.get("SLURM_STEP_NODELIST" if in_step else "SLURM_JOB_NODELIST",
                                                env.get("SLURM_JOB_NODELIST", "")))),
            gpus_per_node=gpus)
        return _with_slurm_job(info, env)
    return ClusterInfo(gpus_per_node=gpus)


def _with_slurm_job(info: ClusterInfo, env: Mapping[str, str]) -> ClusterInfo:
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return info
    return replace(info, job_id=job_id, array_job_id=env.get("SLURM_ARRAY_JOB_ID"),
                   array_task_id=_int(env, "SLURM_ARRAY_TASK_ID"),
                   array_task_count=_int(env, "SLURM_ARRAY_TASK_COUNT"),
                   restart_count=_int(env, "SLURM_RESTART_COUNT", 0) or 0,
                   job_end_time=_job_end_time(env, job_id))


def split_gpus(n: int, env: Mapping[str, str] | None = None) -> list[dict]:
    """Environment additions giving each of ``n`` child processes its own share of this
    process's GPUs (``CUDA_VISIBLE_DEVICES``), e.g. the packed workers of a search task;
    ``n`` empty dicts where there are no GPUs."""
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in cvd.split(",") if d.strip() not in ("", "-1", "NoDevFiles")] if cvd is not None \
        else [str(i) for i in range(_gpus(env))]
    if not ids:
        return [{} for _ in range(n)]
    return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i::n]) or "-1"} for i in range(n)]
