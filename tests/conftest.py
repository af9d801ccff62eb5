import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HPCJOBS_NO_SQUEUE", "1") if "SLURM_JOB_ID" not in os.environ else None
# The suite runs three workers, their Slurm jobs and MPI ranks on two cores: an oversubscribed
# machine, which Open MPI cannot see when a launch has no more ranks than cores. An MPI rank that
# waits for its peer (Horovod's negotiation every cycle, a barrier) then polls at full speed and takes
# the core its peer needs. Yielding while idle is Open MPI's setting for such a machine; what a rank
# computes is unchanged. Every mpirun and Slurm job of the suite inherits it (sbatch --export=ALL).
# Measured: a 6-epoch 2-rank Horovod run, 28.5 CPU s polling against 22.1 yielding, alone; beside
# one CPU-bound process 30.4 against 22.7.
os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")

import pytest  # noqa: E402

# submitit's import runs logging.config.dictConfig, which closes every logging handler that
# exists by then, absl's too (made when TensorFlow is imported) and with it the stream absl
# held: a pytest capture file of an earlier test, and the run dies ("lost sys.stderr").
# Imported first, before any test imports TensorFlow, it closes nothing of anyone's.
import submitit  # noqa: E402,F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
FASHION = "/usr/share/datasets/fashion-mnist"
# tests/hold_for_signal.py as a config's user hook: with HOLD_AT="a,b,..." in a training process's
# environment, each session holds at its next listed step until a stop signal has come
HOLD_HOOK = f"training.hooks=[{os.path.join(REPO, 'tests', 'hold_for_signal.py')}:HoldForSignal]"
HOLD_AT = "HPCJOBS_TEST_HOLD_AT"
# What a run does beside its training that a test which never looks at it leaves out: the plots
# (about 0.4 CPU s a run, and matplotlib's import in a new process) and, inside a Slurm job, the
# feed check (data.feed_check: auto; about 2 CPU s a session, a second of its own pipeline at full
# speed and six train steps). Neither changes what is trained. test_train, test_evaluate and
# test_hostile look at the plots; test_feed_check and test_staging's two-rank job at the feed check.
LEAN = ["export.plots=false", "data.feed_check=false"]
LEAN_ARGS = [a for s in LEAN for a in ("--set", s)]


@pytest.fixture
def quickstart():
    return QUICKSTART


def latest_checkpoint_step(checkpoints) -> int | None:
    """The step of the checkpoint a run's state file (``checkpoints/checkpoint``, replaced
    by a rename, so whole or absent) names as latest, ``ckpt-<step>``; None before the first."""
    try:
        with open(os.path.join(checkpoints, "checkpoint")) as f:
            first = f.readline()  # model_checkpoint_path: "ckpt-N"
    except FileNotFoundError:
        return None
    return int(first.split('"')[1].rsplit("-", 1)[1])


def need_fashion_mnist():
    if not os.path.isdir(FASHION):
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION} missing in CI: apt-get install dataset-fashion-mnist")
        pytest.skip(f"{FASHION} missing: apt-get install dataset-fashion-mnist")


def need_horovod():
    try:
        import horovod.tensorflow  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("Horovod missing in CI: bash slurm/install-horovod.sh")
        pytest.skip("Horovod not built here: bash slurm/install-horovod.sh")


def need_keras_hub():
    try:
        import keras_hub
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("keras-hub missing in CI: bash tests/setup.sh installs it")
        pytest.skip("keras-hub not installed (README, KerasHub presets)")
    return keras_hub


# --------------------------------------------------------------------------- the local Slurm cluster
def pytest_configure(config):
    # one id per pytest run, shared with pytest-xdist's workers (they inherit the environment)
    if not hasattr(config, "workerinput"):
        os.environ.setdefault("HPCJOBS_TEST_RUN", f"{os.getpid()}-{time.time_ns()}")


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller: after every worker has ended
        from slurm_cluster import stop_if_started

        stop_if_started(os.environ["HPCJOBS_TEST_RUN"])


@pytest.fixture(scope="session")
def cluster():
    """The local cluster (slurm/local-cluster.sh), started by the first test that needs it and
    stopped at the end of the pytest run that started it."""
    from slurm_cluster import ensure_cluster

    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = ensure_cluster(os.environ["HPCJOBS_TEST_RUN"])
    yield os.environ["SLURM_CONF"]
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


@pytest.fixture
def on_cluster(cluster, monkeypatch, tmp_path):
    # the jobs inherit this environment (sbatch --export=ALL): let them ask squeue for their end time
    monkeypatch.delenv("HPCJOBS_NO_SQUEUE", raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.chdir(tmp_path)  # the jobs' working directory
    return cluster


# --------------------------------------------------------------------------- order
# pytest-xdist (--dist loadscope --no-loadscope-reorder) hands out whole modules in collection order: the modules that
# mostly wait on Slurm's clock go first, each beside one of the longest CPU-bound modules, so that
# their waits overlap CPU work; then the other modules, longest first, so that no long module runs
# alone at the end.
FIRST = ["test_slurm_jobs.py", "test_checkpoint.py", "test_search_slurm.py", "test_slot_renew.py", "test_losses.py",
         "test_distribute.py", "test_slurm.py", "test_init_weights.py", "test_signal_margin.py", "test_staging.py",
         "test_prepare_slurm.py", "test_hostile.py", "test_source_split.py", "test_transfer.py", "test_plugins.py",
         "test_recipe.py", "test_select.py", "test_search.py", "test_prepare_parallel.py", "test_precision.py",
         "test_search_dashboard.py", "test_train.py", "test_infer.py", "test_export.py", "test_runs_clean.py",
         "test_kerashub.py", "test_doctor.py"]


# `-m "not slow"` is the quick check while changing code (README, Contributing): it leaves out, beside
# the tests marked slow one by one, everything that needs the cluster, several processes or Horovod,
# and these modules, each of whose tests trains runs of its own (resume, precision, losses,
# transfer, ...): 730 of the 895 tests are left, and take 168 s here (-n 3 --dist loadscope).
SLOW_MODULES = {"test_checkpoint.py", "test_transfer.py", "test_precision.py", "test_losses.py", "test_recipe.py",
                "test_init_weights.py", "test_select.py", "test_stacks.py", "test_source_split.py",
                "test_search_dashboard.py", "test_resume_old.py", "test_kerashub.py"}


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: the order inside a module stays
    for item in items:
        if os.path.basename(str(item.fspath)) in SLOW_MODULES or any(
                item.get_closest_marker(m) for m in ("slurm", "multiprocess", "horovod")):
            item.add_marker(pytest.mark.slow)


# --------------------------------------------------------------------------- where the time goes
# HPCJOBS_TEST_CPU_LOG=FILE: one line per test (worker, wall s, CPU s of this process and of the
# subprocesses it waited for, node id), setup and teardown included, so a module fixture's
# training counts in its first test. Slurm jobs' CPU is not in it (slurmd's children).
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    log = os.environ.get("HPCJOBS_TEST_CPU_LOG")
    if not log:
        yield
        return
    import resource

    def cpu():
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    t0, c0 = time.monotonic(), cpu()
    yield
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(log, "a") as f:
        f.write(f"{worker}\t{time.monotonic() - t0:.1f}\t{cpu() - c0:.1f}\t{item.nodeid}\n")
