"""Training jobs on the real local Slurm cluster (slurm/local-cluster.sh): two nodes under
MultiWorkerMirrored and under Horovod with mpirun, stops by Slurm's signals with requeues
that end bitwise equal to an uninterrupted run, and submitit's API.

Every stop is caused by the test (USR1 to the batch shell, or Slurm's own warning under a
limit no training can outlast), never by betting that training is slow or fast enough."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hpcjobs import cli, config, slurm

from conftest import HOLD_AT, HOLD_HOOK, LEAN, LEAN_ARGS, QUICKSTART, need_horovod
from forked import Forked
from slurm_cluster import job_done, last_job, logs, squeue_states, status, stop_twice_by_signal, wait_for


# the first two sessions of a requeued job hold after the calls reaching steps 15 and 35 until
# their stop signal (tests/hold_for_signal.py); the uninterrupted reference trains straight through
HOLD = [HOLD_HOOK]
STOPS = (HOLD_AT, "15,35")


def submit(argv: list[str]) -> int:
    return cli.main(["submit", *argv])


@pytest.mark.slurm
def test_two_node_multiworker_job_trains_to_identical_weights(on_cluster, tmp_path):
    run = tmp_path / "mw"
    assert submit([QUICKSTART, "--run-dir", str(run), "--nodes", "2", "--time", "5",
                   "--set", "distribute.strategy=multiworker", "--set", "training.epochs=1", *LEAN_ARGS]) == 0
    job = last_job(run)
    wait_for(lambda: job_done(job), 180, "the 2-node job", job, run)
    text = logs(run)
    assert squeue_states(job) == ["COMPLETED"], text[-4000:]
    digests = dict(re.findall(r"worker (\d)/2 step \d+ weights sha256 (\w+)", text))
    assert set(digests) == {"0", "1"}, text[-3000:]
    assert digests["0"] == digests["1"] == status(run)["weights_sha256"]
    st = status(run)
    assert st["status"] == "finished" and st["strategy"] == "multiworker" and st["replicas"] == 2
    assert f"job {job} (train): COMPLETED" in slurm.job_states(str(run))[0]


@pytest.mark.slurm
@pytest.mark.horovod
def test_two_node_horovod_job_under_mpirun_requeues_and_ends_with_one_hosts_weights(on_cluster, tmp_path,
                                                                                     monkeypatch):
    # Open MPI's mpirun inside a 2-node allocation (its daemons started through Slurm, no PMI);
    # USR1 to the batch shell stops the ranks with a checkpoint, twice, and the job requeues itself
    need_horovod()
    sets = ["distribute.strategy=horovod", "training.deterministic=true", "training.epochs=4",
            "checkpoint.every_minutes=null", "training.log_every_steps=100000", *HOLD, *LEAN]
    set_args = [a for s in sets for a in ("--set", s)]
    run = tmp_path / "hvd"
    monkeypatch.setenv(*STOPS)  # the job's environment (sbatch --export=ALL), not the reference's
    assert submit([QUICKSTART, "--run-dir", str(run), "--nodes", "2", "--launcher", "mpirun", "--time", "20",
                   "--max-requeues", "10", *set_args]) == 0
    job = last_job(run)
    # the reference: the same training by mpirun on this one host, outside Slurm, uninterrupted
    reference = tmp_path / "reference"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != STOPS[0]}
    ref = subprocess.Popen(["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2",
                            sys.executable, "-m", "hpcjobs", "train", QUICKSTART, "--run-dir", str(reference),
                            *set_args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    stop_twice_by_signal(run, job)
    wait_for(lambda: job_done(job), 900, "the requeued Horovod job to finish", job, run)
    st, text = status(run), logs(run)
    assert st.get("status") == "finished" and st["strategy"] == "horovod" and st["replicas"] == 2, text[-4000:]
    assert "on node[1-2]" in text and text.count("requeueing job") == 2, text[-4000:]
    assert "\x1b" not in text  # mpirun hands the ranks a pty, but the log is a file: lines, no progress bar
    sessions = st["sessions"]
    assert [s["stopped_by"] for s in sessions] == ["SIGUSR1", "SIGUSR1", "finished"], sessions
    assert 15 <= sessions[1]["start_step"] < 35 <= sessions[2]["start_step"] < st["total_steps"], sessions
    # the last step's weights on each rank (a progress line may run into the line: no \n)
    ranks = re.findall(rf"worker (\d)/2 step {st['total_steps']} weights sha256 (\w+) on (\S+)", text)
    assert sorted(ranks) == [("0", st["weights_sha256"], "node1"), ("1", st["weights_sha256"], "node2")], ranks
    out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, out[-4000:]
    assert status(reference)["sessions"][0]["stopped_by"] == "finished"
    assert st["weights_sha256"] == status(reference)["weights_sha256"]


@pytest.mark.slurm
def test_signalled_job_checkpoints_requeues_and_ends_with_the_uninterrupted_weights(on_cluster, tmp_path,
                                                                                   monkeypatch):
    # two stops by USR1 to the batch shell, each while its session holds at a step: three sessions
    sets = ["training.epochs=4", "training.deterministic=true", "checkpoint.every_minutes=null",
            "training.log_every_steps=100000", *HOLD, *LEAN]
    set_args = [a for s in sets for a in ("--set", s)]
    reference = tmp_path / "reference"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != STOPS[0]}
    ref = Forked(["train", QUICKSTART, "--run-dir", reference, *set_args], env=env, stderr=True)
    run = tmp_path / "requeue"
    monkeypatch.setenv(*STOPS)
    assert submit([QUICKSTART, "--run-dir", str(run), "--time", "20", "--max-requeues", "20", *set_args]) == 0
    job = last_job(run)
    stop_twice_by_signal(run, job)
    wait_for(lambda: job_done(job), 900, "the requeued job to finish", job, run)
    st = status(run)
    text = logs(run)
    assert st.get("status") == "finished", text[-4000:]
    sessions = st["sessions"]
    assert [s["stopped_by"] for s in sessions] == ["SIGUSR1", "SIGUSR1", "finished"], sessions
    assert 15 <= sessions[1]["start_step"] < 35 <= sessions[2]["start_step"] < st["total_steps"], sessions
    assert all(a["end_step"] == b["start_step"] for a, b in zip(sessions, sessions[1:])), sessions
    assert text.count("requeueing job") == 2 and "restart 2," in text
    assert ref.wait(timeout=600) == 0, ref.errors()[-2000:]
    assert st["weights_sha256"] == status(reference)["weights_sha256"]
    assert status(reference)["sessions"][0]["stopped_by"] == "finished"


@pytest.mark.slurm
def test_slurms_own_warning_before_the_time_limit_stops_with_a_checkpoint_and_requeues(on_cluster, tmp_path,
                                                                                       monkeypatch):
    # --signal=B:USR1@50 under a 1-minute limit: Slurm itself warns the job 10 s in (a task still
    # importing TensorFlow gets the batch shell's resend); 100,000 epochs cannot end before that,
    # and the first session holds at step 15 until the warning (it need not burn the wait training)
    run = tmp_path / "warned"
    monkeypatch.setenv(HOLD_AT, "15")
    assert submit([QUICKSTART, "--run-dir", str(run), "--time", "1", "--signal-margin", "50",
                   "--max-requeues", "3", "--set", "training.epochs=100000",
                   "--set", "checkpoint.every_minutes=null", "--set", HOLD_HOOK, *LEAN_ARGS]) == 0
    job = last_job(run)
    assert "#SBATCH --signal=B:USR1@50" in (run / "slurm" / "train.sbatch").read_text()
    try:
        wait_for(lambda: "requeueing job" in logs(run) or job_done(job), 240, "Slurm's warning and the requeue",
                 job, run)
        text = logs(run)
        assert "batch shell got SIGUSR1" in text and "requeueing job" in text, text[-4000:]
        first = status(run)["sessions"][0]
        assert first["stopped_by"] == "SIGUSR1" and first["end_step"] is not None, first
        assert os.path.exists(run / "checkpoints" / "checkpoint")
    finally:
        subprocess.run(["scancel", job], capture_output=True)


@pytest.mark.slurm
def test_submitit_api_runs_checkpointable_training_and_requeues(on_cluster, tmp_path):
    run = tmp_path / "submitit"
    cfg = config.load(QUICKSTART, ["training.epochs=30", "checkpoint.every_minutes=null"])
    job = slurm.submit(cfg, str(run), time="5", signal_margin=30)
    wait_for(lambda: status(run).get("status") == "running" or job_done(job.job_id), 120, "the job to start",
             job.job_id, run)
    # submitit's timeout signal (USR2): the training checkpoints, submitit requeues the callable
    subprocess.run(["scancel", "--signal=USR2", job.job_id], capture_output=True)
    wait_for(lambda: job_done(job.job_id), 180, "the submitit job", job.job_id)
    st = status(run)
    assert st["status"] == "finished"
    assert [s["stopped_by"] for s in st["sessions"]] == ["SIGUSR1", "finished"]
    assert job.result() == 0  # the result file exists: result() does not poll
    assert slurm.read_jobs(str(run))[0]["kind"] == "submitit"


