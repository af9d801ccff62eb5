"""Stops at known places, for tests of resumed sessions: through the public hook API
(``hpcjobs.train.train(cfg, run_dir, hooks=[...])``) and the same path a time budget's stop
takes, but at a step, not at a moment, so a test's sessions are the same on any machine."""
import statistics
import time

from hpcjobs import config
from hpcjobs.train import Hook, train

from conftest import QUICKSTART


class StopAfterCallFrom(Hook):
    """Stops the session after the compiled call that starts at ``step`` or later."""

    def __init__(self, step):
        self.step = step

    def stop_reason(self, loop):
        return "test_stop" if loop.step >= self.step else None


def train_in_sessions(run, sets, stops, config_path=QUICKSTART) -> list[int]:
    """Train ``run`` in one session per entry of ``stops`` (each stopping after the call that
    starts at or past it) and one last session to the end; the exit codes."""
    cfg = config.load(config_path, list(sets))
    return [train(cfg, str(run), verbose=False, hooks=[StopAfterCallFrom(at)] if at is not None else [])
            for at in [*stops, None]]


class Clock(Hook):
    """A session's costs: set-up to the end of the first call, each call's end, step and
    seconds, and the save the loop expects."""

    def begin(self, loop):
        self.t0, self.calls = loop.trainer.t0, []

    def after_steps(self, loop, step, sums, secs):
        self.calls.append((time.monotonic(), step, secs))

    def end(self, loop, reason):
        self.save = loop.trainer.checkpoints.expected_save_seconds


def measured_budget(cfg, whole, parts, steps: int) -> float:
    """Trains ``whole`` uninterrupted and the first session of ``parts`` (stopped after one
    call: it measures a session's set-up), and returns a --time-budget in seconds for the
    sessions of ``parts`` that follow: that set-up, the stop's margin (1.5 saves, 3 calls,
    1 s) and ``steps`` steps at the whole run's pace.  So each session stops with work left
    and a stop at a time that the test did not fix, on any machine.  The margin counts the
    median call, not the slowest: one call slowed by a busy moment would triple into the budget,
    and a budget too large lets a session finish without a stop.  (One too small cannot stall: a
    session always trains the call it votes to stop in.)"""
    clock, first = Clock(), Clock()
    assert train(cfg, str(whole), verbose=False, hooks=[clock]) == 0
    assert train(cfg, str(parts), verbose=False, hooks=[first, StopAfterCallFrom(0)]) == 75
    (t1, s1, _), (tn, sn, _) = clock.calls[0], clock.calls[-1]
    per_step = (tn - t1) / (sn - s1)
    setup = first.calls[0][0] - first.calls[0][2] - first.t0
    call = statistics.median(c[2] for c in clock.calls[1:])
    return setup + 1.5 * first.save + 3 * call + 1.0 + steps * per_step
