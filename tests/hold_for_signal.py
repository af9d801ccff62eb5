"""A user hook (``training.hooks``) for tests that stop a separate training process with a
real signal: with ``HPCJOBS_TEST_HOLD_AT`` set in its environment, the process waits after
the call that reaches that step until a stop signal has come (at most 5 minutes), so the
signal lands inside the run on a machine of any speed, and the stop goes its usual way (the
next call carries the vote).  Without that variable it does nothing: the uninterrupted run
of the same config trains as it would.  No state, so the weights are the same either way."""
import os
import time


class HoldForSignal:
    def after_steps(self, loop, step, sums, seconds):
        at = os.environ.get("HPCJOBS_TEST_HOLD_AT")
        if at is None or step < int(at):
            return
        deadline = time.monotonic() + 300
        while not loop.stop.signal and time.monotonic() < deadline:
            time.sleep(0.01)
