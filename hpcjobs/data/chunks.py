"""Prepare's unit of work and of resume: a chunk of one split, made by a pool of processes.

A split's samples (in the store's order) are cut into chunks of ``chunk_rows`` samples,
the same cut whatever the number of workers.  A worker turns one chunk into the model's
images with :func:`hpcjobs.data.images.model_image` (the one image path of training and
serving) and gives back the images, the source indices kept, the unreadable ones
skipped and, for the training split, the chunk's per-channel pixel sums.  The parent
adds those sums chunk by chunk in order, so the statistics are the same float64 sums
whatever the number of workers or of restarts.

**Resume** (``PartialDir``): for a store ``OUT``, each finished chunk is a file of its
own, ``OUT.partial/<split>-<k>.npz``, written by the worker under a temporary name,
fsync'ed and renamed into place; ``OUT.partial/manifest.json`` names what they are
chunks of (the source's fingerprint and every setting that changes a byte).  A chunk
file exists whole or not at all, whatever kills the process (SIGKILL, an OOM kill, a
node failure once fsync'ed): a re-run keeps every chunk file present, removes the
temporary ones, and makes only the missing chunks.  The HDF5 store is written from the
chunk files at the end, to a temporary file renamed into place; only then is the folder
removed.  HDF5 itself is never written to before that point, since a write cut short
can leave an HDF5 file unreadable.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
from collections import deque
from typing import Callable, Iterator, Optional

import numpy as np

from ..rundir import atomic_write, fsync_dir, fsync_file
from .images import ImageError, model_image

MANIFEST = "manifest.json"
_CHUNK = re.compile(r"^(train|val|test)-(\d{6})\.npz$")


def default_workers() -> int:
    """The CPUs this process may use: SLURM_CPUS_PER_TASK inside a job, else its affinity."""
    env = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def chunk_rows(shape: tuple, limit: int = 1024, budget: int = 16 << 20) -> int:
    """Samples per chunk: at most ``limit``, and at most ``budget`` bytes of images (so a
    chunk is small enough to spread over the workers evenly, and memory is bounded by
    2 x workers chunks in flight)."""
    return int(max(1, min(limit, budget // max(1, int(np.prod(shape))))))


# --------------------------------------------------------------------------- the work of one chunk
def _pixel_sums(arr: np.ndarray) -> np.ndarray:
    f = arr.reshape(-1, arr.shape[-1]).astype(np.float64)
    return np.stack([np.full(arr.shape[-1], float(len(f))), f.sum(0), (f * f).sum(0)])


def make_chunk(items: list, index: np.ndarray, shape: tuple, image_path: str, strict: bool,
               sums: bool, out: Optional[str] = None) -> dict:
    """Chunk of samples ``items`` (files or arrays; their source indices ``index``) as
    the model's images.  With ``out``, the result is committed to that file (temporary
    name, fsync, rename) and only the small part comes back."""
    images, kept, skipped = [], [], []
    for item, i in zip(items, index):
        try:
            images.append(model_image(item, shape[:2], shape[2], image_path))
            kept.append(int(i))
        except ImageError as e:
            if strict:
                raise
            skipped.append((e.path, e.reason))
    arr = np.stack(images) if images else np.empty((0, *shape), np.uint8)
    result = dict(images=arr, kept=np.array(kept, np.int64),
                  skipped=np.array([f"{p}\0{r}" for p, r in skipped], dtype=str),
                  sums=_pixel_sums(arr) if sums and len(arr) else np.zeros((3, shape[2])))
    if out is None:
        return result
    tmp = os.path.join(os.path.dirname(out), f".tmp-{os.getpid()}-{os.path.basename(out)}")
    with open(tmp, "wb") as f:
        np.savez(f, **result)
    fsync_file(tmp)
    os.replace(tmp, out)
    return dict(result, images=None)


def _run(task):
    return task[0], make_chunk(*task[1:])


def _alive(pid: int) -> bool:
    """The process runs: it exists and is no zombie (killed, its parent not yet told)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: whether the pid exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True


def _quiet_worker(parent: int):
    """A worker leaves stop signals and Ctrl-C to the parent, which stops at a chunk
    boundary; and ends when the parent is gone (a SIGKILL, an OOM kill): a pool worker
    would otherwise wait for its next chunk for ever."""
    import threading
    import time

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)

    def watch():
        while _alive(parent):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="hpcjobs-parent-watch", daemon=True).start()


def run_chunks(tasks: list, workers: int, stop: Callable[[], bool] = lambda: False) -> Iterator:
    """(key, result) of every task (``make_chunk``'s arguments after a key), in order; on
    ``workers`` processes (a fresh interpreter each, forkserver: no fork of a process that
    runs TensorFlow's threads), at most two chunks per worker in flight.  When ``stop()``
    turns true, no new chunk starts; the ones under way finish and come back.

    The workers ignore the stop signals and Ctrl-C (the parent decides), so on an error
    they are killed outright; a worker that dies (an OOM kill) is a RunFailure, not a hang."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            if stop():
                return
            yield _run(t)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from ..cluster.signals import held
    from ..errors import RunFailure

    from multiprocessing import forkserver

    workers = min(workers, len(tasks))
    # The forkserver and so its workers start with the stop signals blocked: srun passes
    # a signal on to every process of the step, and a forkserver killed by it would take
    # the pool with it.  (Started here, not at the first submit, so inside the block.)
    with held():
        forkserver.ensure_running()
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"), initializer=_quiet_worker,
                                   initargs=(os.getpid(),))
    clean = False
    try:
        window: deque = deque()
        todo = iter(tasks)
        more = True
        while more or window:
            while more and len(window) < 2 * workers and not stop():
                t = next(todo, None)
                if t is None:
                    more = False
                else:
                    window.append(pool.submit(_run, t))
            if stop():
                more = False
            if window:
                try:
                    result = window.popleft().result()
                except BrokenProcessPool:
                    raise RunFailure("prepare: a worker process died (killed, or out of memory?); the chunks "
                                     "made are kept: run it again to continue (or with fewer --workers)") from None
                yield result
        clean = True
    finally:
        if not clean:  # an error, or the caller stopped early: the workers ignore SIGTERM, so kill them
            for proc in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(OSError, AttributeError):
                    proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- the resumable state
def source_fingerprint(samples) -> str:
    """What the samples are: class names, labels, and the file names or the array bytes."""
    h = hashlib.sha256(json.dumps([samples.origin, list(samples.class_names)]).encode())
    h.update(np.ascontiguousarray(samples.labels, np.int64).tobytes())
    if samples.paths is not None:
        for p in samples.paths:
            h.update(os.fsencode(p) + b"\0")
    else:
        arr = np.ascontiguousarray(samples.arrays)
        h.update(str((arr.dtype.str, arr.shape)).encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()[:32]


class PartialDir:
    """``OUT.partial/``: the committed chunks of an unfinished prepare and their manifest."""

    def __init__(self, out_path: str, identity: dict):
        self.path = f"{out_path}.partial"
        self.identity = identity

    def chunk(self, split: str, k: int) -> str:
        return os.path.join(self.path, f"{split}-{k:06d}.npz")

    def open(self, force: bool, error=ValueError) -> set:
        """The (split, k) already committed; a folder of another source or config is
        refused with ``error`` (``force``: started over)."""
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise error(f"{self.path}: exists and is not a folder of prepare chunks; delete it")
        if os.path.isdir(self.path):
            old = self._manifest()
            if old != self.identity:
                if old is None and any(not n.startswith(".tmp-") for n in os.listdir(self.path)) and not force:
                    raise error(f"{self.path}: not a folder of prepare chunks (no readable {MANIFEST}); "
                                     "delete it")
                if old is not None and not force:
                    diff = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
                    raise error(f"{self.path}: an unfinished prepare of a different source or config "
                                     f"(differs in {', '.join(diff)}); delete it, or give --force to start over")
                shutil.rmtree(self.path)
        os.makedirs(self.path, exist_ok=True)
        if not os.path.exists(os.path.join(self.path, MANIFEST)):
            atomic_write(os.path.join(self.path, MANIFEST), json.dumps(self.identity, indent=1) + "\n")
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        done = set()
        for name in os.listdir(self.path):
            m = _CHUNK.match(name)
            if m:
                done.add((m.group(1), int(m.group(2))))
            elif name != MANIFEST:  # a temporary file of a chunk cut short
                os.remove(os.path.join(self.path, name))
        return done

    def _manifest(self) -> Optional[dict]:
        try:
            with open(os.path.join(self.path, MANIFEST), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def load(self, split: str, k: int, images: bool = False) -> dict:
        with np.load(self.chunk(split, k), allow_pickle=False) as z:
            return {key: z[key] for key in z.files if images or key != "images"}

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)
