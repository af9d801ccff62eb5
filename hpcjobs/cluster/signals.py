"""Stop signals: SIGUSR1/SIGTERM (Slurm's warning before a time limit, or preemption).

Shared by training and inference.  A signal sets a flag; the loop reads it between
compiled calls (or chunks) and stops with a checkpoint.  The signals are held
(blocked) from start-up until the flag is installed, so every thread started in
between (TensorFlow's pools, Horovod's and MPI's background threads) inherits the
block and only the main thread ever receives them.
"""
from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextlib.contextmanager
def held():
    """Block the stop signals in this thread for the ``with`` body; the previous mask
    comes back afterwards, also when the body raises.  A signal that arrives while
    held stays pending and is delivered once unblocked (by ``StopFlag.install``)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StopFlag:
    """SIGUSR1/SIGTERM set ``signal`` (the signal's name); the loop checks it.

    ``install`` replaces the handlers and unblocks the signals (a held one arrives
    now); ``uninstall`` puts the old handlers back.  Usable as a context manager."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may handle signals (e.g. inference in a thread)
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def uninstall(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    __enter__ = install

    def __exit__(self, *exc):
        self.uninstall()
