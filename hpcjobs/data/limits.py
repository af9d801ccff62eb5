"""How much memory reading a user's data may take, checked before it is taken.

* :func:`memory_available`: what this process may still allocate: the smallest of its
  address-space limit (``RLIMIT_AS``, less what it maps already), its cgroup's limit
  (less what the cgroup uses) and the machine's available memory.
* :func:`check_npz_arrays`: the arrays an ``.npz`` declares (shape and dtype, from each
  member's header, nothing decompressed) must fit that memory: a 6 MB file that
  declares 6 GB is refused in one line naming it.
* :data:`PIXELS`: a gate on the full-size decodes in flight in this process (threads
  take turns), so N decode workers never hold N huge images at once; one image that
  alone would not fit is refused, naming the file.
"""
from __future__ import annotations

import math
import os
import resource
import threading

import numpy as np

from ..errors import UserError


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return math.inf


def memory_available() -> float:
    """Bytes this process may still allocate (``math.inf`` where nothing says)."""
    avail = [_meminfo_available()]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        pages = _read_int("/proc/self/statm")  # the first field: the mapped size, in pages
        avail.append(soft - (pages or 0) * os.sysconf("SC_PAGE_SIZE"))
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None:
        avail.append(limit - (used or 0))
    return max(0.0, float(min(avail)))


def _size(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def check_npz_arrays(path: str, z, keys, error=UserError):
    """Refuse (``error``) arrays of the opened npz ``z`` whose declared size does not fit
    in half the memory this process may still use; read from the headers only."""
    total, shapes = 0, {}
    for key in keys:
        try:
            with z.zip.open(f"{key}.npy") as f:
                fmt = np.lib.format
                version = fmt.read_magic(f)
                reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = reader(f)
        except (KeyError, OSError, ValueError) as e:
            raise error(f"{path}: array '{key}' has an unreadable header ({str(e)[:120]})") from None
        shapes[key] = shape
        total += math.prod(shape) * dtype.itemsize
    room = memory_available() / 2
    if total > room:
        shown = ", ".join(f"{k} {shapes[k]}" for k in keys)
        raise error(f"{path}: declares {_size(total)} of arrays ({shown}), more than the {_size(room)} this "
                    "process may use for them")
    return shapes


class PixelGate:
    """Bytes of full-size decodes in flight in this process, against a budget: half the
    memory available, measured again whenever no decode is in flight."""

    def __init__(self):
        self._cond = threading.Condition()
        self._in_flight = 0
        self.budget: float | None = None

    def acquire(self, nbytes: int, path: str, error):
        with self._cond:
            if not self._in_flight:
                self.budget = memory_available() / 2
            if nbytes > self.budget:
                raise error(path, f"{_size(nbytes)} to decode, more than the {_size(self.budget)} of memory "
                                  "decoding may use here")
            while self._in_flight and self._in_flight + nbytes > self.budget:
                self._cond.wait()
            self._in_flight += nbytes

    def release(self, nbytes: int):
        with self._cond:
            self._in_flight -= nbytes
            self._cond.notify_all()


PIXELS = PixelGate()
