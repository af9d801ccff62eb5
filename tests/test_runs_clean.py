"""``hpcjobs runs`` (a table of every run under a folder, from record files only) and
``hpcjobs clean`` (free the space of finished runs) (issue 27 item 3).

The folder of runs: one real run (trained here, with three checkpoints kept) and copies of
its run.json with fields altered (stopped, failed, running, cancelled, a K-fold parent), plus
a search folder (search/results.csv and search/config.yaml written as a worker writes them):
49 runs and a search.  ``clean`` works on whole copies of the real run."""
from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from hpcjobs import cli

import forked
from conftest import QUICKSTART


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A finished quickstart run with every epoch checkpointed: max_to_keep (3) checkpoints at the end."""
    run = tmp_path_factory.mktemp("real") / "finished"
    p = forked.run(["train", QUICKSTART, "--run-dir", run, "--set", "training.epochs=4", "--set",
                    "checkpoint.every_epochs=1", "--set", "checkpoint.every_minutes=null"], env=_env(), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def _write_record(run_dir, record: dict):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(record, f)


SEARCH_CONFIG = f"""base: {QUICKSTART}
name: hp
search:
  method: random
  trials: 4
  metric: val_f1
  epochs: 1
  space:
    optimizer.learning_rate: {{log_uniform: [1.0e-3, 1.0e-2]}}
"""


@pytest.fixture(scope="module")
def many(real_run, tmp_path_factory):
    """49 runs and a search; returns (folder, {name: what its row must say})."""
    from hpcjobs import config

    root = tmp_path_factory.mktemp("many") / "runs"
    base = json.loads((real_run / "run.json").read_text())
    shutil.copytree(real_run, root / "finished-00")
    expect = {"finished-00": dict(status="finished", progress=f"{base['step']}/{base['total_steps']}",
                                  test_acc=base["test_accuracy"], best=base["best"], sessions=1)}
    for i in range(1, 49):
        r = copy.deepcopy(base)
        kind = ["finished", "stopped", "failed", "running", "cancelled", "folds"][i % 6]
        name = f"{kind}-{i:02d}"
        r["test_accuracy"] = round(0.5 + i / 100, 4)
        r["sessions"][0]["job_id"] = str(1000 + i)
        if kind in ("stopped", "cancelled", "running"):
            r["status"] = "stopped" if kind != "running" else "running"
            r["step"] = i
            r["sessions"][0]["stopped_by"] = "SIGUSR1" if kind != "running" else None
            r["sessions"].append(dict(r["sessions"][0], job_id=str(2000 + i), stopped_by="SIGUSR1"))
            del r["test_accuracy"]
        if kind == "failed":
            r["status"], r["error"] = "failed", "loss became nan"
            r["sessions"][0]["stopped_by"] = "error"
        if kind == "folds":
            accs = [0.9, 0.92, 0.94]
            r.update(folds=3, fold_status=["finished"] * 3, status="finished",
                     fold_summary={"test_accuracy": {"mean": sum(accs) / 3, "std": 0.0163, "n": 3}})
        _write_record(root / name, r)
        if kind == "cancelled":
            (root / name / "CANCELLED").write_text("{}")
        row = dict(status=r["status"] + (" (cancelled)" if kind == "cancelled" else ""),
                   sessions=len(r["sessions"]), last_job=r["sessions"][-1]["job_id"],
                   stopped_by=r["sessions"][-1]["stopped_by"])
        if kind == "folds":
            row.update(progress="3/3 folds", test_acc_mean=0.92)
        else:
            row.update(progress=f"{r['step']}/{r['total_steps']}", test_acc=r.get("test_accuracy"))
        expect[name] = row
    # a search: its folder has no run.json, only search/results.csv and search/config.yaml
    search = root / "group" / "hp" / "search"
    os.makedirs(search)
    source = root.parent / "hp.yaml"
    source.write_text(SEARCH_CONFIG)
    (search / "config.yaml").write_text(config.dump(config.load(str(source))))
    (search / "results.csv").write_text("trial,status,optimizer.learning_rate,value,epochs,steps,seconds,sessions,"
                                        "signs,error\n0,complete,0.002,0.91,1,44,3.1,1,,\n"
                                        "1,pruned,0.009,0.42,1,44,2.9,1,,\n2,complete,0.004,0.95,1,44,3.0,2,,\n"
                                        "3,running,0.001,,0,0,0,1,,\n")
    expect["group/hp"] = dict(status="running", trials="3/4", best=0.95, best_trial="2 (val_f1 0.95)",
                              sessions=5)
    return root, expect


def _runs_in_a_fresh_process(*argv) -> subprocess.CompletedProcess:
    code = ("import sys; from hpcjobs import cli; rc = cli.main(['runs', *sys.argv[1:]]); "
            "heavy = [m for m in ('tensorflow', 'keras', 'optuna') if m in sys.modules]; "
            "assert not heavy, heavy; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], env=_env(), capture_output=True, text=True,
                          timeout=120)


def test_runs_lists_every_run_from_its_records_without_tensorflow(many):
    root, expect = many
    p = _runs_in_a_fresh_process(root, "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert set(rows) == set(expect) and len(rows) == 50
    for name, want in expect.items():
        for key, value in want.items():
            got = rows[name].get(key)
            if isinstance(value, float):
                assert got == pytest.approx(value), (name, key, rows[name])
            else:
                assert got == value, (name, key, rows[name])
    p = _runs_in_a_fresh_process(root)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "status", "progress"] and len(lines) == 51
    folds = next(line for line in lines if line.startswith("folds-05 "))
    assert "0.9200 ± 0.0163" in folds
    hp = next(line for line in lines if line.startswith("group/hp "))
    assert "3/4" in hp and "2 (val_f1 0.95)" in hp
    assert "stopped (cancelled)" in next(line for line in lines if line.startswith("cancelled-04 "))


def test_runs_on_a_missing_folder_is_one_line(tmp_path, capsys):
    assert cli.main(["runs", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err and len(err.strip().splitlines()) == 1


def _files(folder) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
            for d, _, names in os.walk(folder) for f in names}


def test_clean_dry_run_then_clean_removes_exactly_that_and_the_run_still_works(real_run, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(real_run, root / "done")
    shutil.copytree(real_run, root / "stopped")
    record = json.loads((root / "stopped" / "run.json").read_text())
    record["status"] = "stopped"
    _write_record(root / "stopped", record)
    ckpts = sorted(n for n in os.listdir(root / "done" / "checkpoints") if n.startswith("ckpt-") and
                   n.endswith(".index"))
    assert len(ckpts) == 3, ckpts  # max_to_keep: the test means something only if there are old ones
    before = {"done": _files(root / "done"), "stopped": _files(root / "stopped")}

    assert cli.main(["clean", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert listed and all(p.startswith("checkpoints/") for p in listed), out
    assert f"{root / 'stopped'}: left as it is (stopped, not finished)" in out
    freed = sum(before["done"][p] for p in listed)
    assert f"would free" in out and f"({freed} bytes)" in out
    assert {"done": _files(root / "done"), "stopped": _files(root / "stopped")} == before  # dry run: nothing gone

    assert cli.main(["clean", str(root)]) == 0
    out = capsys.readouterr().out
    after = _files(root / "done")
    gone = set(before["done"]) - set(after)
    assert gone == set(listed), (gone, listed)
    assert f"freed" in out and f"({freed} bytes)" in out
    assert _files(root / "stopped") == before["stopped"]
    latest = json.loads((real_run / "run.json").read_text())
    kept = set(after)
    assert f"checkpoints/best/epoch-{latest['best_epoch']:05d}.weights.h5" in kept
    assert any(p.startswith("export/model.keras") for p in kept)
    last = max(ckpts, key=lambda n: int(n[5:-6]))
    assert f"checkpoints/{last}" in kept and all(f"checkpoints/{c}" in gone for c in ckpts if c != last)
    state = (root / "done" / "checkpoints" / "checkpoint").read_text()
    assert state.count("all_model_checkpoint_paths") == 1 and last[:-6] in state

    # the cleaned run still exports (from its best epoch and from its last checkpoint), evaluates and infers
    assert cli.main(["export", str(root / "done"), "--output", str(tmp_path / "exp-best")]) == 0
    assert cli.main(["export", str(root / "done"), "--from", "latest", "--output", str(tmp_path / "exp-last")]) == 0
    assert cli.main(["evaluate", str(root / "done"), "--output", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["accuracy"] == \
        pytest.approx(latest["test_accuracy"])
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images[:40] * (255.0 / 16.0)).astype(np.uint8)[..., None]  # as the digits source
    np.savez(tmp_path / "digits.npz", images=images)
    out_csv = tmp_path / "preds.csv"
    assert cli.main(["infer", "--model", str(root / "done"), "--input", str(tmp_path / "digits.npz"),
                     "--output", str(out_csv)]) == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40
    assert sum(r["class"] == str(y) for r, y in zip(rows, digits.target[:40])) >= 30
    assert cli.main(["clean", str(root / "done")]) == 0  # again: nothing left to remove
    assert "nothing to remove" in capsys.readouterr().out
