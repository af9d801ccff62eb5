"""Every run under a folder at a glance (``hpcjobs runs [DIR]``), and every job of one run
cancelled (``hpcjobs cancel RUN``).

``runs`` reads the record files only: each run's run.json, and for a search (whose folder
has no run.json of its own) ``search/results.csv`` and ``search/config.yaml``.  It imports
no TensorFlow and asks Slurm nothing, so a folder of many runs is one quick table.

``cancel`` writes the run's cancel marker (``RUN/CANCELLED``, :func:`hpcjobs.rundir.mark_cancelled`)
first, then asks Slurm to stop every job recorded in ``RUN/slurm/jobs.json`` (chain slots,
arrays, trials, inference): a running job gets USR1 in its batch shell, what Slurm sends
before a time limit, so its training stops with a checkpoint; the job script reads the
marker and neither requeues nor submits a next slot.  Pending jobs are cancelled outright.
``hpcjobs train`` (or ``submit``) on the run clears the marker; training resumes from its checkpoint.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess

from ..config import read_yaml
from ..errors import UserError
from ..rundir import MAX_RUN_JSON, cancelled, find_runs, mark_cancelled, read_json_capped
from .jobs import read_jobs

COLUMNS = ["name", "status", "progress", "best", "test_acc", "sessions", "last_job", "stopped_by", "trials",
           "best_trial", "folds"]
def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def run_row(path: str, root: str) -> dict:
    """One row of the table, from the run's record files; ``error`` says what could not be read."""
    name = os.path.relpath(path, root) if os.path.abspath(path) != os.path.abspath(root) \
        else os.path.basename(os.path.abspath(path))
    row = dict.fromkeys(COLUMNS)
    row.update(name=name, path=os.path.abspath(path))
    search_csv = os.path.join(path, "search", "results.csv")
    if not os.path.isfile(os.path.join(path, "run.json")) and os.path.isfile(search_csv):
        row.update(_search_row(path))
    else:
        try:
            st = read_json_capped(os.path.join(path, "run.json"), MAX_RUN_JSON, "run.json")
            if not isinstance(st, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            row.update(status="unreadable", error=str(e).splitlines()[0][:200])
            return row
        row.update(_run_fields(st))
    jobs = read_jobs(path)
    if jobs and not row.get("last_job"):
        row["last_job"] = str(jobs[-1].get("job_id"))
    if cancelled(path):
        row["status"] = f"{row['status']} (cancelled)"
    return row


def _run_fields(st: dict) -> dict:
    sessions = st.get("sessions") if isinstance(st.get("sessions"), list) else []
    last = sessions[-1] if sessions and isinstance(sessions[-1], dict) else {}
    out = dict(status=st.get("status") or "?", sessions=len(sessions), last_job=last.get("job_id"),
               stopped_by=last.get("stopped_by"), step=st.get("step"), total_steps=st.get("total_steps"),
               monitor=st.get("monitor"), best=_num(st.get("best")), test_acc=_num(st.get("test_accuracy")))
    step, total = st.get("step"), st.get("total_steps")
    if isinstance(total, int):
        out["progress"] = f"{step or 0}/{total}"
    chain = st.get("chain")
    if isinstance(chain, dict) and chain.get("ended"):
        out["stopped_by"] = f"{out['stopped_by']}; chain ended"
    if isinstance(st.get("folds"), int):
        k = st["folds"]
        done = sum(1 for s in st.get("fold_status", []) if s == "finished")
        summary = st.get("fold_summary") or {}
        out["progress"] = f"{done}/{k} folds"
        for key, column in (("test_accuracy", "test_acc"), ("best", "best")):
            s = summary.get(key)
            if isinstance(s, dict) and _num(s.get("mean")) is not None:
                out[column] = None
                out[f"{column}_mean"], out[f"{column}_std"] = s["mean"], s.get("std", 0.0)
        acc = summary.get("test_accuracy")
        if isinstance(acc, dict) and _num(acc.get("mean")) is not None:
            out["folds"] = f"{acc['mean']:.4f} ± {acc.get('std', 0.0):.4f} (n={acc.get('n', done)})"
    return out


def _search_row(path: str) -> dict:
    search_dir = os.path.join(path, "search")
    try:
        with open(os.path.join(search_dir, "results.csv"), newline="", encoding="utf-8") as f:
            table = list(csv.DictReader(f))
        raw = read_yaml(os.path.join(search_dir, "config.yaml"))
    except (OSError, ValueError, UserError) as e:
        return dict(status="unreadable", error=str(e).splitlines()[0][:200])
    search = raw.get("search") or {}
    metric, total = search.get("metric", "val_accuracy"), search.get("trials")
    maximize = search.get("direction", "auto") == "max" or (search.get("direction", "auto") == "auto"
                                                            and str(metric).endswith(("accuracy", "f1")))
    try:
        from ..config import from_dict
        from ..search.space import total_trials

        s = from_dict(raw, os.path.join(search_dir, "config.yaml")).search
        metric, maximize, total = s.metric, s.maximize, total_trials(s)
    except (UserError, ValueError, TypeError):
        pass
    done = [r for r in table if r.get("status") in ("complete", "pruned", "failed")]
    scored = [r for r in table if r.get("status") == "complete" and r.get("value")]
    best = None
    if scored:
        best = (max if maximize else min)(scored, key=lambda r: float(r["value"]))
    running = any(r.get("status") == "running" for r in table)
    finished = total is not None and len(done) >= total and not running
    return dict(status="finished" if finished else ("running" if running else "stopped"), kind="search",
                trials=f"{len(done)}/{total if total is not None else '?'}", monitor=metric,
                best=float(best["value"]) if best else None,
                best_trial=f"{best['trial']} ({metric} {float(best['value']):.4g})" if best else None,
                sessions=sum(int(r.get("sessions") or 0) for r in table))


def rows(root: str) -> list[dict]:
    return [run_row(p, root) for p in find_runs(root)]


def _cell(row: dict, column: str) -> str:
    if column in ("best", "test_acc") and row.get(f"{column}_mean") is not None:
        return f"{row[f'{column}_mean']:.4f} ± {row[f'{column}_std']:.4f}"
    v = row.get(column)
    if v is None:
        return "-"
    if column == "best" and isinstance(v, float):
        return f"{v:.4f}" + (f" {row['monitor']}" if row.get("monitor") else "")
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table_lines(table: list[dict]) -> list[str]:
    cols = [c for c in COLUMNS if c in ("name", "status", "progress") or any(r.get(c) is not None
                                                                                 or r.get(f"{c}_mean") is not None
                                                                                 for r in table)]
    cells = [[_cell(r, c) for c in cols] for r in table]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return lines


# --------------------------------------------------------------------------- cancel
def _scancel(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["scancel", *args], capture_output=True, text=True, timeout=60)


def cancel(run_dir: str) -> list[str]:
    """Mark the run cancelled, then stop every job recorded for it; the lines to print."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run directory")
    jobs = list(dict.fromkeys(str(j["job_id"]) for j in read_jobs(run_dir) if j.get("job_id")))
    if not jobs:
        raise UserError(f"{os.path.join(run_dir, 'slurm', 'jobs.json')}: no jobs recorded for this run "
                        "(hpcjobs cancel stops the jobs that hpcjobs submit queued)")
    if not shutil.which("scancel"):
        raise UserError("scancel: not found on PATH: run this on a Slurm login node (or load its module)")
    mark_cancelled(run_dir, jobs)  # first: a job that ends from now on neither requeues nor renews
    lines = [f"{run_dir}: cancelled; {len(jobs)} job(s) recorded"]
    for job in jobs:
        pending = _scancel(["--state=PENDING", job])
        running = _scancel(["--batch", "--signal=USR1", "--state=RUNNING", job])
        problems = [p.stderr.strip().splitlines()[-1] for p in (pending, running)
                    if p.returncode != 0 and p.stderr.strip()]
        lines.append(f"  job {job}: pending cancelled, running told to stop with a checkpoint"
                     + (f" ({'; '.join(problems)})" if problems else ""))
    lines.append(f"  resume later with: hpcjobs train {os.path.join(run_dir, 'config.yaml')} --run-dir {run_dir}")
    return lines


def rows_json(table: list[dict]) -> str:
    return json.dumps(table, indent=2, default=str, ensure_ascii=False)

