"""hpcjobs submit --search on the local Slurm cluster: a search that survives kills and time limits.

A 6-trial random search on Fashion-MNIST (two short epochs per trial) as a 3-task job
array.  One task's worker is SIGKILLed in the middle of a trial; then every running task gets
USR1, as from Slurm before a time limit, while a trial trains, and requeues itself.  Every
trial must end exactly once, the killed and the stopped trials from their own
checkpoints, with nothing left hanging.
"""
import glob
import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from conftest import FASHION, latest_checkpoint_step, need_fashion_mnist
from hpcjobs import cli
from slurm_cluster import TERMINAL, logs, squeue_states, status, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"""
base: {os.path.join(REPO, "configs", "quickstart.yaml")}
data:
  source: fashion-mnist
  validation_split: 0.03
  test_split: 0.02
  feed_check: false  # not what this test is about (conftest.LEAN)
training:
  epochs: 2
  steps_per_epoch: 60
  batch_size: 64
  log_every_steps: 100000
export:
  plots: false
checkpoint:
  every_minutes: null
  every_steps: 20
search:
  method: random
  trials: 6
  epochs: 2
  seed: 3
  space:
    optimizer.learning_rate: {{log_uniform: [1.0e-4, 1.0e-2]}}
    model.dropout: {{uniform: [0.0, 0.5]}}
  pruning: {{kind: asha, min_resource: 1, reduction_factor: 3}}
"""
FINAL = ("finished", "pruned")


def _in_an_epoch(run, but=None):
    """A trial, other than ``but``, in its first session, whose latest checkpoint is the one 20 steps
    into an epoch (``checkpoint.every_steps: 20``): it trains the call after that checkpoint,
    with 40 steps, four calls and two saves to go before the epoch ends and ASHA may prune
    it.  So a kill or a stop sent now lands inside an epoch on a machine of any speed."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for trial in sorted(glob.glob(os.path.join(run, "trials", "*"))):
            st = status(trial)
            if trial == but or st.get("status") != "running" or len(st["sessions"]) != 1 \
                    or st["sessions"][0]["end"] is not None:
                continue
            step = latest_checkpoint_step(os.path.join(trial, "checkpoints"))
            if step is not None and step % 60 == 20:
                yield trial
        time.sleep(0.05)
    pytest.fail("no trial was ever 20 steps into an epoch")


def _kill_a_worker_mid_trial(run) -> str:
    """SIGKILL the worker of a trial in its first session, 20 steps into an epoch."""
    for trial in _in_an_epoch(run):
        try:
            pid = int(open(os.path.join(trial, ".claim")).read().split()[1])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue
        return trial


def _pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` waits to be delivered to process ``pid`` (for the process or a thread)."""
    with open(f"/proc/{pid}/status") as f:
        return any(line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) >> (signum - 1) & 1
                   for line in f)


def _signal_the_array_mid_trial(run, job: str, killed: str) -> str:
    """USR1 to every running task's batch shell (Slurm's warning before a time limit) while a
    trial other than the killed one is 20 steps into an epoch: it stops inside that epoch.
    Its worker is frozen (SIGSTOP) until the USR1 that srun passes on is pending on it, so
    the stop lands at its next call on a machine of any speed, however slow squeue and
    scancel are.  Task by task: the killed worker's task may be pending its requeue just
    then, and a signal to the whole array fails on a task that is not running."""
    for trial in _in_an_epoch(run, but=killed):
        try:
            pid = int(open(os.path.join(trial, ".claim")).read().split()[1])
            os.kill(pid, signal.SIGSTOP)
        except (OSError, ValueError, IndexError):
            continue
        try:
            if latest_checkpoint_step(os.path.join(trial, "checkpoints")) % 60 != 20:
                continue  # it saved the next checkpoint before it froze: try again
            tasks = subprocess.run(["squeue", "-h", "-r", "-t", "RUNNING", "-j", job, "-o", "%i"],
                                   capture_output=True, text=True, check=True).stdout.split()
            sent = [subprocess.run(["scancel", "--batch", "--signal=USR1", t], capture_output=True, text=True)
                    for t in tasks]
            assert any(p.returncode == 0 for p in sent), [(p.args, p.returncode, p.stderr) for p in sent]
            wait_for(lambda: _pending(pid, signal.SIGUSR1), 120, "USR1 pending on the frozen worker", job, run)
        finally:
            os.kill(pid, signal.SIGCONT)
        return trial


@pytest.mark.slurm
@pytest.mark.slow
def test_a_search_array_survives_a_sigkill_and_time_limits(on_cluster, tmp_path):
    need_fashion_mnist()
    assert os.path.isdir(FASHION)
    cfg = tmp_path / "fmnist-search.yaml"
    cfg.write_text(textwrap.dedent(CONFIG))
    run = str(tmp_path / "search")
    assert cli.main(["submit", str(cfg), "--search", "--array", "3", "--run-dir", run, "--time", "20",
                     "--max-requeues", "30"]) == 0
    script = open(os.path.join(run, "slurm", "trials.sbatch")).read()
    assert "#SBATCH --array=0-2\n" in script and "--workers 1)" in script
    job = [j for j in json.load(open(os.path.join(run, "slurm", "jobs.json")))][-1]["job_id"]
    killed = _kill_a_worker_mid_trial(run)
    signalled = _signal_the_array_mid_trial(run, job, killed)

    def done():
        states = squeue_states(job)
        return len(states) >= 3 and all(s in TERMINAL for s in states) and states
    states = wait_for(done, 900, "the search array", job, run)
    text = logs(run)
    print(f"array tasks: {states}\n{text[-20000:]}")  # shown in full if an assertion below fails
    assert sorted(states).count("COMPLETED") >= 2, (states, text[-4000:])
    with open(os.path.join(run, "search", "results.csv")) as f:
        rows = list(__import__("csv").DictReader(f))
    assert len(rows) == 6 and {r["status"] for r in rows} <= {"complete", "pruned"}, rows
    sessions = {}
    for i in range(6):
        st = status(os.path.join(run, "trials", f"{i:03d}"))
        assert st["status"] == "finished", (i, st)
        ends = [s["stopped_by"] for s in st["sessions"]]
        assert sum(e in FINAL for e in ends) == 1 and ends[-1] in FINAL, (i, ends)  # ended exactly once
        for before, after in zip(st["sessions"], st["sessions"][1:]):
            if before["end"] is not None:  # stopped cleanly: the next session goes on exactly from there
                assert after["start_step"] == before["end_step"], (i, st["sessions"])
        sessions[i] = st["sessions"]
    k = status(killed)["sessions"]
    assert len(k) >= 2 and k[0]["end"] is None, k  # the SIGKILLed session never ended; another resumed it
    assert k[1]["start_step"] > 0, k  # ... from the checkpoint it had, not from scratch
    stopped = [i for i, ss in sessions.items() if any(s["stopped_by"] in ("SIGUSR1", "SIGTERM", "time_budget")
                                                      for s in ss)]
    assert stopped and all(len(sessions[i]) >= 2 for i in stopped), sessions
    first = status(signalled)["sessions"][0]  # stopped inside the epoch it was 20 steps into
    assert first["stopped_by"] == "SIGUSR1" and first["end_step"] % 60 > 20, first
    assert "requeueing job" in text
    table = subprocess.run(["python", "-m", "hpcjobs", "status", run], capture_output=True, text=True).stdout
    assert "search fmnist-search: 6/6 trials" in table, table
