"""SlurmConfig and the command line: one flag per field (``FLAGS``), the section with the
flags on top (``slurm_section``), and the start times of a chain of slots.  Used by
``hpcjobs submit`` and by the Python API (``python_api.submit``) alike.

The flags are made from the fields themselves: a field ``ntasks_per_node`` is
``--ntasks-per-node``, an int field takes ``type=int`` and a tuple field is repeatable;
``_FLAG_DOC`` only adds what a field cannot say (another flag name, a metavar, the help line).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import typing

from ..config import Config, SlurmConfig
from ..units import slurm_seconds
from .render import _error
from .search_array import SECTION

# --------------------------------------------------------------------------- flags
_FLAG_DOC = {  # SlurmConfig field: (flag, when not --<field-with-dashes>; metavar; help)
    "partition": (None, "NAME", None),
    "account": (None, "NAME", None),
    "qos": (None, "NAME", None),
    "mem": (None, "SIZE", "memory per node, e.g. 64G"),
    "time": (None, "TIME", "time limit, e.g. 04:00:00 or 2-00:00:00"),
    "job_name": (None, "NAME", None),
    "modules": ("--module", "MODULE", "module to load"),
    "activate": (None, "PATH", "environment to activate: venv activate script or conda env"),
    "extra_sbatch": ("--sbatch", "OPTION", "extra #SBATCH option, e.g. --constraint=v100"),
    "signal_margin": (None, "SECONDS|auto", "USR1 this long before the time limit; auto: what the run's "
                                            "measured sessions need"),
    "python": (None, "PATH", "interpreter for the job (default: this one)"),
    "srun_args": ("--srun-arg", "OPTION", "extra srun option"),
    "launcher": (None, "srun|mpirun", "start the tasks with srun (default) or Open MPI's mpirun"),
    "mpirun_args": ("--mpirun-arg", "OPTION", "extra mpirun option (--launcher mpirun)"),
    "array": (None, "N", "job array of N tasks (training: N seeds)"),
    "array_parallel": ("--parallel", "N", "at most N array tasks at once"),
    "search": (None, "KEY=V1,V2", "grid search over a config key, as a job array"),
    "slot": (None, "TIME", "submit a chain of jobs, each with this --time"),
    "slot_every": ("--every", "PERIOD", "slot period: day, week or a duration (default day)"),
    "slot_at": ("--at", "HH:MM", "time of day of the first slot"),
    "slot_count": ("--count", "N", "at most N slots, all queued now (default: each slot submits the next until the run is done)"),
    "trials_per_node": ("--trials-per-node", "K", "--search: K search workers per array task, one GPU each"),
}
_CONFIG_ONLY = ("infer_partition", "infer_time", "prepare_partition", "prepare_time")  # set in the config's slurm section only


def _margin(text: str):
    """--signal-margin: seconds, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r}: seconds or auto") from None


def _flag_table() -> list[tuple[str, str, dict]]:
    """(flag, SlurmConfig field, argparse keywords) for every field not in _CONFIG_ONLY."""
    hints = typing.get_type_hints(SlurmConfig)
    rows = []
    for f in dataclasses.fields(SlurmConfig):
        if f.name in _CONFIG_ONLY:
            continue
        flag, metavar, help_ = _FLAG_DOC.get(f.name, (None, None, None))
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        kw: dict = {"metavar": metavar or ("N" if kind is int else "VALUE")}
        if typing.get_origin(kind) is tuple:
            kw["action"] = "append"
            help_ = f"{help_} (repeatable)" if help_ else "repeatable"
        elif kind is int:
            kw["type"] = int
        if f.name == "signal_margin":
            kw["type"] = _margin
        if f.name == "search":  # a bare --search: the config's search: section (hpcjobs.slurm.search_array)
            kw.update(nargs="?", const=SECTION)
            help_ = "the config's search: section as an array of search workers; or KEY=V1,V2: a grid (repeatable)"
        if help_:
            kw["help"] = help_
        rows.append((flag or "--" + f.name.replace("_", "-"), f.name, kw))
    return rows


FLAGS = _flag_table()


def slurm_section(cfg: Config, overrides: dict) -> SlurmConfig:
    """The config's slurm section with command-line values (not None) on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    for k in ("modules", "extra_sbatch", "srun_args", "mpirun_args", "search"):
        if k in given:
            given[k] = tuple(given[k])
    if given.get("slot") is not None:
        given["time"] = given["slot"]
    try:
        s = dataclasses.replace(cfg.slurm, **given)
    except ValueError as e:
        name, _, msg = str(e).partition(": ")
        flag = next((f for f, field_name, _ in FLAGS if field_name == name), None) if name in given else None
        flag = flag or f"slurm.{name}"
        raise _error(flag, msg or str(e)) from None
    if s.slot is not None and s.time != s.slot:
        s = dataclasses.replace(s, time=s.slot)
    return s


def slot_period(s: SlurmConfig) -> int:
    """Seconds from one slot's start to the next (``slot_every``)."""
    return {"day": 86400, "week": 7 * 86400}.get(s.slot_every) or int(slurm_seconds(s.slot_every))


def slot_begins(s: SlurmConfig, now: _dt.datetime | None = None) -> list[_dt.datetime]:
    """Start times of a chain of slots: the next ``slot_at``, then every ``slot_every``;
    ``slot_count`` of them, or only the first when the chain renews itself (no count)."""
    if not s.slot_at:
        raise _error("--at", "a chain of slots needs the first slot's time of day, e.g. --at 22:00")
    now = now or _dt.datetime.now().replace(microsecond=0)
    parts = [int(p) for p in s.slot_at.strip().split(":")]
    first = now.replace(hour=parts[0], minute=parts[1], second=parts[2] if len(parts) > 2 else 0)
    if first <= now:
        first += _dt.timedelta(days=1)
    step = slot_period(s)
    return [first + _dt.timedelta(seconds=step * i) for i in range(s.slot_count or 1)]


def next_begin(anchor: _dt.datetime, period: int, now: _dt.datetime) -> _dt.datetime:
    """The first start of the schedule ``anchor + k * period`` (k >= 1) that is after ``now``."""
    k = max(1, int((now - anchor).total_seconds() // period) + 1)
    return anchor + _dt.timedelta(seconds=period * k)
