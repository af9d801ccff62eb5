"""K-fold cross-validation runs: every fold an ordinary run under ``RUN/folds/fold-I``,
and a summary (mean and std of each test and best metric over the folds) in the
parent's run.json.

``data.folds: K`` with ``data.fold: I`` trains fold I alone: what a task of ``hpcjobs
submit --folds`` does, into RUN/folds/fold-I, updating the parent's summary.  With
``data.fold`` null, ``hpcjobs train`` trains the folds in turn, skipping those already
finished, so a stopped cross-validation continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..config import Config
from ..errors import EX_OK, EX_TEMPFAIL
from ..rundir import RunDir

SUMMARISED = ("test_accuracy", "test_loss", "best")


def fold_dir(run_dir: str, fold: int) -> str:
    return os.path.join(run_dir, "folds", f"fold-{fold}")


def summarize(run_dir: str, k: int) -> dict:
    """run.json fields of a K-fold run from its folds' run.json files."""
    folds = [RunDir(fold_dir(run_dir, i)).read_record() for i in range(k)]
    done = [f for f in folds if f.finished]
    summary = {}
    for key in SUMMARISED:
        values = [f.get(key) for f in done if isinstance(f.get(key), (int, float))]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
    return {"folds": k, "fold_status": [f.status or "not started" for f in folds],
            "fold_summary": summary, "status": "finished" if len(done) == k else "stopped"}


def record_folds(run_dir: str, cfg: Config) -> dict:
    """Write the K-fold summary into the parent's run.json, and return it.  Folds that end
    at the same moment (the tasks of a ``submit --folds`` array) take turns under a lock,
    each reading every fold's run.json after its own was written, so the last word is whole."""
    os.makedirs(os.path.join(run_dir, "folds"), exist_ok=True)
    rd = RunDir(run_dir)
    with rd.locked():
        status = dict(summarize(run_dir, cfg.data.folds), name=cfg.name)
        rd.update_record(**status)
    return status


def parent_of_fold(run_dir: str, cfg: Config) -> str | None:
    """The K-fold run that ``run_dir`` is fold ``data.fold`` of (RUN/folds/fold-I), if it is one."""
    if not cfg.data.folds or cfg.data.fold is None:
        return None
    parent = os.path.dirname(os.path.dirname(os.path.abspath(run_dir)))
    return parent if os.path.abspath(run_dir) == os.path.abspath(fold_dir(parent, cfg.data.fold)) else None


def train_folds(cfg: Config, run_dir: str, train, **kwargs) -> int:
    """Train the folds of ``cfg`` in turn with ``train`` (``job.train``)."""
    k = cfg.data.folds
    RunDir(run_dir).claim()
    for i in range(k):
        sub = fold_dir(run_dir, i)
        if RunDir(sub).read_record().finished:
            continue
        fold_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fold=i))
        print(f"fold {i + 1}/{k}: {sub}", flush=True)
        rc = train(fold_cfg, sub, **kwargs)
        if rc != EX_OK:
            record_folds(run_dir, cfg)
            return rc
    status = record_folds(run_dir, cfg)
    for key, s in status["fold_summary"].items():
        print(f"{k}-fold {key}: mean {s['mean']:.4f} std {s['std']:.4f}", flush=True)
    return EX_OK if status["status"] == "finished" else EX_TEMPFAIL


def fold_table(status: dict) -> list[str]:
    """Lines for ``hpcjobs status`` of a K-fold run."""
    lines = [f"  {status['folds']} folds: " + ", ".join(f"{i}:{s}" for i, s in enumerate(status["fold_status"]))]
    for key, s in status.get("fold_summary", {}).items():
        lines.append(f"  {key}: mean {s['mean']:.4f} std {s['std']:.4f} over {s['n']} fold(s)")
    return lines


