"""The run record: run.json, typed.

``RunRecord`` names the fields run.json has (its status, steps and sessions, the best epoch,
the test metrics) and keeps every other key as it is (``extra``: a hook's summary, or a
field that a later version adds), so an old reader reads a newer record and a new reader an
old one.  run.json carries ``format_version``; one written before it had one is version 1.
Only ``hpcjobs.rundir.RunDir`` reads and writes the file (``read_record``, ``write_record``,
``update_record``), each write under the run's lock.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields

RECORD_VERSION = 2  # 1: run.json before it had a version (every field as in 2)


class _Fields:
    """A dataclass read from and written to JSON: the fields it names are typed; any other
    key (a hook's summary, or a field of a later version) is kept in ``extra`` as it is.
    A field is written when it was read or set, so null stays null and absent stays absent."""

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in fields(cls)} - {"extra", "version"}
        obj = cls(**{k: v for k, v in data.items() if k in names})
        obj.extra = {k: v for k, v in data.items() if k not in names}
        obj._given = {k for k in data if k in names}
        return obj

    def update(self, **values):
        for k, v in values.items():
            if k in self._names():
                setattr(self, k, v)
                self._given.add(k)
            else:
                self.extra[k] = v

    def get(self, key: str, default=None):
        """A field by name (named or extra), None counting as missing."""
        value = getattr(self, key, None) if key in self._names() else self.extra.get(key)
        return default if value is None else value

    def _names(self) -> set:
        return {f.name for f in fields(self)} - {"extra", "version"}

    def to_dict(self) -> dict:
        return dict({f.name: getattr(self, f.name) for f in fields(self) if f.name in self._given}, **self.extra)


@dataclass
class SessionEntry(_Fields):
    """One session of a run: when and where it ran, and how it ended."""
    start: float | None = None
    start_step: int = 0
    end: float | None = None
    end_step: int | None = None
    stopped_by: str | None = None
    job_id: str | None = None
    host: str | None = None
    # what the session cost: startup_seconds, first_call_seconds, longest_call_seconds, save_seconds
    # (hpcjobs.cluster.costs reads them; written by hpcjobs.train.session)
    costs: dict | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self._given = set()

    @classmethod
    def begin(cls, job_id: str | None) -> "SessionEntry":
        """A session starting now, here; every field of it is written."""
        entry = cls(start=time.time(), job_id=job_id, host=os.uname().nodename)
        entry._given = set(entry._names()) - {"costs"}  # written once there is a figure
        return entry


@dataclass
class RunRecord(_Fields):
    """run.json: what a run is (its status, steps, sessions) and what it reached (the best
    epoch, the test metrics).  Every read and write goes through it (``RunDir.read_record``,
    ``write_record``, ``update_record``); a run.json without ``format_version`` is version 1."""
    status: str | None = None  # running | stopped | finished | failed
    name: str | None = None
    sessions: list = field(default_factory=list)  # SessionEntry
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    step: int | None = None
    epoch: float | None = None
    feed: str | None = None
    strategy: str | None = None
    replicas: int | None = None
    weights_sha256: str | None = None
    best: float | None = None
    best_epoch: int | None = None
    monitor: str | None = None
    final_weights: str | None = None
    error: str | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    test_f1: float | None = None
    updated: float | None = None
    version: int = RECORD_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self._given = set()
        self.sessions = [s if isinstance(s, SessionEntry) else SessionEntry.from_dict(s) for s in self.sessions]

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        record = super().from_dict({k: v for k, v in data.items() if k != "format_version"})
        record.version = data.get("format_version", 1)
        return record

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["sessions"] = [s.to_dict() for s in self.sessions]
        if not self.sessions and "sessions" not in self._given:
            del out["sessions"]
        return dict(format_version=RECORD_VERSION, **out)

    def is_empty(self) -> bool:
        """No run.json, or one that says nothing."""
        return not self._given and not self.extra and not self.sessions

    @property
    def finished(self) -> bool:
        """Whether the run is done: the one test of it (the CLI, submit and the job scripts)."""
        return self.status == "finished"

    def drop(self, key: str):
        """Forget a field (written no more)."""
        if key in self._names():
            setattr(self, key, None)
            self._given.discard(key)
        self.extra.pop(key, None)
