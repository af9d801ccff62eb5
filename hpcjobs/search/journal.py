"""The search state on the shared file system: an Optuna journal whose lock the kernel owns.

Optuna's ``JournalFileBackend`` locks with a symlink or an O_EXCL file.  A process
killed while holding it leaves the file behind: before Optuna 4.3 the next process
waited for ever (optuna#5921); since then a lock whose mtime has not changed for
``grace_period`` seconds is removed by force, so a holder that is merely slow (a
stalled NFS server, a swapped-out node) loses its lock while it still writes, and two
writers append at once; interleaved records (``...}{"op_code"...``) are what
optuna#5138 shows.  And its appends use ``O_APPEND``, which NFS does not make atomic
across clients (each client appends at the size it has cached).

:class:`LockedJournal` implements Optuna's ``BaseJournalBackend`` itself instead:

* every read and append holds a POSIX record lock (``fcntl.lockf``) on the journal
  file, shared for reading and exclusive for appending.  The kernel drops it when
  the process dies, however it dies (on NFS the server drops it when the client's
  lease ends), so it cannot be left stale, and it is never taken away from a live
  holder.  Taking it also makes an NFS client revalidate its cache of the file
  (close-to-open and lock-to-unlock coherence), so a reader sees every append that
  was released before;
* an append writes at the file's size as seen under the lock (``os.pwrite``, no
  ``O_APPEND``), fsyncs, and reads its bytes back before it releases the lock;
* a record cut short by a writer killed mid-write (no newline at the end) is cut
  off by the next append, and skipped by readers, so it is as if it had never been
  written (its writer never returned).

One process opens the file once per operation and closes it afterwards, under a
thread lock: POSIX locks belong to the process, and closing any descriptor of the
file would drop them, so no other descriptor of it is ever open in this process.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
from typing import Any, Iterator

from optuna.storages.journal import BaseJournalBackend, JournalStorage

from ..errors import UserError

_THREADS = threading.Lock()
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class NoFileLocks(UserError, OSError):
    """The file system of the search does not support file locks (exit 2, one line)."""


def _lock(call, fd: int, op: int, path: str):
    try:
        call(fd, op)
    except OSError as e:
        if e.errno in _NO_LOCKS:
            raise NoFileLocks(f"{path}: this file system refuses file locks ({os.strerror(e.errno)}), which a "
                              "search needs: put the run directory on one that has them (Lustre: mounted with "
                              "-o flock; NFS: with its lock service)") from None
        raise


class JournalDamaged(UserError, ValueError):
    """The journal holds a line that is no record, or was cut or replaced while in use (exit 2)."""


def _damaged(path: str, what: str) -> JournalDamaged:
    return JournalDamaged(f"{path}: the search journal is damaged ({what}); the trials' run directories "
                          f"are kept: move the journal aside to start the search's record afresh")


class JournalWriteLost(OSError):
    """An append did not read back as written (a lost write on the shared file system)."""


@contextlib.contextmanager
def locked(path: str, exclusive: bool) -> Iterator[int]:
    """A descriptor of ``path`` (created if missing) under a shared or exclusive lockf lock."""
    with _THREADS:
        fd = os.open(path, (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CREAT, 0o644)
        try:
            _lock(fcntl.lockf, fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, path)
            yield fd
        finally:
            os.close(fd)  # releases the lock


def _read_all(fd: int, start: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], start
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class LockedJournal(BaseJournalBackend):
    """Optuna journal backend over one file, locked with ``fcntl.lockf`` (see the module)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            with locked(path, exclusive=True):
                pass
        self._offsets = {0: 0}  # log number -> byte offset of its line (lines read so far)
        self._inode = os.stat(path).st_ino

    def _check_same(self, fd: int):
        """The file is the one read so far, and no shorter: else it was deleted, replaced or cut."""
        st, known = os.fstat(fd), max(self._offsets.values())
        if st.st_ino != self._inode or st.st_size < known:  # a new file may get the old inode number
            raise _damaged(self.path, f"deleted, replaced or cut while the search used it: {st.st_size} bytes, "
                                      f"{known} read before")

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        known = max(n for n in self._offsets if n <= log_number_from)
        with locked(self.path, exclusive=False) as fd:
            self._check_same(fd)
            data = _read_all(fd, self._offsets[known])
        logs, number, offset = [], known, self._offsets[known]
        for line in data.split(b"\n")[:-1]:  # the last piece is '' or a record cut short
            offset += len(line) + 1
            number += 1
            self._offsets[number] = offset
            if number - 1 >= log_number_from:
                try:
                    log = json.loads(line)
                except ValueError:
                    log = None
                if not isinstance(log, dict) or "op_code" not in log:
                    raise _damaged(self.path, f"line {number} is no journal record")
                logs.append(log)
        return logs

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        with locked(self.path, exclusive=True) as fd:
            self._check_same(fd)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a writer died mid-record: drop the piece
                tail = _read_all(fd, max(0, size - (1 << 20)))
                size -= len(tail) - (tail.rfind(b"\n") + 1)
                os.ftruncate(fd, size)
            written = 0
            while written < len(text):
                written += os.pwrite(fd, text[written:], size + written)
            os.fsync(fd)
            if os.pread(fd, len(text), size) != text:
                raise JournalWriteLost(f"{self.path}: an append did not read back as written")


def storage(path: str) -> JournalStorage:
    """An Optuna storage on the journal file at ``path``."""
    return JournalStorage(LockedJournal(path))


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """A search-wide critical section (count the trials, then ask for one) on a lock file of
    its own: ``flock``, which the kernel drops when the process dies, so never left stale."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fcntl.flock, fd, fcntl.LOCK_EX, path)
        yield
    finally:
        os.close(fd)


def try_flock(path: str):
    """An open descriptor holding ``flock(LOCK_EX)`` on ``path``, or None if another holds it.
    The claim on a trial: held for as long as a worker works on it, gone when it dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path)
    except NoFileLocks:
        os.close(fd)
        raise
    except OSError:  # EWOULDBLOCK: another holds it
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
    return fd


def release(fd) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
