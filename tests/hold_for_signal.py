"""A user hook (``training.hooks``) for tests that stop a separate training process with a
real signal: with ``HPCJOBS_TEST_HOLD_AT`` set in its environment (a step, or steps separated
by commas for a run cut into several sessions), the process waits after the call that
reaches the first of those steps beyond its session's start until a stop signal has come (at
most 5 minutes), so the signal lands inside the run on a machine of any speed, and the stop
goes its usual way (the next call carries the vote).  A session that starts beyond every
step trains to the end, and so does a process without the variable: the uninterrupted run
of the same config trains as it would.  While it holds, it says so once ("holding at step
N"), for tests that wait to send the signal.  No training state, so the weights are the
same either way."""
import os
import time


class HoldForSignal:
    def begin(self, loop):
        steps = [int(s) for s in os.environ.get("HPCJOBS_TEST_HOLD_AT", "").split(",") if s.strip()]
        self.at = next((s for s in sorted(steps) if s > loop.step), None)

    def after_steps(self, loop, step, sums, seconds):
        if self.at is None or step < self.at:
            return
        self.at = None  # once per session
        print(f"holding at step {step} for a stop signal", flush=True)
        deadline = time.monotonic() + 300
        while not loop.stop.signal and time.monotonic() < deadline:
            time.sleep(0.01)
