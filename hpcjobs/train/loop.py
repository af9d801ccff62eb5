"""The outer training loop: it owns the counters and decides *when*.

Each turn runs one compiled call of up to ``training.steps_per_call`` steps, cut so
that it ends on an epoch's end and on whatever bound a hook sets (``limit``).  Before
the call every hook may give a reason to stop (``stop_reason``) or ask for a
checkpoint (``save_due``); those two flags are summed over all workers inside the
call, so every worker takes the same decision after it.  At an epoch's end the loop
validates, builds the metrics row and hands it to the hooks (``epoch_end``).  *What*
happens at each of those moments is the hooks' business (``hooks.py``).

The loop's own state (the step, the epoch's running sums and seconds) lives in the
trainer's checkpointed variables, so a resumed loop continues mid-epoch exactly.
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import RunFailure


class TrainingDiverged(RunFailure):
    """The loss became NaN or infinite (exit code 1)."""


class Loop:
    """One session's loop over ``trainer``'s compiled steps, calling ``hooks``."""

    def __init__(self, trainer, hooks, stop):
        self.trainer, self.hooks, self.stop = trainer, list(hooks), stop
        self.step = int(trainer.step_var.numpy())
        self.history = [r for r in trainer.run_dir.read_metrics() if r["step"] <= self.step]
        self.call_seconds = 0.0

    def each(self, method: str, *args) -> list:
        """Call ``method`` on every hook, in order; their answers."""
        return [getattr(h, method)(self, *args) for h in self.hooks]

    def run(self) -> str:
        """Train until the end, a hook's stop, or an agreed stop; returns the reason."""
        t = self.trainer
        self.each("begin")
        iterator = t.train_iterator(self.step)
        epoch_start = time.monotonic() - float(t.epoch_seconds.numpy())
        while self.step < t.total_steps:
            step = self.step
            if step % t.steps_per_epoch == 0:
                self.each("epoch_begin", step // t.steps_per_epoch)
            epoch_end = (step // t.steps_per_epoch + 1) * t.steps_per_epoch
            limits = [x for x in self.each("limit", step) if x is not None]
            n = min([t.cfg.training.steps_per_call, epoch_end - step] + limits)
            local = next((r for r in self.each("stop_reason") if r), None)
            due = any(self.each("save_due", step + n))
            t_call = time.monotonic()
            sums, (stop_votes, save_votes) = t.call(iterator, n, [local is not None, due])
            self.call_seconds = time.monotonic() - t_call
            self.step = step = step + n
            t.step_var.assign(step)
            t.epoch_sums.assign_add(sums)
            if not np.isfinite(sums[0]):
                raise TrainingDiverged(f"the loss became {sums[0]} at step {step}: lower optimizer.learning_rate "
                                       "or check the data")
            self.each("after_steps", step, sums, self.call_seconds)
            if step == epoch_end:
                t.epoch_seconds.assign(time.monotonic() - epoch_start)
                reason = self._end_epoch(step)
                epoch_start = time.monotonic()
                t.epoch_sums.assign(np.zeros(3))
                t.epoch_seconds.assign(0.0)
                if reason:
                    return reason
            if step >= t.total_steps:
                return "finished"
            reason = (local or self.stop.signal or "peer") if stop_votes > 0 else None
            if reason or save_votes > 0:
                t.epoch_seconds.assign(time.monotonic() - epoch_start)
                saved = t.checkpoints.save(step)
                if saved:
                    self.each("saved", saved, reason is not None)
            if reason:
                return reason
        return "finished"

    def _end_epoch(self, step: int) -> str | None:
        t = self.trainer
        e = t.epoch_sums.numpy()
        row = dict(epoch=step // t.steps_per_epoch, step=step, loss=e[0] / e[2], accuracy=e[1] / e[2])
        row.update({f"val_{k}": v for k, v in t.evaluate("val").items()})
        row["lr"] = t.learning_rate()
        row["seconds"] = float(t.epoch_seconds.numpy())
        self.history.append(row)
        return next((r for r in self.each("epoch_end", row) if r), None)  # every hook sees the row
