"""The run directory: its layout, atomic writes, run.json, metrics.csv and the lock.

    runs/<name>/config.yaml        the resolved config
    runs/<name>/run.json           status, sessions, steps, best metric, test metrics
    runs/<name>/metrics.csv        one row per epoch
    runs/<name>/tensorboard/       scalars
    runs/<name>/plots/training.png
    runs/<name>/checkpoints/
    runs/<name>/evaluation/        the test split's metrics.json, per_class.csv, confusion_matrix.csv/.png
    runs/<name>/export/            model.keras, preprocessing.json, labels.txt, model_card.md, SHA256SUMS
                                   (and saved_model/, model.tflite, model.onnx by export.formats)
    runs/<name>/slurm/             rendered scripts and logs

Every file is written to a temporary name and renamed, so a reader (or a crash)
never sees half a file where a good one was.  run.json is read and written as a
``hpcjobs.record.RunRecord`` only (``read_record``, ``write_record``, ``update_record``),
each write under the run's lock (``locked``).

What may be a run directory (``RunDir.claim``): a folder that does not exist yet, an
empty one, or one hpcjobs made, which holds hpcjobs' ``.lock`` file (every command that
writes a run creates it first) or its run record (run.json with a status and sessions).  Anything else is refused in one line naming it, so
a user's files are never overwritten.  Output folders (``export --output``,
``evaluate --output``) follow the same rule with their own mark
(:func:`check_output_folder`).  A user's file (a config, run.json, a listing) is
read by :func:`read_capped`: regular files only, never more than a cap.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import stat
import time

from .errors import UserError, first_line
from .record import RunRecord

METRIC_FIELDS = ["epoch", "step", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds", "val_f1",
                 "stage"]
OPTIONAL_FIELDS = ("stage",)  # a column only in runs that have it (training.stages)
MAX_RUN_JSON = 64 << 20  # run.json of a search's or folds' parent with every metric stays far below


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used (exit code 2): in use, or not a run."""


class FileRefused(UserError, ValueError):
    """A file that is not a regular file, or is larger than its cap (exit code 2)."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _refuse_irregular(path: str, mode: int, what: str):
    if stat.S_ISDIR(mode):  # as open() says it: the callers word OSErrors
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise FileRefused(f"{path}: {kind}, not a regular file (a {what} must be a file)")


def check_regular(path: str, what: str):
    """Refuse (FileRefused) a path that is not a regular file, symlinks followed, before a
    library opens it (numpy, PIL, h5py); OSError (missing, no permission) is the caller's."""
    _refuse_irregular(path, os.stat(path).st_mode, what)


def format_size(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        scale = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}[unit]
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def read_capped(path: str, limit: int, what: str) -> bytes:
    """The content of the regular file ``path`` (symlinks followed), at most ``limit`` bytes.

    A FIFO, a device or a socket is a FileRefused (a folder an IsADirectoryError): opened without blocking (a
    FIFO never hangs) and never read (/dev/zero never fills the memory).  So is a file
    over ``limit``, counted while reading (``st_size`` is 0 for a device and can change).
    OSError (missing, no permission) is left to the caller, who words it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _refuse_irregular(path, os.fstat(fd).st_mode, what)
        chunks, size = [], 0
        while size <= limit:
            block = os.read(fd, min(1 << 20, limit + 1 - size))
            if not block:
                break
            chunks.append(block)
            size += len(block)
        if size > limit:
            raise FileRefused(f"{path}: larger than {format_size(limit)}: not a {what}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json_capped(path: str, limit: int, what: str):
    """A JSON file read by :func:`read_capped`; ValueError (and OSError) are the caller's."""
    return json.loads(read_capped(path, limit, what).decode("utf-8"))


def refuse_overwriting(source: str, target: str, text: str):
    """``text`` is about to replace ``target``: refuse (exit 2) if ``target`` is the user's
    input file ``source`` (the same file, by any path) and ``text`` is not what it holds."""
    with contextlib.suppress(OSError):
        if os.path.samefile(source, target):
            with contextlib.suppress(ValueError):
                if read_capped(target, 1 << 20, "config").decode("utf-8") == text:
                    return  # rewritten with the same bytes: nothing of the user's is lost
            raise UserError(f"{source}: this command would rewrite it ({os.path.abspath(target)}) with the "
                            "resolved config; copy it elsewhere and give the copy")


def check_output_folder(path: str, marker: str, ours, what: str):
    """An output folder must be new, empty, or an earlier output of the same kind: its
    ``marker`` file passes ``ours(marker_path)``.  Anything else (a file, someone's own
    files, a run directory, checkpoints/) is refused, naming it: nothing is replaced."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{path}: is a file; the {what} output must be a folder (new, empty or an earlier "
                        f"{what} output)")
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"{path}: cannot be the {what} output ({os_reason(e, path)})") from None
    if not names:
        return
    with contextlib.suppress(OSError, ValueError):
        if ours(os.path.join(path, marker)):
            return
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise UserError(f"{path}: not empty and not an earlier {what} output (it holds {shown}); "
                    "give a new or empty folder")


def os_reason(e: OSError, path: str) -> str:
    """The reason of an OSError in words, with the case of a file in the way spelt out."""
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        parent = path
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if os.path.exists(parent) and not os.path.isdir(parent):
            return f"{parent} is a file"
    return os.strerror(e.errno) if e.errno else (str(e).splitlines() or [type(e).__name__])[0][:200]


def default_run_dir(given: str | None, name: str) -> str:
    """The run directory of a command: ``--run-dir``, else ``runs/<config name>``."""
    return given or os.path.join("runs", name)


def fsync_file(path: str):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, fsync: bool = True):
    """Yield a temporary path next to ``path``; rename it over ``path`` on success."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")  # keeps the suffix Keras checks
    try:
        yield tmp
        if fsync and os.path.isfile(tmp):
            fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, text: str, fsync: bool = True):
    with atomic_path(path, fsync) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


_HELD: dict[str, int] = {}  # run directory -> the lock's descriptor, for the locks this process holds


class RunDir:
    """Paths and small files of one run.  Only the chief writes (``writer=True``)."""

    def __init__(self, path: str, writer: bool = True):
        self.path = os.path.abspath(path)
        self.writer = writer
        self._lock_fd = None

    def sub(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    config_yaml = property(lambda self: self.sub("config.yaml"))
    run_json = property(lambda self: self.sub("run.json"))
    metrics_csv = property(lambda self: self.sub("metrics.csv"))
    checkpoints = property(lambda self: self.sub("checkpoints"))
    export = property(lambda self: self.sub("export"))
    tensorboard = property(lambda self: self.sub("tensorboard"))
    plots = property(lambda self: self.sub("plots"))
    slurm = property(lambda self: self.sub("slurm"))

    # -- lock -------------------------------------------------------------------------
    def makedirs(self):
        """Create the run directory; a path that is a file, lies under a file, or is on a
        read-only file system is a RunDirError naming it (exit 2, one line)."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot be a run directory ({os_reason(e, self.path)})") from None

    def check_usable(self):
        """The run directory rule (see the module docstring): missing, empty (bar hpcjobs'
        ``.lock``) or made by hpcjobs; else a RunDirError naming the folder and its files."""
        try:
            names = sorted(os.listdir(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return  # makedirs says what is in the way
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot be a run directory ({os_reason(e, self.path)})") from None
        if not names or self.made_by_hpcjobs():
            return
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise RunDirError(f"{self.path}: not empty and not an hpcjobs run directory (it holds {shown}); "
                          "give a new or empty folder with --run-dir")

    def made_by_hpcjobs(self) -> bool:
        """The folder holds hpcjobs' ``.lock`` (empty, or ``pid N on HOST``), or a run.json
        that is hpcjobs' run record (a status and a list of sessions: a run copied without
        its hidden files)."""
        try:
            text = read_capped(self.sub(".lock"), 4096, "lock file")
            if text == b"" or text.startswith(b"pid "):
                return True
        except (OSError, FileRefused):
            pass
        record = self.read_record()
        return record.status in ("running", "stopped", "finished", "failed") and "sessions" in record.to_dict()

    def claim(self) -> bool:
        """Check the rule, create the folder and hpcjobs' ``.lock`` in it (the mark of a run
        directory); True when this call created the folder."""
        self.check_usable()
        created = not os.path.isdir(self.path)
        self.makedirs()
        try:
            os.close(os.open(self.sub(".lock"), os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot be a run directory ({os_reason(e, self.path)})") from None
        return created

    def discard(self):
        """Remove a run directory this process created and left holding nothing but its
        lock (a refused command leaves no empty run behind); anything else stays."""
        self.unlock()
        with contextlib.suppress(OSError):
            if os.listdir(self.path) == [".lock"]:
                os.remove(self.sub(".lock"))
                os.rmdir(self.path)

    def lock(self):
        """Refuse a second training process on the same run directory (and a folder that
        is no run directory: :meth:`claim`)."""
        self.claim()
        try:
            fd = os.open(self.sub(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot be a run directory ({os_reason(e, self.path)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                holder = ""
                with contextlib.suppress(OSError):
                    holder = open(self.sub(".lock")).read().strip()
                raise RunDirError(f"{self.path}: in use by another hpcjobs process ({holder or 'unknown'})") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self._lock_fd = _HELD[self.path] = fd

    def unlock(self):
        if self._lock_fd is not None:
            _HELD.pop(self.path, None)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self):
        """The run's lock around a write of run.json: held already by this process (its
        training session), or taken here for the write, waiting for another writer's turn."""
        if self.path in _HELD:
            yield
            return
        self.makedirs()
        fd = os.open(self.sub(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _HELD[self.path] = fd
            yield
        finally:
            _HELD.pop(self.path, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- run.json ---------------------------------------------------------------------
    def read_record(self, strict: bool = False) -> RunRecord:
        """run.json as a RunRecord; an empty one when there is none.  One that cannot be
        read or parsed is empty too, or with ``strict`` a RunDirError saying where and why."""
        try:
            data = read_json_capped(self.run_json, MAX_RUN_JSON, "run.json")
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
        except FileNotFoundError:
            return RunRecord()
        except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError and FileRefused are ValueErrors
            if strict:
                reason = os_reason(e, self.run_json) if isinstance(e, OSError) else str(e).splitlines()[0][:200]
                if isinstance(e, FileRefused):
                    raise RunDirError(str(e)) from None
                raise RunDirError(f"{self.run_json}: unreadable run.json ({reason})") from None
            return RunRecord()
        try:
            return RunRecord.from_dict(data)
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # a field of the wrong shape
            if strict:
                raise RunDirError(f"{self.run_json}: unreadable run.json (unexpected content: {first_line(e)})") from None
            return RunRecord()

    def write_record(self, record: RunRecord):
        """Write run.json (the chief only), under the run's lock."""
        if self.writer:
            record.update(updated=time.time())
            with self.locked():
                atomic_write(self.run_json, json.dumps(record.to_dict(), indent=2) + "\n", fsync=False)

    def update_record(self, **values) -> RunRecord:
        """Read run.json, set ``values`` and write it back, all under the run's lock."""
        with self.locked():
            record = self.read_record()
            record.update(**values)
            self.write_record(record)
        return record

    # -- metrics.csv ------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        try:
            with open(self.metrics_csv, newline="", encoding="utf-8") as f:
                return [{k: float(v) if k not in ("epoch", "step", "stage") else int(v) for k, v in row.items() if v != ""}
                        for row in csv.DictReader(f)]
        except OSError:
            return []

    def write_metrics(self, rows: list[dict]):
        """Rewrite metrics.csv (atomically) from the rows kept so far."""
        if not self.writer:
            return
        buf = io.StringIO()
        fields = [f for f in METRIC_FIELDS if f not in OPTIONAL_FIELDS or any(f in r for r in rows)]
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write(self.metrics_csv, buf.getvalue(), fsync=False)


# --------------------------------------------------------------------------- runs under a folder
def is_run(path: str) -> bool:
    """A run directory (run.json), or a search's (search/results.csv: it has no run.json)."""
    return os.path.isfile(os.path.join(path, "run.json")) or \
        os.path.isfile(os.path.join(path, "search", "results.csv"))


def find_runs(root: str, depth: int = 4, inside: bool = False) -> list[str]:
    """The runs under ``root`` (``root`` itself when it is one), sorted, at most ``depth``
    folders down.  A run's own subfolders (trials, folds) are not listed unless ``inside``."""
    found = []

    def visit(path: str, level: int):
        if is_run(path):
            found.append(path)
            if not inside:
                return
        if level >= depth:
            return
        try:
            entries = sorted((e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if not e.name.startswith(".") and e.name not in ("checkpoints", "tensorboard", "export", "plots"):
                visit(e.path, level + 1)

    visit(root, 0)
    return found


# --------------------------------------------------------------------------- the cancel marker
CANCELLED = "CANCELLED"  # RUN/CANCELLED: written by `hpcjobs cancel`; read by the job scripts (slurm/_job_body.sh)


def cancelled(run_dir: str) -> bool:
    """Whether ``hpcjobs cancel`` marked the run: its jobs neither requeue nor renew, nor start training."""
    return os.path.lexists(os.path.join(run_dir, CANCELLED))


def mark_cancelled(run_dir: str, job_ids: list[str]):
    atomic_write(os.path.join(run_dir, CANCELLED),
                 json.dumps({"cancelled": time.time(), "jobs": job_ids}, indent=2) + "\n")


def clear_cancelled(run_dir: str) -> bool:
    """Forget a cancel (``hpcjobs train`` or ``submit`` on the run again); whether there was one."""
    try:
        os.remove(os.path.join(run_dir, CANCELLED))
        return True
    except (FileNotFoundError, NotADirectoryError):  # no marker, or no run (what is wrong is said later)
        return False


if __name__ == "__main__":  # python -m hpcjobs.rundir finished RUN: exit 0 if the run is finished (the job scripts)
    import sys

    sys.exit(0 if sys.argv[1:2] == ["finished"] and RunDir(sys.argv[2]).read_record().finished else 1)
