"""What a search leaves to read: RUN/search/results.csv, best.yaml, plots/ and TensorBoard HParams.

One row per trial: its number, status (complete, pruned, failed, running), the
parameters, the best value of the metric over its epochs, epochs, steps, seconds,
sessions, and the handbook's signs over its learning curve (``nan``, ``diverging``,
``plateau``, ``bouncing``; :func:`hpcjobs.train.hooks.diagnose`).  Every worker rewrites
the files (atomically) from the journal and the trial run directories after each
trial, so they are never older than the last finished trial.
"""
from __future__ import annotations

import csv
import io
import math
import os

import yaml

from ..config import Config, to_dict
from ..record import RunRecord
from ..rundir import RunDir, atomic_write
from ..train.hooks import diagnose

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "running"}
FIELDS = ["trial", "status", "value", "epochs", "steps", "seconds", "sessions", "signs"]


def best_value(history: list[dict], search) -> float | None:
    values = [r[search.metric] for r in history if isinstance(r.get(search.metric), float)
              and math.isfinite(r[search.metric])]
    if not values:
        return None
    return max(values) if search.maximize else min(values)


def signs(history: list[dict], record: RunRecord, cfg: Config) -> list[str]:
    """The handbook's signs over a trial's whole learning curve (first epoch order)."""
    found = []
    if "loss became" in str(record.error or "") or any(
            not math.isfinite(r.get("loss", 0.0)) for r in history):
        found.append("nan")
    for i in range(len(history)):
        for sign in diagnose(history[:i + 1], cfg.training.diagnose):
            if sign not in found:
                found.append(sign)
    return found


def _seconds(record: RunRecord) -> float:
    total = 0.0
    for s in record.sessions:
        end = s.end or record.updated or s.start or 0
        total += max(0.0, end - (s.start or end))
    return total


def rows(study, cfg: Config, paths) -> list[dict]:
    out = []
    for t in study.get_trials(deepcopy=False):
        rd = RunDir(paths.trial(t.number))
        record, history = rd.read_record(), rd.read_metrics()
        row = dict(trial=t.number, status=STATES.get(t.state.name, t.state.name.lower()),
                   value=best_value(history, cfg.search), epochs=history[-1]["epoch"] if history else 0,
                   steps=record.step or 0, seconds=round(_seconds(record), 1),
                   sessions=len(record.sessions), signs=";".join(signs(history, record, cfg)))
        row.update({k: t.params.get(k) for k in cfg.search.space})
        row["error"] = t.user_attrs.get("error", "")
        if not os.path.isdir(rd.path) and t.state.is_finished():  # say what was damaged, keep what the journal knows
            row["value"] = row["value"] if row["value"] is not None else t.value
            row["error"] = f"{rd.path} is missing (deleted?): its metrics and checkpoints are lost" \
                + (f"; {row['error']}" if row["error"] else "")
        row["history"] = history
        out.append(row)
    return out


def ranked(table: list[dict], search) -> list[dict]:
    """Complete trials best first, then pruned ones by value, then the rest."""
    order = {"complete": 0, "pruned": 1, "running": 2, "failed": 3}

    def key(r):
        v = r["value"]
        missing = v is None
        return (order.get(r["status"], 4), missing, 0 if missing else (-v if search.maximize else v))
    return sorted(table, key=key)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def write_csv(table: list[dict], cfg: Config, path: str):
    buf = io.StringIO()
    fields = FIELDS[:2] + list(cfg.search.space) + FIELDS[2:] + ["error"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in sorted(table, key=lambda r: r["trial"]):
        w.writerow({k: _fmt(r.get(k)) for k in fields})
    atomic_write(path, buf.getvalue(), fsync=False)


def best_config_text(cfg: Config, best: dict) -> str:
    """The base config with the best trial's parameters, its full training.epochs, no search."""
    from .space import _set

    values = to_dict(cfg)
    values.pop("search", None)
    values["name"] = f"{cfg.name}-best"
    for key in cfg.search.space:
        _set(values, key, best[key])
    head = (f"# the best trial of search {cfg.name}: trial {best['trial']}, {cfg.search.metric} "
            f"{best['value']:.6g} after {best['epochs']} epoch(s)\n# train it: hpcjobs train THIS_FILE\n")
    return head + yaml.safe_dump(values, sort_keys=False)


def write_all(study, cfg: Config, paths) -> list[dict]:
    """results.csv, best.yaml (once a trial is complete), plots and HParams."""
    table = rows(study, cfg, paths)
    write_csv(table, cfg, os.path.join(paths.search, "results.csv"))
    done = [r for r in ranked(table, cfg.search) if r["status"] == "complete" and r["value"] is not None]
    if done:
        atomic_write(os.path.join(paths.search, "best.yaml"), best_config_text(cfg, done[0]), fsync=False)
    from . import plots

    plots.plot_all(table, cfg, os.path.join(paths.search, "plots"))
    plots.hparams(table, cfg, os.path.join(paths.search, "tensorboard"))
    return table


def read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def status_lines(run: str) -> list[str]:
    """``hpcjobs status RUN`` of a search: the table from results.csv, best first."""
    from ..config import read_yaml
    from ..config import from_dict

    search_dir = os.path.join(run, "search")
    cfg = from_dict(read_yaml(os.path.join(search_dir, "config.yaml")), os.path.join(search_dir, "config.yaml"))
    table = read_csv(os.path.join(search_dir, "results.csv"))
    for r in table:
        r["value"] = float(r["value"]) if r["value"] else None
        r["trial"] = int(r["trial"])
    table = ranked(table, cfg.search)
    counts = {s: sum(1 for r in table if r["status"] == s) for s in ("complete", "pruned", "failed", "running")}
    from .space import total_trials

    lines = [f"search {cfg.name}: {len(table)}/{total_trials(cfg.search)} trials ("
             + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"), {cfg.search.method}, "
             f"{'max' if cfg.search.maximize else 'min'} {cfg.search.metric}"]
    cols = ["trial", "status", cfg.search.metric] + list(cfg.search.space) + ["epochs", "steps", "seconds",
                                                                              "sessions", "signs"]
    cells = [[str(r["trial"]), r["status"], _fmt(r["value"])] + [r.get(k, "") for k in cols[3:]] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    if os.path.exists(os.path.join(search_dir, "best.yaml")):
        lines.append(f"  best config: {os.path.join(search_dir, 'best.yaml')}")
    return lines
