"""hpcjobs search and lr-find through the CLI, and the failure modes of a search's shared state.

The failure modes the issue lists, and where each is met:

* optuna#5921, a journal lock left by a killed process hangs the next one:
  test_a_killed_lock_holder_never_blocks_the_next_writer;
* a live but slow holder robbed of its lock (what Optuna's grace period does instead),
  and optuna#5138, interleaved or lost appends: test_a_live_holder_keeps_its_lock,
  test_concurrent_appends_from_processes_all_land, test_a_record_cut_short_by_a_kill_is_dropped;
* optuna#1532, killed trials stuck in RUNNING, and keras-tuner#439 / optuna#3351, an
  interrupted trial restarting from scratch: test_a_sigkilled_worker_s_trial_is_resumed_from_its_checkpoint
  (and on Slurm, tests/test_search_slurm.py), test_a_trial_killed_too_often_is_marked_failed;
* SQLite locks (optuna#815, #820, #6036) and a chief process (keras-tuner#383, #344):
  none in the design (a journal file; every worker is equal), so nothing to test.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hpcjobs import cli
from hpcjobs.search import journal

import forked
from forked import Forked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def _config(tmp_path, text: str, name="s") -> str:
    path = tmp_path / f"{name}.yaml"
    # the trials without their training plots (conftest.LEAN); the search's own plots stay
    path.write_text(f"base: {QUICKSTART}\nexport:\n  plots: false\n" + textwrap.dedent(text))
    return str(path)


SEARCH = """
search:
  method: random
  trials: {trials}
  epochs: 2
  space:
    optimizer.learning_rate: {{log_uniform: [1.0e-3, 1.0e-2]}}
    model.dropout: {{uniform: [0.0, 0.4]}}
"""


def _hpcjobs(*argv, timeout=600):
    """``hpcjobs ARGV`` in a process of its own (forked.py): its exit code, stdout and stderr."""
    return forked.run(argv, env=_env(), timeout=timeout)


def _results(run) -> list[dict]:
    import csv

    with open(os.path.join(run, "search", "results.csv")) as f:
        return list(csv.DictReader(f))


def _status(run_dir) -> dict:
    with open(os.path.join(run_dir, "run.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------- the space
@pytest.mark.parametrize("space,message", [
    ("optimizer.learnin_rate: {uniform: [0.1, 0.2]}", "search.space.optimizer.learnin_rate: not a key of the config; "
                                                      "did you mean 'optimizer.learning_rate'?"),
    ("model: {choice: [1, 2]}", "search.space.model: a section, not a value"),
    ("training.epochs: {int: [1, 3]}", "search.space.training.epochs: cannot be searched"),
    ("model.dropout: {uniform: [0.0, 1.5]}", "search.space.model.dropout: 1.5 makes an invalid config"),
    ("optimizer.name: {choice: [adam, adamm]}", "search.space.optimizer.name: 'adamm' makes an invalid config"),
    ("model.dropout: {uniform: [0.0, 0.5], int: [0, 1]}", "give exactly one of choice"),
])
def test_a_bad_space_is_one_line_naming_the_key(space, message, tmp_path, capsys):
    cfg = _config(tmp_path, f"search:\n  trials: 2\n  space:\n    {space}\n")
    assert cli.main(["search", cfg, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_grid_points_and_trial_configs(tmp_path):
    from hpcjobs import config
    from hpcjobs.search import space

    cfg = config.load(_config(tmp_path, """
        search:
          method: grid
          epochs: 3
          space:
            optimizer.learning_rate: {log_uniform: [1.0e-4, 1.0e-1]}
            training.batch_size: {choice: [16, 32]}
            model.width: {int: [8, 16], points: 3}
    """))
    assert space.grid(cfg.search) == {"optimizer.learning_rate": [1e-4, 1e-3, 1e-2, 1e-1],
                                      "training.batch_size": [16, 32], "model.width": [8, 12, 16]}
    assert space.total_trials(cfg.search) == 24
    t = space.trial_config(cfg, {"optimizer.learning_rate": 0.01, "model.width": 12}, 7)
    assert (t.name, t.training.epochs, t.optimizer.learning_rate, t.model.width) == ("s-trial-007", 3, 0.01, 12)
    assert not t.search.space  # a trial's config.yaml is a plain training config


def test_lr_center_takes_the_range_from_lr_find(tmp_path, capsys):
    from hpcjobs import config
    from hpcjobs.search import worker

    path = _config(tmp_path, SEARCH.format(trials=2) + "  lr_center: valley\n  lr_span: 4\n")
    run = tmp_path / "run"
    assert cli.main(["search", path, "--run-dir", str(run)]) == 2
    assert "search.lr_center: no valley in" in capsys.readouterr().err
    run.mkdir()
    (run / ".lock").write_text("")  # the mark of a run directory hpcjobs made (lr-find writes it)
    (run / "lr_find.json").write_text(json.dumps({"valley": 2e-3, "suggestion": 2e-3}))
    cfg, _ = worker.prepare(config.load(path), str(run), path)
    assert cfg.search.space["optimizer.learning_rate"].log_uniform == (5e-4, 8e-3)
    assert config.load(str(run / "search" / "config.yaml")).search.space == cfg.search.space


def test_trial_labels_are_the_handbook_signs(tmp_path):
    from hpcjobs import config
    from hpcjobs.record import RunRecord
    from hpcjobs.search import results

    cfg = config.load(_config(tmp_path, SEARCH.format(trials=2)))
    rising = [dict(epoch=i + 1, loss=1.0 - 0.1 * i, val_loss=0.5 + 0.1 * i) for i in range(5)]
    assert results.signs(rising, RunRecord(), cfg) == ["diverging"]
    flat = [dict(epoch=i + 1, loss=0.7, val_loss=0.5) for i in range(5)]
    assert results.signs(flat, RunRecord(), cfg) == ["plateau"]
    assert results.signs([], RunRecord(error="the loss became nan at step 12: lower ..."), cfg) == ["nan"]


# --------------------------------------------------------------------------- submit --search
def test_submit_search_renders_an_array_of_workers(tmp_path, capsys, monkeypatch):
    from hpcjobs import slurm
    from hpcjobs.slurm import search_array

    monkeypatch.setattr(search_array, "max_array_size", lambda: None)
    cfg = _config(tmp_path, SEARCH.format(trials=12))
    run = str(tmp_path / "run")
    assert cli.main(["submit", cfg, "--search", "--run-dir", run, "--parallel", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-11%3\n" in out and "#SBATCH --ntasks-per-node=1\n" in out
    assert 'STEP=(search "$CONFIG" --run-dir "$RUN_DIR" --workers 1)' in out and f"CONFIG={run}/config.yaml" in out
    assert cli.main(["submit", cfg, "--search", "--run-dir", run, "--trials-per-node", "4", "--gpus-per-node", "4",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-2\n" in out and "--workers 4)" in out and "#SBATCH --gpus-per-node=4\n" in out
    assert cli.main(["submit", cfg, "--search", "--trials-per-node", "4", "--gpus-per-node", "2", "--dry-run"]) == 2
    assert "one GPU per trial" in capsys.readouterr().err
    assert not os.path.exists(run)
    monkeypatch.setattr(slurm, "_sbatch", lambda script, extra=(): "4242")
    assert cli.main(["submit", cfg, "--search", "--run-dir", run]) == 0
    assert os.path.isfile(os.path.join(run, "config.yaml"))
    assert os.path.isfile(os.path.join(run, "slurm", "trials.sbatch"))


def test_an_array_over_max_array_size_is_lowered_or_refused(tmp_path, capsys, monkeypatch):
    from hpcjobs.slurm import search_array

    monkeypatch.setattr(search_array, "max_array_size", lambda: 5)
    cfg = _config(tmp_path, SEARCH.format(trials=12))
    assert cli.main(["submit", cfg, "--search", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "#SBATCH --array=0-4\n" in captured.out and "MaxArraySize (5): 5 tasks pull the trials" in captured.err
    assert cli.main(["submit", cfg, "--search", "--array", "8", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--array: 8 tasks: over the cluster's MaxArraySize (5)" in err


def test_packed_workers_get_one_gpu_each():
    from hpcjobs.cluster.info import split_gpus

    assert split_gpus(4, {"CUDA_VISIBLE_DEVICES": "2,3,5,7"}) == [{"CUDA_VISIBLE_DEVICES": d} for d in "2357"]
    assert split_gpus(2, {"SLURM_GPUS_ON_NODE": "2"}) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert split_gpus(2, {}) == [{}, {}]


# --------------------------------------------------------------------------- the journal's lock
HOLD = """
import sys, time
from hpcjobs.search import journal
with journal.locked(sys.argv[1], exclusive=True):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(path, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True,
                         env=_env())
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_killed_lock_holder_never_blocks_the_next_writer(tmp_path):
    path = tmp_path / "journal.log"
    p = _holder(path, 600)
    p.send_signal(signal.SIGKILL)
    p.wait()
    t0 = time.monotonic()
    journal.LockedJournal(str(path)).append_logs([{"op_code": 0, "x": 1}])
    assert time.monotonic() - t0 < 2
    assert journal.LockedJournal(str(path)).read_logs(0) == [{"op_code": 0, "x": 1}]


@pytest.mark.filterwarnings("ignore:The value of `grace_period` might be too small")
def test_a_live_holder_keeps_its_lock(tmp_path):
    """Ours waits for a live holder however long it holds; Optuna's own file lock takes the
    lock away from a live holder once its grace period has passed (two writers at once)."""
    from optuna.storages.journal import JournalFileOpenLock

    path = tmp_path / "journal.log"
    p = _holder(path, 3)
    t0 = time.monotonic()
    journal.LockedJournal(str(path)).append_logs([{"op_code": 0}])
    assert time.monotonic() - t0 >= 2.5 and p.wait() == 0

    theirs = JournalFileOpenLock(str(tmp_path / "theirs.log"), grace_period=1)
    assert theirs.acquire()  # a live holder that is slow (a stalled file server) for over a second
    other = JournalFileOpenLock(str(tmp_path / "theirs.log"), grace_period=1)
    t0 = time.monotonic()
    assert other.acquire() and time.monotonic() - t0 < 5  # ... is robbed: both now "hold" it


def test_a_file_system_without_locks_is_one_line(tmp_path, capsys, monkeypatch):
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)
    monkeypatch.setattr(fcntl, "lockf", refuse)
    assert cli.main(["search", _config(tmp_path, SEARCH.format(trials=2)), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refuses file locks" in err and "-o flock" in err


WRITER = """
import sys
from hpcjobs.search import journal
j = journal.LockedJournal(sys.argv[1])
for i in range(int(sys.argv[3])):
    j.append_logs([{"op_code": 9, "w": sys.argv[2], "i": i, "pad": "x" * 3000}])
"""


def test_concurrent_appends_from_processes_all_land(tmp_path):
    path = str(tmp_path / "journal.log")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(w), "150"], env=_env()) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    logs = journal.LockedJournal(path).read_logs(0)
    assert sorted((r["w"], r["i"]) for r in logs) == sorted((str(w), i) for w in range(4) for i in range(150))


def test_a_record_cut_short_by_a_kill_is_dropped(tmp_path):
    import optuna

    path = str(tmp_path / "journal.log")
    storage = journal.storage(path)
    study = optuna.create_study(storage=storage, study_name="s")
    study.tell(study.ask(), 1.0)
    records = len(journal.LockedJournal(path).read_logs(0))
    with open(path, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"dead","study_id":0,"datetime_st')  # killed mid-write
    reader = journal.LockedJournal(path)
    assert len(reader.read_logs(0)) == records  # the piece is not a record
    again = optuna.load_study(study_name="s", storage=journal.storage(path))
    again.tell(again.ask(), 2.0)  # the next append cuts the piece off first
    assert [t.value for t in optuna.load_study(study_name="s", storage=journal.storage(path)).trials] == [1.0, 2.0]
    with open(path, "rb") as f:
        assert all(json.loads(line) for line in f.read().splitlines())


def test_a_trial_killed_too_often_is_marked_failed(tmp_path):
    import optuna

    from hpcjobs import config
    from hpcjobs.record import RunRecord
    from hpcjobs.rundir import RunDir
    from hpcjobs.search import study as study_mod, worker

    cfg = config.load(_config(tmp_path, SEARCH.format(trials=1) + "  max_attempts: 2\n"))
    paths = study_mod.Paths(str(tmp_path / "run"))
    cfg, _ = worker.prepare(cfg, paths.run, "test")
    study = study_mod.open_study(paths, cfg)
    c, _ = study_mod.claim(study, cfg, paths, lambda *a: False)
    journal.release(c.fd)  # its worker died: the claim is free, the trial RUNNING
    RunDir(c.run_dir).write_record(RunRecord.from_dict({"status": "running", "sessions": [{"start": 1, "end": None}] * 2}))
    settle = lambda st, cl, status: worker.settle(st, cfg.search, cl, status)  # noqa: E731
    assert study_mod.claim(study, cfg, paths, settle) == (None, 0)
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.FAIL and t.user_attrs["error"] == "its process died 2 times"


# --------------------------------------------------------------------------- local searches
@pytest.mark.slow
def test_local_search_with_two_workers_then_a_second_invocation_continues(tmp_path):
    run = str(tmp_path / "run")
    cfg = _config(tmp_path, SEARCH.format(trials=3) + "  pruning: {kind: asha, min_resource: 1, reduction_factor: 3}\n")
    p = _hpcjobs("search", cfg, "--workers", "2", "--run-dir", run)
    assert p.returncode == 0, p.stderr[-3000:]
    first = _results(run)
    assert [r["trial"] for r in first] == ["0", "1", "2"]
    assert {r["status"] for r in first} <= {"complete", "pruned"} and "complete" in {r["status"] for r in first}
    assert "search s: 3/3 trials" in p.stdout
    p = _hpcjobs("search", cfg, "--workers", "2", "--run-dir", run, "--set", "search.trials=4")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _results(run)
    assert len(rows) == 4 and rows[:3] == first  # the first three are kept, not trained again
    for i in range(4):
        assert len(_status(os.path.join(run, "trials", f"{i:03d}"))["sessions"]) == 1
    assert os.path.isfile(os.path.join(run, "search", "best.yaml"))
    for name in ("curves.png", "optimizer.learning_rate.png", "model.dropout.png"):
        assert os.path.isfile(os.path.join(run, "search", "plots", name))
    board = os.path.join(run, "search", "tensorboard")  # HParams: the experiment, and each ended trial
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(board))
    for r in rows:
        assert any(n.startswith("events.out") for n in os.listdir(os.path.join(board, f"{int(r['trial']):03d}")))
    status = _hpcjobs("status", run)
    assert status.returncode == 0 and "search s: 4/4 trials" in status.stdout
    best = status.stdout.splitlines()[2].split()
    assert best[1] == "complete" and float(best[2]) == max(float(r["value"]) for r in rows if r["status"] == "complete")
    p = _hpcjobs("train", os.path.join(run, "search", "best.yaml"), "--run-dir", str(tmp_path / "best"),
                 "--set", "training.epochs=1")
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.slow
def test_a_sigkilled_worker_s_trial_is_resumed_from_its_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    cfg = _config(tmp_path, SEARCH.format(trials=2).replace("epochs: 2", "epochs: 4"))
    p = Forked(["search", cfg, "--run-dir", run], env=_env())
    index = os.path.join(run, "trials", "000", "checkpoints", "checkpoint")
    deadline = time.monotonic() + 180
    while not os.path.exists(index) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert os.path.exists(index), "no checkpoint of trial 0"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _status(os.path.join(run, "trials", "000"))["status"] == "running"  # left behind by the kill
    done = _hpcjobs("search", cfg, "--run-dir", run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming trial 0" in done.stdout
    st = _status(os.path.join(run, "trials", "000"))
    assert st["status"] == "finished" and len(st["sessions"]) == 2
    assert st["sessions"][0]["end"] is None and st["sessions"][1]["start_step"] > 0  # from its checkpoint
    assert [r["status"] for r in _results(run)] == ["complete", "complete"]


@pytest.mark.slow
def test_a_trial_pruned_in_a_killed_session_is_not_trained_on(tmp_path):
    """Killed after its pruner said prune (say during the final test evaluation), a trial
    resumes only to end, where its checkpoint is: the decision in the journal stands."""
    import optuna

    from hpcjobs import config
    from hpcjobs.rundir import RunDir
    from hpcjobs.search import space, study as study_mod, worker
    from hpcjobs.search.prune import PruneHook
    from hpcjobs.train import train

    cfg = config.load(_config(tmp_path, SEARCH.format(trials=1)))
    cfg, paths = worker.prepare(cfg, str(tmp_path / "run"), "test")
    study = study_mod.open_study(paths, cfg)
    c, _ = study_mod.claim(study, cfg, paths, lambda *a: False)
    optuna.trial.Trial(study, c.trial_id).set_user_attr("prune_at_1", True)
    assert train(space.trial_config(cfg, c.params, c.number), c.run_dir,
                 hooks=[PruneHook(study, c.trial_id, cfg.search)], verbose=False) == 0
    st = RunDir(c.run_dir).read_record()
    assert st.status == "finished" and st.step == 0 and st.sessions[-1].stopped_by == "pruned"


@pytest.mark.slow
def test_a_stop_signal_during_a_trial_s_last_validation_stops_the_worker_after_it(tmp_path, monkeypatch):
    """Slurm's warning can come while a trial validates its last epoch, is pruned there, or
    is tested and exported: the trial ends as it would have, and the worker stops before the
    next trial (75) instead of starting it and running into the time limit."""
    from hpcjobs import config
    from hpcjobs.search import prune, worker

    def end(self, loop, reason, real=prune.PruneHook.end):
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives after the loop's last look at it
        return real(self, loop, reason)
    monkeypatch.setattr(prune.PruneHook, "end", end)
    cfg = config.load(_config(tmp_path, SEARCH.format(trials=2).replace("epochs: 2", "epochs: 1")))
    run = str(tmp_path / "run")
    assert worker.work(cfg, run) == 75
    assert [(r["trial"], r["status"]) for r in _results(run)] == [("0", "complete")]


@pytest.mark.slow
def test_a_stop_signal_just_before_a_trial_trains_stops_it_at_once(tmp_path):
    from hpcjobs import config
    from hpcjobs.rundir import RunDir
    from hpcjobs.search import study as study_mod, worker
    from hpcjobs.cluster.signals import StopFlag

    cfg = config.load(_config(tmp_path, SEARCH.format(trials=1)))
    cfg, paths = worker.prepare(cfg, str(tmp_path / "run"), "test")
    study = study_mod.open_study(paths, cfg)
    c, _ = study_mod.claim(study, cfg, paths, lambda *a: False)
    stop = StopFlag()
    stop.signal = "SIGUSR1"  # it came between the worker's check and train()'s own handler
    assert worker.run_trial(study, cfg, c, False, stop) == 75
    st = RunDir(c.run_dir).read_record()
    assert st.status == "stopped" and st.sessions[-1].stopped_by == "SIGUSR1" and st.step == 0


# --------------------------------------------------------------------------- lr-find
@pytest.mark.slow
def test_lr_find_suggests_within_10x_of_the_best_grid_learning_rate(tmp_path):
    run = tmp_path / "lrf"
    p = _hpcjobs("lr-find", QUICKSTART, "--run-dir", str(run))
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((run / "lr_find.json").read_text())
    assert {"suggestion", "valley", "steepest", "min_div10"} <= set(info)
    assert (run / "lr_find.csv").read_text().startswith("step,lr,loss,smoothed\n")
    assert (run / "plots" / "lr_find.png").stat().st_size > 1000
    assert sorted(os.listdir(run)) == [".lock", "lr_find.csv", "lr_find.json", "plots"]  # no weights, checkpoints
    grid = _config(tmp_path, """
        search:
          method: grid
          metric: val_loss
          epochs: 5
          space:
            optimizer.learning_rate: {log_uniform: [1.0e-4, 1.0e-1], points: 4}
    """, name="grid")
    p = _hpcjobs("search", grid, "--run-dir", str(tmp_path / "grid"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [r for r in _results(tmp_path / "grid") if r["status"] == "complete"]
    assert len(rows) == 4
    best = float(min(rows, key=lambda r: float(r["value"]))["optimizer.learning_rate"])
    assert best / 10 <= info["suggestion"] <= best * 10, (info, rows)
