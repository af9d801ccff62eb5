"""``hpcjobs submit --prepare`` and ``--after-prepare`` (issue 26 item 3): the rendered
scripts pinned by a reference file, the prepare job recorded where ``--after-prepare``
finds it, and on the local Slurm cluster a prepare job cut once (USR1 to its batch shell
after its first chunk is committed: what Slurm sends before a time limit), requeued,
finished, and only then the training job that waits for it (afterok)."""
from __future__ import annotations

import os
import subprocess

import pytest

from hpcjobs import cli, slurm

from conftest import FASHION, LEAN, QUICKSTART, REPO, need_fashion_mnist
from slurm_cluster import job_done, logs, squeue_states, status, wait_for

PY = "/opt/venv/bin/python"
DATA = os.path.join(REPO, "tests", "data")
REFERENCE = "sbatch_bede_prepare.txt"
ARGV = ["configs/bede.yaml", "--prepare", "--after-prepare", "--cpus-per-task", "8",
        "--set", "data.store=/scratch/stores/bede.h5", "--set", "slurm.prepare_partition=cpu",
        "--set", "slurm.prepare_time=12h", "--run-dir", "/scratch/runs/bede"]


def submit(argv: list[str]) -> int:
    return cli.main(["submit", *argv])


def test_dry_run_of_prepare_then_training_matches_reference(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert submit([*ARGV, "--python", PY, "--dry-run"]) == 0
    out = capsys.readouterr().out
    path = os.path.join(DATA, REFERENCE)
    if os.environ.get("HPCJOBS_UPDATE_REFERENCE"):
        with open(path, "w", encoding="utf-8") as f:
            f.write(out)
    with open(path, encoding="utf-8") as f:
        assert out == f.read(), f"rendered output differs from {path} (HPCJOBS_UPDATE_REFERENCE=1 rewrites it)"
    prepare, training = out.split("# then, after the prepare job (sbatch --dependency=afterok:<prepare job>):\n")
    assert "#SBATCH --partition=cpu" in prepare and "#SBATCH --cpus-per-task=8" in prepare
    assert "#SBATCH --time=12:00:00" in prepare and "#SBATCH --requeue" in prepare
    assert "STEP=(prepare \"$CONFIG\" --output \"$STORE\")" in prepare and "STORE=/scratch/stores/bede.h5" in prepare
    assert "--gpus-per-node" not in prepare and "--gpus-per-node=4" in training
    assert 'STEP=(train "$CONFIG"' in training


def test_after_prepare_finds_the_recorded_job_and_reads_its_store(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    calls = []

    def fake_sbatch(script, extra=()):
        calls.append((os.path.basename(script), list(extra)))
        return str(100 + len(calls))

    monkeypatch.setattr(slurm, "_sbatch", fake_sbatch)
    monkeypatch.chdir(tmp_path)
    # no prepare job recorded yet: one line naming the flag, exit 2
    assert submit([QUICKSTART, "--after-prepare", "--run-dir", str(run)]) == 2
    assert "--after-prepare" in capsys.readouterr().err
    assert submit([QUICKSTART, "--prepare", "--run-dir", str(run), "--cpus-per-task", "2"]) == 0
    assert submit([QUICKSTART, "--after-prepare", "--run-dir", str(run)]) == 0
    assert calls == [("prepare.sbatch", []), ("train.sbatch", ["--dependency=afterok:101"])]
    jobs = slurm.read_jobs(str(run))
    assert jobs[0]["kind"] == "prepare" and jobs[0]["store"] == str(tmp_path / "stores" / "quickstart.h5")
    from hpcjobs import config

    assert config.load(str(run / "config.yaml")).data.store == jobs[0]["store"]
    assert config.load(str(run / "prepare-config.yaml")).data.store is None
    assert "#SBATCH --cpus-per-task=2" in (run / "slurm" / "prepare.sbatch").read_text()


def _chunks(store: str) -> int:
    try:
        return sum(n.endswith(".npz") and not n.startswith(".tmp-") for n in os.listdir(f"{store}.partial"))
    except FileNotFoundError:
        return 0


@pytest.mark.slurm
def test_prepare_job_cut_by_its_time_limit_requeues_finishes_and_then_training_runs(on_cluster, tmp_path):
    need_fashion_mnist()
    run = tmp_path / "run"
    sets = [f"data.source={FASHION}", "data.image_size=[32, 32]", "data.max_per_class=30", "training.epochs=1", *LEAN]
    set_args = [a for s in sets for a in ("--set", s)]
    assert submit([QUICKSTART, "--prepare", "--after-prepare", "--run-dir", str(run), "--cpus-per-task", "2",
                   "--time", "20", *set_args]) == 0
    prep, train = slurm.read_jobs(str(run))
    assert prep["kind"] == "prepare" and train["sbatch_args"] == [f"--dependency=afterok:{prep['job_id']}"]
    store, job = prep["store"], prep["job_id"]
    # its first chunk committed (70 in all, at most 4 under way): Slurm's warning signal now
    wait_for(lambda: _chunks(store) >= 1 or job_done(job), 600, "the prepare job's first chunk", job, run)
    assert not job_done(job), logs(run)[-4000:]
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, capture_output=True)
    wait_for(lambda: "requeueing job" in logs(run) or job_done(job), 300, "the prepare job to requeue", job, run)
    assert squeue_states(train["job_id"]) == ["PENDING"]  # training waits for the prepare job
    wait_for(lambda: job_done(train["job_id"]), 900, "the training job to finish", train["job_id"], run)
    text = logs(run)
    assert "prepare exited with 75" in text and "restart 1," in text and "continuing at " in text, text[-4000:]
    assert "prepare exited with 0" in text, text[-4000:]
    assert status(run).get("status") == "finished", text[-4000:]
    assert os.path.isfile(store) and not os.path.exists(f"{store}.partial")
    from hpcjobs.data import open_store

    data = open_store(store)
    assert sum(len(data.splits[s]) for s in ("train", "val", "test")) == 70000
    data.close()
