"""A search seen in optuna-dashboard (issue 27 item 4): the study carries the run's name and its
metric's name, each trial its run directory, steps and epochs; ``search.metric`` may be val_f1;
a journal written before (its study named ``search``, no metric names) still loads and resumes.

optuna-dashboard 0.21 is started on a finished search's journal on a loopback port, while it
is read as it is: its API must list every trial with the metric's name."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

import forked
from conftest import QUICKSTART

SEARCH = """
name: dash
search:
  method: random
  trials: {trials}
  epochs: 1
  metric: val_f1
  space:
    optimizer.learning_rate: {{log_uniform: [1.0e-3, 1.0e-2]}}
"""


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def _hpcjobs(*argv, timeout=900):
    """``hpcjobs ARGV`` in a process of its own (forked.py): its exit code, stdout and stderr."""
    return forked.run(argv, env=_env(), timeout=timeout)


def _config(folder, trials: int) -> str:
    path = folder / "dash.yaml"
    # the trials without their training plots (conftest.LEAN)
    path.write_text(f"base: {QUICKSTART}\nexport:\n  plots: false\n" + textwrap.dedent(SEARCH.format(trials=trials)))
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dash")
    run = folder / "run"
    p = _hpcjobs("search", _config(folder, 2), "--run-dir", run)
    assert p.returncode == 0, p.stderr[-3000:]
    return folder, run


def _study(run):
    import optuna

    from hpcjobs.search import journal

    storage = journal.storage(str(run / "search" / "journal.log"))
    name, = [s.study_name for s in storage.get_all_studies()]
    return optuna.load_study(study_name=name, storage=storage)


def test_the_study_has_the_run_s_name_its_metric_and_each_trial_its_run(finished):
    _, run = finished
    study = _study(run)
    assert study.study_name == "dash" and study.metric_names == ["val_f1"]
    with open(run / "search" / "results.csv", newline="") as f:
        rows = {int(r["trial"]): r for r in csv.DictReader(f)}
    assert len(study.trials) == 2 == len(rows)
    for t in study.trials:
        trial_dir = run / "trials" / f"{t.number:03d}"
        record = json.loads((trial_dir / "run.json").read_text())
        with open(trial_dir / "metrics.csv", newline="") as f:
            history = list(csv.DictReader(f))
        assert t.user_attrs["run_dir"] == str(trial_dir)
        assert t.user_attrs["steps"] == record["step"] > 0
        assert t.user_attrs["epochs"] == int(history[-1]["epoch"]) == 1
        assert t.value == pytest.approx(max(float(r["val_f1"]) for r in history))  # ranked by macro-F1
        assert float(rows[t.number]["value"]) == pytest.approx(t.value, rel=1e-5)


def test_a_journal_from_before_with_its_study_named_search_loads_and_resumes(finished, tmp_path):
    folder, run = finished
    old = tmp_path / "old"
    shutil.copytree(run, old)
    journal_path = old / "search" / "journal.log"
    lines = []
    for line in journal_path.read_text().splitlines():  # as written before: study 'search', no metric names
        op = json.loads(line)
        if op.get("study_name") == "dash":
            op["study_name"] = "search"
        if "study:metric_names" in json.dumps(op.get("system_attr", {})):
            continue
        lines.append(json.dumps(op, separators=(",", ":")))
    journal_path.write_text("\n".join(lines) + "\n")
    assert _study(old).study_name == "search" and _study(old).metric_names is None
    before = {t.number: t.value for t in _study(old).trials}
    p = _hpcjobs("search", _config(folder, 2), "--run-dir", old, "--set", "search.trials=3")
    assert p.returncode == 0, p.stderr[-3000:]
    study = _study(old)
    assert study.study_name == "search" and study.metric_names == ["val_f1"]
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert {t.number: t.value for t in study.trials[:2]} == before  # the old trials kept, not trained again
    for i in range(2):
        assert len(json.loads((old / "trials" / f"{i:03d}" / "run.json").read_text())["sessions"]) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_optuna_dashboard_lists_every_trial_with_the_metric_s_name(finished):
    pytest.importorskip("optuna_dashboard")
    _, run = finished
    port = _free_port()
    exe = shutil.which("optuna-dashboard") or ""
    argv = [exe] if exe else [sys.executable, "-m", "optuna_dashboard"]
    server = subprocess.Popen([*argv, str(run / "search" / "journal.log"), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        studies = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        assert studies is not None, server.communicate(timeout=10)[0][-3000:] if server.poll() is not None else ""
        assert [s["study_name"] for s in studies] == ["dash"]
        detail = _get(f"{base}/api/studies/{studies[0]['study_id']}")
        assert detail["objective_names"] == ["val_f1"]
        study = _study(run)
        assert sorted(t["number"] for t in detail["trials"]) == [t.number for t in study.trials]
        for t in detail["trials"]:
            attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
            assert attrs["run_dir"] == str(run / "trials" / f"{t['number']:03d}")
            assert {"steps", "epochs"} <= set(attrs)
            assert t["state"] == "Complete" and t["values"] == [pytest.approx(study.trials[t["number"]].value)]
    finally:
        server.terminate()
        server.wait(timeout=30)
