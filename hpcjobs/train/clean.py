"""``hpcjobs clean [RUN|DIR] [--dry-run]``: free the space of finished runs.

A finished run keeps ``checkpoint.max_to_keep`` full checkpoints and the best epoch's
weights.  ``clean`` keeps what the run still needs: its export, the best epoch's weights
(``checkpoints/best/epoch-N.weights.h5``, N = run.json's ``best_epoch``) and the last
checkpoint (the one ``checkpoints/checkpoint`` names, which export, evaluation and a
longer training read); it removes the older checkpoints, other epochs' weights and the
temporary files a killed save left.  Every run under DIR is looked at (a search's trials
and a K-fold run's folds too); only a finished one is touched, and only while no process
holds its lock: a running or stopped run is left as it is.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re

from ..errors import UserError
from ..rundir import RunDir, atomic_write, find_runs, format_size

_CKPT = re.compile(r"^(ckpt-\d+)\.(index|data-\d+-of-\d+)$")


def _latest(checkpoints: str) -> str | None:
    try:
        with open(os.path.join(checkpoints, "checkpoint"), encoding="utf-8") as f:
            m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', f.read(), re.M)
    except OSError:
        return None
    return os.path.basename(m.group(1)) if m else None


def removable(run_dir: str) -> tuple[list[str], str | None]:
    """The files ``clean`` would remove from one run, and why it would remove none (or None)."""
    record = RunDir(run_dir).read_record()
    if not record.finished:
        return [], f"{record.status or 'not started'}, not finished"
    checkpoints = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(checkpoints):
        return [], None
    latest = _latest(checkpoints)
    if latest is None:
        return [], "no checkpoints/checkpoint naming the last checkpoint"
    out = []
    for name in sorted(os.listdir(checkpoints)):
        m = _CKPT.match(name)
        if (m and m.group(1) != latest) or name.startswith(".tmp-"):
            out.append(os.path.join(checkpoints, name))
    best_dir = os.path.join(checkpoints, "best")
    keep = f"epoch-{record.best_epoch:05d}.weights.h5" if isinstance(record.best_epoch, int) else None
    if os.path.isdir(best_dir):
        for name in sorted(os.listdir(best_dir)):
            if (name.endswith(".weights.h5") and keep is not None and name != keep) or name.startswith(".tmp-"):
                out.append(os.path.join(best_dir, name))
    return [p for p in out if os.path.isfile(p) and not os.path.islink(p)], None


@contextlib.contextmanager
def _unless_in_use(run_dir: str):
    """The run's lock, taken without waiting; None when a process holds it (a training)."""
    path = os.path.join(run_dir, ".lock")
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                yield False
                return
            raise
        yield True
    finally:
        os.close(fd)


def _rewrite_state(checkpoints: str, latest: str):
    """``checkpoints/checkpoint`` naming the last checkpoint only (the others are gone)."""
    path = os.path.join(checkpoints, "checkpoint")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stamps = dict(zip(re.findall(r'^all_model_checkpoint_paths:\s*"([^"]+)"', text, re.M),
                      re.findall(r"^all_model_checkpoint_timestamps:\s*(\S+)", text, re.M)))
    last = re.search(r"^last_preserved_timestamp:\s*(\S+)", text, re.M)
    lines = [f'model_checkpoint_path: "{latest}"', f'all_model_checkpoint_paths: "{latest}"']
    if latest in stamps:
        lines.append(f"all_model_checkpoint_timestamps: {stamps[latest]}")
    if last:
        lines.append(f"last_preserved_timestamp: {last.group(1)}")
    atomic_write(path, "\n".join(lines) + "\n")


def clean(target: str, dry_run: bool) -> list[str]:
    """Clean every finished run under ``target``; the lines to print."""
    if not os.path.isdir(target):
        raise UserError(f"{target}: no such run directory or folder of runs")
    runs = [r for r in find_runs(target, depth=6, inside=True) if os.path.isfile(os.path.join(r, "run.json"))]
    if not runs:
        raise UserError(f"{target}: no run directory (run.json) here or below")
    lines, total = [], 0
    for run in runs:
        files, why = removable(run)
        if why:
            lines.append(f"{run}: left as it is ({why})")
            continue
        with _unless_in_use(run) as free:
            if not free:
                lines.append(f"{run}: left as it is (in use by a process)")
                continue
            size = sum(os.path.getsize(p) for p in files)
            total += size
            if not files:
                lines.append(f"{run}: nothing to remove")
                continue
            lines.append(f"{run}: {'would remove' if dry_run else 'removed'} {len(files)} file(s), {format_size(size)}")
            lines += [f"  {os.path.relpath(p, run)}" for p in files]
            if not dry_run:
                for p in files:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(p)
                latest = _latest(os.path.join(run, "checkpoints"))
                if latest:
                    _rewrite_state(os.path.join(run, "checkpoints"), latest)
    lines.append(f"{'would free' if dry_run else 'freed'} {format_size(total)}" + (f" ({total} bytes)" if total >= 1024 else ""))
    return lines
