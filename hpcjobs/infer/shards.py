"""Shards: shard i of n takes the contiguous rows ``[i*N//n, (i+1)*N//n)``.

The shard comes from ``--shard i/n``, else from the Slurm array (``SLURM_ARRAY_TASK_ID``
of ``SLURM_ARRAY_TASK_COUNT``, ids from 0), else from the MPI (or srun) rank, else it is
0/1.  All of it is read through ``hpcjobs.cluster.detect()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import units
from .errors import InferError


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def rows(self, n: int) -> tuple[int, int]:
        """The contiguous rows [lo, hi) of this shard among n."""
        return self.index * n // self.count, (self.index + 1) * n // self.count

    @property
    def tag(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    try:
        return Shard(*units.parse_shard(text))
    except ValueError:
        raise InferError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 3/8") from None


def choose_shard(explicit: Optional[str], info) -> tuple[Shard, str]:
    """This process's shard: --shard, else the Slurm array task, else the MPI (or srun) rank."""
    ranks = info.world_size > 1  # srun, mpirun or TF_CONFIG started several processes
    if explicit:
        if ranks:
            raise InferError(f"--shard {explicit} with {info.world_size} launched processes: every process "
                             "would run the same shard; drop --shard (the ranks shard the input themselves)")
        return parse_shard(explicit), "--shard"
    if info.array_task_count and info.array_task_count > 1:
        if ranks:
            raise InferError(f"{info.world_size} processes in each task of a Slurm array: run one process per "
                             "array task, or give up the array and let the ranks shard the input")
        task, count = info.array_task_id, info.array_task_count
        if task is None or not 0 <= task < count:
            raise InferError(f"SLURM_ARRAY_TASK_ID {task} is outside 0..{count - 1}: submit the array as "
                             f"--array=0-{count - 1}, or give --shard i/n")
        return Shard(task, count), f"Slurm array task {task} of {count}"
    if ranks:
        return Shard(info.rank, info.world_size), f"{info.launcher} rank {info.rank} of {info.world_size}"
    return Shard(), "unsharded"
