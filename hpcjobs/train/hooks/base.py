"""The hook protocol: *what* happens at the moments the loop (``loop.py``) picks.

A hook is a small object; the loop calls each of these methods on every hook, in
the order of the hook list.  All of them are optional (the base class does nothing):

========================================  ==================================================
``setup(trainer) -> dict``                once, inside the strategy scope, before the
                                          checkpoint is built: the hook's state variables.
                                          They are checkpointed (and broadcast under
                                          Horovod), so exact resume covers them.
``begin(loop)``                           a session starts, after restore
``epoch_begin(loop, epoch)``              before the first call of epoch ``epoch`` (0-based)
``limit(loop, step) -> int | None``       before each compiled call: the most steps it may run
``stop_reason(loop) -> str | None``       before each call: this worker's reason to stop
                                          after it (summed over workers with the step)
``save_due(loop, step) -> bool``          before each call: checkpoint after it, at ``step``
``after_steps(loop, step, sums, secs)``   after each call (sums: loss sum, correct, count)
``epoch_end(loop, row) -> str | None``    after validation at an epoch's end; ``row`` is the
                                          metrics.csv row; a string stops the run (finished)
``saved(loop, saved, stopping)``          after the loop saved a checkpoint
``end(loop, reason)``                     the loop returned ``reason``; after the final save,
                                          before the test evaluation and the export
``summary(loop) -> dict``                 fields for run.json at the session's end
========================================  ==================================================

A new feature is a new hook, passed as ``Trainer(..., hooks=[...])`` or
``train(..., hooks=[...])``: the loop does not change.
"""
from __future__ import annotations

import math


def is_final(reason: str) -> bool:
    """Whether the loop's ``reason`` ends the run for good (else it stopped with more to do)."""
    # pruned: a search trial its pruner stopped (hpcjobs.search.prune)
    return reason in ("finished", "early_stopping", "stop_at", "pruned") or reason.startswith("diagnosis_")


class Hook:
    def setup(self, trainer) -> dict:
        return {}

    def begin(self, loop):
        pass

    def epoch_begin(self, loop, epoch: int):
        pass

    def limit(self, loop, step: int) -> int | None:
        return None

    def stop_reason(self, loop) -> str | None:
        return None

    def save_due(self, loop, step: int) -> bool:
        return False

    def after_steps(self, loop, step: int, sums, seconds: float):
        pass

    def epoch_end(self, loop, row: dict) -> str | None:
        return None

    def saved(self, loop, saved, stopping: bool):
        pass

    def end(self, loop, reason: str):
        pass

    def summary(self, loop) -> dict:
        return {}


def _better(value: float, best: float, direction: str, min_delta: float) -> bool:
    if math.isnan(best):
        return True
    return value < best - min_delta if direction == "min" else value > best + min_delta
