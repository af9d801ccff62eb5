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
never sees half a file where a good one was.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import time

from .errors import UserError

METRIC_FIELDS = ["epoch", "step", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds", "val_f1",
                 "stage"]
OPTIONAL_FIELDS = ("stage",)  # a column only in runs that have it (training.stages)


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used (exit code 2): in use, or not a run."""


def os_reason(e: OSError, path: str) -> str:
    """The reason of an OSError in words, with the case of a file in the way spelt out."""
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        parent = path
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if os.path.exists(parent) and not os.path.isdir(parent):
            return f"{parent} is a file"
    return os.strerror(e.errno) if e.errno else (str(e).splitlines() or [type(e).__name__])[0][:200]


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

    def lock(self):
        """Refuse a second training process on the same run directory."""
        self.makedirs()
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
        self._lock_fd = fd

    def unlock(self):
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- run.json ---------------------------------------------------------------------
    def read_status(self, strict: bool = False) -> dict:
        """run.json as a dict; {} when there is none.  One that cannot be read or parsed is
        {} too, or with ``strict`` a RunDirError saying where and why."""
        try:
            with open(self.run_json, encoding="utf-8") as f:
                status = json.load(f)
            if not isinstance(status, dict):
                raise ValueError(f"a JSON {type(status).__name__}, not an object")
            return status
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if strict:
                reason = os_reason(e, self.run_json) if isinstance(e, OSError) else str(e).splitlines()[0][:200]
                raise RunDirError(f"{self.run_json}: unreadable run.json ({reason})") from None
            return {}

    def write_status(self, status: dict):
        if self.writer:
            status = dict(status, updated=time.time())
            atomic_write(self.run_json, json.dumps(status, indent=2, sort_keys=False) + "\n", fsync=False)

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
