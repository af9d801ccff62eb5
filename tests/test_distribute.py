"""One loop for every engine: MirroredStrategy on 2 logical CPUs and MultiWorkerMirrored
with 2 real worker processes on localhost, compared with a single-process run."""
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from hpcjobs.cluster import info as cluster
from hpcjobs.cluster.info import ClusterError

from conftest import HOLD_AT, HOLD_HOOK, QUICKSTART, REPO, need_horovod
from forked import Forked

# dropout off: with dropout, replicas draw their masks per replica, so curves differ by design
SAME = ["export.plots=false", "training.deterministic=true", "training.epochs=2", "training.steps_per_epoch=15",
        "training.batch_size=64", "model.dropout=0", "checkpoint.every_minutes=null",
        "data.augment.flip_horizontal=true", "data.augment.rotation=8"]


# holds the process that is to be stopped by a signal until the signal has come (hold_for_signal.py)
HOLD = [HOLD_HOOK]
STOP_AT = {HOLD_AT: "20"}  # after the call that reaches step 20: inside epoch 2 of 6


def sets(items):
    return sum((["--set", s] for s in items), [])


def launch(run, items, env=None, extra=()):
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    e.pop("TF_CONFIG", None) if "TF_CONFIG" not in (env or {}) else None
    return Forked(["train", QUICKSTART, "--run-dir", run, *sets(items), *extra], env=e, cwd=REPO)  # forked.py


def finish(procs, timeout=300):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append((p.returncode, out))
    return outs


def digest(out):
    found = re.findall(r"weights sha256 ([0-9a-f]{64})", out)
    assert found, out[-3000:]
    return found[-1]


def metrics(run):
    return [{k: float(v) for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(run / "metrics.csv"))]


def assert_close(a, b, rtol=2e-4):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=rtol, abs=1e-6), (k, ra, rb)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config_env(n):
    workers = [f"127.0.0.1:{p}" for p in free_ports(n)]
    return [{"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})}
            for i in range(n)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    (code, out), = finish([launch(run, SAME)])
    assert code == 0, out
    return run, digest(out)


def test_cluster_info_from_launchers():
    info = cluster.detect({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
                           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[01-02]",
                           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_END_TIME": "2000000000",
                           "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_size) == ("slurm", 3, 4, 1, 2)
    assert info.nodes == ("gpu01", "gpu02") and info.gpus_per_node == 4
    assert info.job_end_time == 2000000000 and not info.is_chief
    mpi = cluster.detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                          "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (mpi.launcher, mpi.rank, mpi.world_size) == ("mpi", 1, 2)
    assert cluster.expand_hostlist("node[1-3,7],gpu05,x[08-09]") == \
        ["node1", "node2", "node3", "node7", "gpu05", "x08", "x09"]
    with pytest.raises(ClusterError, match="launch with srun"):
        cluster.detect({"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_END_TIME": "1"})
    with pytest.raises(ClusterError, match="TF_CONFIG"):
        cluster.detect({"TF_CONFIG": "{not json"})


def test_slurm_tf_config_without_gpus():
    from hpcjobs.cluster.distribute import _tf_config_from_slurm

    info = cluster.ClusterInfo(launcher="slurm", rank=1, world_size=2, nodes=("node1", "node2"))
    cfg = _tf_config_from_slurm(info, 23456)
    assert cfg == {"cluster": {"worker": ["node1:23456", "node2:23457"]}, "task": {"type": "worker", "index": 1}}


@pytest.mark.multiprocess
def test_mirrored_two_logical_cpus_matches_single_process(tmp_path, single):
    run = tmp_path / "mirrored"
    (code, out), = finish([launch(run, SAME + ["distribute.strategy=mirrored",
                                               "distribute.logical_cpu_devices=2"])])
    assert code == 0, out
    assert "strategy mirrored x2" in out
    assert_close(metrics(run), metrics(single[0]))


@pytest.mark.tf214
@pytest.mark.multiprocess
def test_multiworker_two_processes(tmp_path, single):
    run = tmp_path / "mw"
    procs = [launch(run, SAME + ["distribute.strategy=multiworker"], env=e) for e in tf_config_env(2)]
    (c0, o0), (c1, o1) = finish(procs)
    assert c0 == 0 and c1 == 0, (o0[-3000:], o1[-3000:])
    assert "strategy multiworker x2" in o0
    assert digest(o0) == digest(o1)  # both workers end with bitwise-identical weights
    assert_close(metrics(run), metrics(single[0]))
    assert json.loads((run / "run.json").read_text())["replicas"] == 2
    assert not (run / "checkpoints").joinpath("worker-1").exists()


@pytest.mark.multiprocess
def test_multiworker_stop_and_resume_is_exact(tmp_path):
    items = SAME + ["distribute.strategy=multiworker", "training.epochs=6", "model.dropout=0.3",
                    "checkpoint.every_steps=7", *HOLD]  # periodic (asynchronous) saves by both workers
    whole = tmp_path / "whole"
    envs = tf_config_env(2)
    (c0, o0), (c1, o1) = finish([launch(whole, items, env=e) for e in envs])
    assert c0 == 0 and c1 == 0, o0[-2000:]
    want = digest(o0)
    run = tmp_path / "parts"
    envs = tf_config_env(2)
    envs[1].update(STOP_AT)  # the non-chief waits at step 20 for its signal; the chief waits for it
    procs = [launch(run, items, env=e) for e in envs]
    t = time.time()
    while not (run / "metrics.csv").exists() and time.time() - t < 120:
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGUSR1)  # only the non-chief is signalled: both must stop together
    (c0, o0), (c1, o1) = finish(procs)
    assert (c0, c1) == (75, 75), (o0[-2000:], o1[-2000:])
    assert digest(o0) == digest(o1)
    st = json.loads((run / "run.json").read_text())
    assert st["status"] == "stopped" and 15 <= st["step"] <= 40, st  # within a call or two of step 20
    (c0, o0), (c1, o1) = finish([launch(run, items, env=e) for e in tf_config_env(2)])
    assert (c0, c1) == (0, 0), o0[-2000:]
    assert digest(o0) == digest(o1) == want


def mpirun(run, items, n=2, env_extra=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env_extra or {}))
    env.pop("TF_CONFIG", None)
    # output to a file, not a pipe: nobody reads a pipe while the test waits, and a full
    # pipe would block the ranks' progress output
    log = open(f"{run}.mpirun.log", "a+")
    exports = [a for k in ["TF_CPP_MIN_LOG_LEVEL", *(env_extra or {})] for a in ("-x", k)]
    p = subprocess.Popen(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(n), *exports,
                          sys.executable, "-m", "hpcjobs", "train", QUICKSTART, "--run-dir", str(run), *sets(items)],
                         stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    p.log = log
    return p


def finish_mpirun(p, timeout=300):
    p.wait(timeout=timeout)
    p.log.seek(0)
    out = p.log.read()
    p.log.truncate(0)
    p.log.close()
    return p.returncode, out


def digests(out):
    return dict(re.findall(r"worker (\d+)/\d+ step \d+ weights sha256 ([0-9a-f]{64})", out))


@pytest.mark.horovod
@pytest.mark.multiprocess
def test_horovod_two_ranks_match_single_process(tmp_path, single):
    need_horovod()
    run = tmp_path / "hvd"
    code, out = finish_mpirun(mpirun(run, SAME + ["distribute.strategy=horovod"]))
    assert code == 0, out[-3000:]
    d = digests(out)
    assert set(d) == {"0", "1"} and d["0"] == d["1"], out[-2000:]
    assert "strategy horovod x2" in out
    assert_close(metrics(run), metrics(single[0]))


@pytest.mark.horovod
@pytest.mark.multiprocess
def test_horovod_stop_and_resume_is_exact(tmp_path):
    need_horovod()
    items = SAME + ["distribute.strategy=horovod", "training.epochs=6", "model.dropout=0.3",
                    "checkpoint.every_steps=7", *HOLD]
    code, out = finish_mpirun(mpirun(tmp_path / "whole", items))
    assert code == 0, out[-2000:]
    want = digests(out)["0"]
    run = tmp_path / "parts"
    p = mpirun(run, items, env_extra=STOP_AT)  # both ranks wait at step 20 for their signal
    t = time.time()
    while not (run / "metrics.csv").exists() and time.time() - t < 120:
        time.sleep(0.1)
    p.send_signal(signal.SIGUSR1)  # mpirun forwards it to the ranks
    code, out = finish_mpirun(p)
    st = json.loads((run / "run.json").read_text())
    assert st["status"] == "stopped" and 15 <= st["step"] <= 40, out[-2000:]  # within a call or two of step 20
    code, out = finish_mpirun(mpirun(run, items))
    assert code == 0, out[-2000:]
    d = digests(out)
    assert d["0"] == d["1"] == want
