"""What a session costs against a job's time limit: the figures each session records in
run.json (``costs``), and the signal margin and slot length they call for.

A session records (``hpcjobs.train.session``), under ``sessions[i].costs``:

* ``startup_seconds``: from the process's start to the first compiled call done (imports,
  data, staging, the build, the restore and the first compile);
* ``first_call_seconds``: the first compiled call (its trace and compile);
* ``longest_call_seconds``: the longest call after it;
* ``save_seconds``: each checkpoint write, start to files fsync'ed (the figures
  ``Checkpoints.write_seconds`` measures for ``StopSignals``; not measured twice).

A stop needs, after Slurm's warning, the call in flight, the save and the process's exit:
``margin_needed`` = 1.5 x the slowest save + 2 x the longest call + ``SAFETY_SECONDS``
(the same shape as ``StopSignals``' in-job margin, with room for the batch shell's
forwarding, the run record's last write and the interpreter's exit).  With no session
measured, the save is estimated from the checkpoint's size and the file system's
measured write rate.  Nothing here imports TensorFlow.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass

SAFETY_SECONDS = 30  # the batch shell's forwarding, the last run.json write, the interpreter's exit
DEFAULT_MARGIN = 120  # slurm.signal_margin: auto, with nothing measured and nothing to estimate from
SLOW_SAVE_ENV = "HPCJOBS_TEST_SLOW_SAVE"  # test only: seconds each checkpoint write sleeps (train.checkpoint)


@dataclass(frozen=True)
class Costs:
    """A session's costs: measured (from run.json's sessions) or estimated (``source``)."""
    slowest_save: float  # seconds
    longest_call: float
    startup: float | None  # None: not known (no session measured)
    source: str  # "measured over N session(s)" or "estimated from ..."

    @property
    def margin(self) -> int:
        return margin_needed(self.slowest_save, self.longest_call)

    @property
    def fixed(self) -> float | None:
        """A session's fixed cost: start-up plus the stop at its end (None: start-up unknown)."""
        return None if self.startup is None else self.startup + self.margin


def margin_needed(slowest_save: float, longest_call: float) -> int:
    """The signal margin a stop needs: seconds, rounded up."""
    return int(math.ceil(1.5 * slowest_save + 2 * longest_call + SAFETY_SECONDS))


def measured(record: dict | None) -> Costs | None:
    """The costs run.json's sessions recorded (the worst of each figure), or None."""
    saves, calls, startups, n = [], [], [], 0
    for s in (record or {}).get("sessions") or []:
        c = s.get("costs") if isinstance(s, dict) else None
        if not isinstance(c, dict):
            continue
        n += 1
        saves += [float(x) for x in c.get("save_seconds") or [] if isinstance(x, (int, float))]
        for key, out in (("longest_call_seconds", calls), ("startup_seconds", startups)):
            v = c.get(key)
            if isinstance(v, (int, float)):
                out.append(float(v))
    if not n or not (saves or calls):
        return None
    return Costs(max(saves, default=0.0), max(calls, default=0.0), max(startups) if startups else None,
                 f"measured over {n} session(s)")


def estimated(checkpoint_bytes: int, write_rate: float, what: str = "") -> Costs:
    """A save estimated from the checkpoint's size and the file system's write rate (bytes/s)."""
    save = checkpoint_bytes / max(write_rate, 1.0)
    return Costs(save, 0.0, None, f"estimated from a {checkpoint_bytes / 1e6:.1f} MB checkpoint at "
                                  f"{write_rate / 1e6:.0f} MB/s{what}")


def checkpoint_bytes_on_disk(run_dir: str) -> int | None:
    """The size of the run's newest checkpoint (its ckpt-N.* files), or None."""
    folder = os.path.join(run_dir, "checkpoints")
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    steps = {}
    for name in names:
        if name.startswith("ckpt-") and (".data-" in name or name.endswith(".index")):
            step = name[5:].split(".", 1)[0]
            if step.isdigit():
                steps.setdefault(int(step), []).append(name)
    if not steps:
        return None
    newest = steps[max(steps)]
    return sum(os.path.getsize(os.path.join(folder, n)) for n in newest if os.path.isfile(os.path.join(folder, n)))


def existing_folder(path: str) -> str:
    """``path`` or its nearest existing ancestor (a run directory may not exist yet)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def write_rate(folder: str, nbytes: int = 16 << 20) -> float:
    """Bytes per second of a write of ``nbytes`` into ``folder``, fsync'ed (the file is removed)."""
    block = os.urandom(1 << 20)
    fd, path = tempfile.mkstemp(prefix=".hpcjobs-write-rate-", dir=folder)
    try:
        t = time.monotonic()
        for _ in range(max(1, nbytes >> 20)):
            os.write(fd, block)
        os.fsync(fd)
        seconds = time.monotonic() - t
    finally:
        os.close(fd)
        os.remove(path)
    return nbytes / max(seconds, 1e-6)


def for_run(run_dir: str, record: dict | None, checkpoint_bytes: int | None = None) -> Costs | None:
    """The run's measured costs; else an estimate from its checkpoint's size (given, or on
    disk) and this file system's write rate; else None."""
    found = measured(record)
    if found is not None:
        return found
    size = checkpoint_bytes or checkpoint_bytes_on_disk(run_dir)
    if not size:
        return None
    try:
        rate = write_rate(existing_folder(run_dir))
    except OSError:
        return None
    return estimated(size, rate)


def auto_margin(costs: Costs | None) -> int:
    """``slurm.signal_margin: auto``: what the costs call for, else DEFAULT_MARGIN."""
    return costs.margin if costs is not None else DEFAULT_MARGIN


def process_start_time() -> float | None:
    """This process's start as a Unix time (Linux's /proc), or None."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def format_seconds(s: float) -> str:
    s = int(math.ceil(s))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def time_findings(limit: float, margin: int, costs: Costs | None, auto: bool, key: str) -> list[tuple[str, str]]:
    """(level, message) pairs for a job of ``limit`` seconds and signal margin ``margin``:
    the margin against what a stop needs, the limit against a session's fixed cost.
    ``key``: the config key of the limit (slurm.time or slurm.slot)."""
    out = []
    if costs is None:
        return [("ok", f"signal_margin {margin} s; no session measured yet and no checkpoint to estimate a save "
                       "from (run hpcjobs doctor CONFIG for an estimate from the built model)")]
    need = costs.margin
    call = f"longest call {costs.longest_call:.1f} s" if costs.startup is not None else "no call measured"
    what = f"slowest save {costs.slowest_save:.1f} s, {call}, {SAFETY_SECONDS} s safety; {costs.source}"
    if need > margin and not auto:
        out.append(("warning", f"slurm.signal_margin {margin} s is short of what a stop needs ({what}): "
                               f"use signal_margin: {need} (or auto)"))
    else:
        out.append(("ok", f"signal_margin {margin} s covers a stop ({what})"))
    fixed = costs.fixed
    if fixed is not None:
        fixed = costs.startup + max(margin, need)
        suggest = int(math.ceil(4 * fixed / 60)) * 60  # three quarters of the slot trains
        if limit <= fixed:
            out.append(("blocker", f"{key} {format_seconds(limit)} is no longer than a session's fixed cost "
                                   f"({costs.startup:.0f} s start-up + {max(margin, need)} s stop): no step would "
                                   f"train; use {key}: {format_seconds(suggest)} or more"))
        elif limit < 2 * fixed:
            out.append(("warning", f"{key} {format_seconds(limit)}: more than half of each session is fixed cost "
                                   f"({costs.startup:.0f} s start-up + {max(margin, need)} s stop); use {key}: "
                                   f"{format_seconds(suggest)} or more"))
    return out
