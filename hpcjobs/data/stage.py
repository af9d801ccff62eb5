"""Node-local staging of the store (``data.stage``).

A store on a shared file system (Lustre, GPFS) is read by every rank of every node;
staging copies it once per node to node-local scratch ($SLURM_TMPDIR, $TMPDIR or a
configured path) at job start, verifies the copy, and training reads the copy.

* One copy per node: the ranks of a node take a file lock in the stage folder; the
  first copies, the others wait for it and then find the verified copy.
* Keyed by the store's identity (its real path, size and modification time): a second
  job on the node (where the scratch outlives a job, as $TMPDIR or a local SSD does)
  reuses a verified copy instead of copying again.
* Verified: the source's bytes are hashed as they are copied, the copy is read back
  and hashed, and only when the two SHA-256 agree (and the sizes) is a ``.verified``
  note written beside it.  A copy without its note is never read.
* A node where the store does not fit (with a margin) or the copy fails reads the store
  in place, with one line saying why.  The copy is the same bytes, so a run that stages
  and one that does not end bitwise equal.

``copy_verified`` is the copy itself (benchmarks time it against ``cp``);
``free_bytes`` is the free-space probe, a function of its own so tests can stand in for
a full disk.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..rundir import fsync_dir, os_reason

CHUNK = 16 << 20  # bytes per read and write of the copy
MARGIN_SHARE, MARGIN_MIN = 0.10, 256 << 20  # room left free beside a copy: 10%, at least 256 MiB
FOLDER = "hpcjobs-stage"


class CopyError(OSError):
    """The copy failed its check (sizes or digests differ)."""


@dataclass
class Staged:
    """Where training reads the store from, and how it got there."""

    path: str  # the staged copy, or the store itself when read in place
    source: str
    staged: bool
    bytes: int = 0
    seconds: float = 0.0  # the copy's time (0 when an earlier copy was reused)
    reused: bool = False
    reason: str = ""  # why the store is read in place

    def record(self) -> dict:
        """run.json's ``stage`` field."""
        if not self.staged:
            return {"in_place": True, "reason": self.reason}
        out = {"path": self.path, "bytes": self.bytes, "seconds": round(self.seconds, 3), "reused": self.reused}
        if self.seconds > 0:
            out["mb_per_s"] = round(self.bytes / self.seconds / 1e6, 1)
        return out


def free_bytes(folder: str) -> int:
    """Free bytes for an unprivileged writer in ``folder`` (the probe tests stand in for)."""
    return shutil.disk_usage(folder).free


def margin(size: int) -> int:
    return max(int(size * MARGIN_SHARE), MARGIN_MIN)


def copy_verified(src: str, dest: str, chunk: int = CHUNK) -> tuple[int, str]:
    """Copy ``src`` to ``dest`` (through a temporary name, fsync'ed, then renamed) and
    verify it: the source's bytes are hashed as they are read, the written copy is read
    back and hashed, and both SHA-256 and sizes must agree.  Returns (bytes, sha256).
    Reads and writes go in ``chunk`` blocks, hashing in a second thread (hashlib lets go
    of the GIL), so the copy runs near the speed of the slower disk."""
    tmp = f"{dest}.tmp-{os.getpid()}"
    h = hashlib.sha256()
    bufs = [bytearray(chunk), bytearray(chunk)]
    total = 0
    try:
        with open(src, "rb", buffering=0) as fin, open(tmp, "wb", buffering=0) as fout, \
                ThreadPoolExecutor(1, thread_name_prefix="hpcjobs-stage-hash") as pool:
            pending = [None, None]
            k = 0
            while True:
                if pending[k] is not None:
                    pending[k].result()  # its hash is done: the buffer may be read into again
                view = memoryview(bufs[k])
                n = fin.readinto(view)
                if not n:
                    break
                pending[k] = pool.submit(h.update, view[:n])
                done = 0
                while done < n:
                    done += fout.write(view[done:n])
                total += n
                k ^= 1
            for p in pending:
                if p is not None:
                    p.result()
            os.fsync(fout.fileno())
        size, back = os.path.getsize(tmp), hashlib.sha256()
        with open(tmp, "rb", buffering=0) as f:
            view = memoryview(bufs[0])
            while n := f.readinto(view):
                back.update(view[:n])
        if size != total or size != os.path.getsize(src):
            raise CopyError(f"the copy has {size:,} bytes, the store {os.path.getsize(src):,}")
        if back.hexdigest() != h.hexdigest():
            raise CopyError("the copy's SHA-256 differs from the store's")
        os.replace(tmp, dest)
        fsync_dir(os.path.dirname(os.path.abspath(dest)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return total, h.hexdigest()


def stage_folder(setting: str | None, scratch: str | None) -> str | None:
    """The folder ``data.stage`` names: ``auto`` is the node's scratch (ClusterInfo.scratch:
    $SLURM_TMPDIR, else $TMPDIR, else /tmp); any other value is a path."""
    if not setting:
        return None
    return (scratch or "/tmp") if setting == "auto" else setting


def _key(src: str) -> str:
    st = os.stat(src)
    ident = json.dumps([os.path.realpath(src), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def stage(src: str, folder: str, *, job: str | None = None, say=print) -> Staged:
    """The store ``src`` staged into ``folder`` (one copy per node, under a file lock), or
    the store itself with the reason when it cannot be.  ``say`` gets the one line the
    rank that copied (or failed to) has to tell; ``job`` tags a failure so the other ranks
    of the same job read in place at once rather than each failing again."""
    size = os.path.getsize(src)
    try:
        key = _key(src)
        root = os.path.join(folder, FOLDER)
        os.makedirs(root, exist_ok=True)
        lock = open(os.path.join(root, f"{key}.lock"), "a+")
    except OSError as e:
        return _in_place(src, f"cannot use the stage folder {folder} ({os_reason(e, folder)})", say)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of this node wait here for the one copying
        dest = os.path.join(root, key, os.path.basename(src))
        note, failed = f"{dest}.verified", os.path.join(root, f"{key}.failed")
        done = _read_note(note)
        if done and done.get("bytes") == size and os.path.isfile(dest) and os.path.getsize(dest) == size:
            return Staged(dest, src, True, size, 0.0, reused=True)
        earlier = _read_note(failed)
        if earlier and job is not None and earlier.get("job") == job:  # another rank of this job failed
            return Staged(src, src, False, reason=earlier.get("reason", "the copy failed"))
        free = free_bytes(folder)
        if free < size + margin(size):
            return _in_place(src, f"{_mib(size)} does not fit in {folder} with a margin ({_mib(free)} free, "
                                  f"{_mib(size + margin(size))} wanted)", say, failed, job)
        t = time.perf_counter()
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(note)
            nbytes, digest = copy_verified(src, dest)
            seconds = time.perf_counter() - t
            _write_note(note, {"bytes": nbytes, "sha256": digest, "source": os.path.realpath(src),
                               "seconds": seconds})
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(dest)
            why = str(e) if isinstance(e, CopyError) else os_reason(e, folder)
            return _in_place(src, f"copying it to {folder} failed ({why})", say, failed, job)
        say(f"staged the store {src} ({_mib(nbytes)}) to {dest} in {seconds:.1f} s "
            f"({nbytes / max(seconds, 1e-9) / 1e6:.0f} MB/s), verified")
        return Staged(dest, src, True, nbytes, seconds)


def _in_place(src: str, why: str, say, failed: str | None = None, job: str | None = None) -> Staged:
    say(f"data.stage: reading the store in place: {why}")
    if failed and job is not None:
        with contextlib.suppress(OSError):
            _write_note(failed, {"job": job, "reason": why})
    return Staged(src, src, False, reason=why)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _read_note(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_note(path: str, data: dict):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

