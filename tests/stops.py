"""Stops at known places, for tests of resumed sessions: through the public hook API
(``hpcjobs.train.train(cfg, run_dir, hooks=[...])``) and the same path a time budget's stop
takes, but at a step, not at a moment, so a test's sessions are the same on any machine."""
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
