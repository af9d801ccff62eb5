"""A run remembers its stack: ``run.json``'s ``stack`` record and ``RUN/environment.txt``,
refreshed at every session's start.

A session on another stack than the run's last one lists what changed.  One on the
other Keras major (TensorFlow 2.14 + Keras 2 against TensorFlow >= 2.16 + Keras 3) is
refused when the run has checkpoints: they hold the other Keras' objects, and restoring
them would fail (or worse, half-succeed) with an error about variables.  A run with no
stack record was written on TensorFlow >= 2.16 with Keras 3.
"""
from __future__ import annotations

import os

from .checkpoint import checkpoint_candidates
from ..compat import stack
from ..errors import UserError
from ..rundir import RunDir, atomic_write


class StackMismatch(UserError):
    """A run's checkpoints were written on the other Keras major (exit code 2)."""


def check(rd: RunDir, say=print) -> dict:
    """This process's stack record, after refusing a run whose checkpoints come from the
    other Keras major and saying what changed since the run's last session."""
    now = stack.current()
    before = rd.read_record().get("stack") if os.path.isfile(rd.run_json) else None
    has_checkpoints = bool(checkpoint_candidates(rd.checkpoints))
    if not has_checkpoints:
        return now
    if not stack.same_family(before, now):
        need = stack.family(stack.keras_major_of(before))
        raise StackMismatch(f"{rd.path}: its checkpoints were written on {stack.describe(before)} and this is "
                            f"{stack.describe(now)}; continue it on {need}, or start a new run (--run-dir)")
    changed = stack.changes(before, now)
    if changed:
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        say(f"the stack changed since the last session: {shown} (RUN/environment.txt lists it now)")
    return now


def write(rd: RunDir, record: dict):
    """RUN/environment.txt from ``record`` (the chief only)."""
    if rd.writer:
        atomic_write(rd.sub("environment.txt"), stack.environment_text(record))
