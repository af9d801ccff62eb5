"""hpcjobs doctor (issue 27 item 1): the checks are plain functions of a probe, so what cannot
exist on this machine (a V100, a node-local run directory under a multi-host partition, a full
disk, a file system without fcntl locks, Horovod without NCCL) is a stand-in probe handed to
the real checks; and the command runs here on configs/bede.yaml, its fast subset without
importing TensorFlow, as ``hpcjobs submit`` runs it."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from hpcjobs import cli, config
from hpcjobs.doctor import checks
from hpcjobs.doctor.probe import Gpu, Probe, lock_test, probe

from conftest import QUICKSTART, REPO

BEDE = os.path.join(REPO, "configs", "bede.yaml")
V100 = Gpu("Tesla V100-SXM2-16GB", (7, 0))
A100 = Gpu("NVIDIA A100-SXM4-40GB", (8, 0))
TF221_BUILD = {"is_cuda_build": True, "cuda_version": "12.5.1", "cudnn_version": "9",
               "cuda_compute_capabilities": ["sm_60", "sm_70", "sm_80", "sm_89", "compute_90"]}


def healthy(**changes) -> Probe:
    """A probe of a machine where nothing is wrong: a GPU build, a shared file system with room
    and locks, Slurm's commands, a four-node partition on other hosts."""
    p = Probe(machine="x86_64", python="3.11.7", tensorflow="2.21.0", keras="3.15.1", build=dict(TF221_BUILD),
              gpus=[V100] * 4, commands={c: f"/usr/bin/{c}" for c in ("sbatch", "squeue", "scontrol", "mpirun")},
              fs_path="/lustre/runs", fstype="lustre", mount="/lustre", free_bytes=10 << 40, lock_error=None,
              write_rate=500e6, partition="gpu", partition_nodes=[(f"gpu{i:03d}", f"10.0.0.{i}") for i in range(4)],
              this_host={"login1", "10.1.0.1"}, checkpoint_bytes=300 << 20, checkpoint_from="the built model")
    return dataclasses.replace(p, **changes)


def bede(*sets: str):
    return config.load(BEDE, list(sets))


def rows(p: Probe, cfg, name: str | None = None) -> list:
    out = checks.run(p, cfg)
    return [r for r in out if name is None or r.name == name]


def level(p: Probe, cfg, name: str) -> str:
    found = rows(p, cfg, name)
    assert found, f"no {name} row"
    order = (checks.OK, checks.WARNING, checks.BLOCKER)
    return max((r.level for r in found), key=order.index)


# --------------------------------------------------------------------------- stand-in probes
def test_a_healthy_probe_has_no_blocker_and_no_warning():
    found = rows(healthy(), bede("training.precision=mixed_float16"))
    assert [r for r in found if r.level != checks.OK] == [], found
    assert {"stack", "cuda build", "gpus", "compute capability", "precision", "lock", "space", "node-local",
            "time"} <= {r.name for r in found}


def test_bf16_on_a_v100_is_a_blocker_that_names_mixed_float16():
    cfg = bede("training.precision=mixed_bfloat16")
    (row,) = rows(healthy(), cfg, "precision")
    assert row.level == checks.BLOCKER and "mixed_float16" in row.message and "7.0" in row.message
    assert level(healthy(gpus=[A100] * 4), cfg, "precision") == checks.OK
    assert level(healthy(), bede("training.precision=mixed_float16"), "precision") == checks.OK


def test_a_gpu_the_build_has_no_kernels_for_is_a_blocker():
    cfg = bede()
    build = dict(TF221_BUILD, cuda_compute_capabilities=["sm_80", "sm_89", "compute_90"])
    assert level(healthy(build=build), cfg, "compute capability") == checks.BLOCKER
    # a T4 (7.5) runs sm_70 binaries; an H100 (9.0) the compute_90 PTX
    assert level(healthy(gpus=[Gpu("Tesla T4", (7, 5))]), cfg, "compute capability") == checks.OK
    assert level(healthy(gpus=[Gpu("H100", (9, 0))]), cfg, "compute capability") == checks.OK


def test_no_gpu_or_a_cpu_build_under_gpus_per_node_is_a_blocker():
    cfg = bede()
    assert level(healthy(gpus=[]), cfg, "gpus") == checks.BLOCKER
    assert level(healthy(gpus=[V100]), cfg, "gpus") == checks.WARNING  # a smaller allocation than the job's
    assert level(healthy(build={"is_cuda_build": False}), cfg, "cuda build") == checks.BLOCKER
    assert rows(healthy(build={"is_cuda_build": False}), bede("slurm.gpus_per_node=0"), "cuda build") == []


def test_a_node_local_run_dir_blocks_where_a_job_can_requeue_onto_another_node():
    local = dict(fs_path="/tmp/runs", fstype="tmpfs", mount="/tmp")
    row = rows(healthy(**local), bede(), "node-local")[0]
    assert row.level == checks.BLOCKER and "shared file system" in row.message, row
    # every node of the partition is this host (the local test cluster): the jobs see it
    here = healthy(**local, partition_nodes=[("c1", "127.0.0.1"), ("c2", "login1")])
    assert level(here, bede(), "node-local") == checks.OK
    # the partition not known (no Slurm answer): a warning
    assert level(healthy(**local, partition_nodes=None), bede(), "node-local") == checks.WARNING
    # one host and no requeue: nothing to move to
    one = healthy(**local, partition_nodes=[("gpu001", "10.0.0.1")])
    assert level(one, bede("slurm.max_requeues=0"), "node-local") == checks.WARNING
    assert level(one, bede(), "node-local") == checks.BLOCKER


def test_a_full_disk_is_a_blocker_and_a_tight_one_a_warning():
    size = 300 << 20
    need = (bede().checkpoint.max_to_keep + 1) * size
    row = rows(healthy(free_bytes=need - 1), bede(), "space")[0]
    assert row.level == checks.BLOCKER and "max_to_keep" in row.message
    assert level(healthy(free_bytes=need + 1), bede(), "space") == checks.WARNING
    assert level(healthy(free_bytes=2 * need), bede(), "space") == checks.OK
    # with the checkpoint's size not known yet (the fast subset), an empty disk still blocks
    assert level(healthy(free_bytes=0, checkpoint_bytes=None), bede(), "space") == checks.BLOCKER


def test_a_broken_lock_is_a_blocker_naming_flock():
    row = rows(healthy(lock_error="flock failed: Function not implemented"), bede(), "lock")[0]
    assert row.level == checks.BLOCKER and "flock" in row.message


def test_horovod_without_nccl_warns_and_without_mpi_or_gloo_blocks():
    cfg = bede("distribute.strategy=horovod")
    assert level(healthy(horovod="0.28.1", horovod_built={"mpi": True, "nccl": False, "gloo": False}), cfg,
                 "horovod") == checks.WARNING
    assert level(healthy(horovod="0.28.1", horovod_built={"mpi": False, "nccl": True, "gloo": False}), cfg,
                 "horovod") == checks.BLOCKER
    assert level(healthy(horovod=None), cfg, "horovod") == checks.BLOCKER
    assert rows(healthy(horovod=None), bede(), "horovod") == []  # not asked for


def test_an_unsupported_stack_and_missing_slurm_commands_block():
    assert level(healthy(tensorflow="2.15.1", keras="2.15.0"), bede(), "stack") == checks.BLOCKER
    assert level(healthy(tensorflow="2.14.1", keras="2.14.0"), bede(), "stack") == checks.OK
    assert level(healthy(tensorflow=None), bede(), "stack") == checks.BLOCKER
    no_scontrol = healthy(commands={"sbatch": "/usr/bin/sbatch", "squeue": "/usr/bin/squeue", "scontrol": None})
    assert level(no_scontrol, bede(), "commands") == checks.BLOCKER
    # at a submission, a command the job needs on its node is a warning (sbatch: submit says so itself)
    assert level(dataclasses.replace(no_scontrol, where="submit"), bede(), "commands") == checks.WARNING


def test_a_store_that_cannot_be_read_blocks_and_a_slow_one_warns():
    cfg = bede("data.store=/lustre/digits.h5")
    assert level(healthy(store="/lustre/digits.h5", store_error="Permission denied"), cfg, "store") == checks.BLOCKER
    slow = healthy(store="/lustre/digits.h5", store_bytes=10 << 30, store_rate=50e6, epoch_seconds=60.0)
    assert level(slow, cfg, "store") == checks.WARNING  # 10 GiB an epoch of 60 s is 179 MB/s
    assert level(dataclasses.replace(slow, store_rate=500e6), cfg, "store") == checks.OK


# --------------------------------------------------------------------------- the real probe, here
def test_the_lock_test_takes_and_releases_a_real_lock(tmp_path):
    assert lock_test(str(tmp_path)) is None
    assert os.listdir(tmp_path) == []  # its file is gone
    assert "cannot create" in lock_test(str(tmp_path / "missing"))


def test_doctor_on_bede_here_reports_no_gpu_as_a_blocker(tmp_path, capsys):
    rc = cli.main(["doctor", BEDE, "--json", "--run-dir", str(tmp_path / "bede")])
    found = json.loads(capsys.readouterr().out)
    assert rc == 2
    gpus = [r for r in found if r["name"] == "gpus"]
    assert gpus and gpus[0]["level"] == "blocker" and "no GPU seen" in gpus[0]["message"], found
    assert all(set(r) == {"name", "level", "message"} and "\n" not in r["message"] for r in found)
    # the checkpoint's size comes from the built model: the space row says so
    assert any(r["name"] == "space" and "built model" in r["message"] for r in found), found


def test_doctor_table_and_exit_code_follow_the_blockers(tmp_path, capsys, monkeypatch):
    import hpcjobs.doctor.command as command

    cfg_run = str(tmp_path / "q")
    monkeypatch.setattr(command, "probe", lambda cfg, run_dir, full=False, where="doctor": healthy(
        gpus=[], build={"is_cuda_build": False}))
    assert cli.main(["doctor", QUICKSTART, "--run-dir", cfg_run]) == 0  # quickstart asks for no GPU
    assert "nothing blocks" in capsys.readouterr().out
    monkeypatch.setattr(command, "probe", lambda cfg, run_dir, full=False, where="doctor": healthy(
        lock_error="flock failed: Function not implemented"))
    assert cli.main(["doctor", QUICKSTART, "--run-dir", cfg_run]) == 2
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["lock", "blocker"] for line in out.splitlines()), out


def test_the_fast_subset_imports_no_tensorflow(tmp_path):
    # doctor --fast and submit's checks, in a fresh interpreter: TensorFlow is never imported
    code = ("import sys, json; from hpcjobs import cli, config; from hpcjobs.doctor.command import submission_blocker;"
            f"rc = cli.main(['doctor', {BEDE!r}, '--fast', '--json', '--run-dir', {str(tmp_path / 'r')!r}]);"
            f"b = submission_blocker(config.load({QUICKSTART!r}), {str(tmp_path / 'q')!r});"
            "print(json.dumps(dict(rc=rc, blocker=b, tf='tensorflow' in sys.modules, keras='keras' in sys.modules)))")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    rows_ = json.loads("\n".join(lines[:-1]))
    assert result["tf"] is False and result["keras"] is False, result
    assert result["rc"] == 2 and result["blocker"] is None, result  # bede: a CPU build under gpus_per_node 4
    assert any(r["name"] == "cuda build" and r["level"] == "blocker" for r in rows_), rows_


def test_submit_refuses_on_a_blocker_in_one_line_and_no_check_overrides(tmp_path, capsys, monkeypatch):
    import hpcjobs.doctor.command as command
    from hpcjobs import slurm

    queued = []
    monkeypatch.setattr(slurm, "_sbatch", lambda script, extra=(): queued.append(script) or "4242")
    monkeypatch.setattr(command, "probe", lambda cfg, run_dir, full=False, where="doctor": healthy(
        where=where, fs_path=run_dir, fstype="tmpfs", mount="/tmp", gpus=None, checkpoint_bytes=None))
    run = tmp_path / "refused"
    assert cli.main(["submit", QUICKSTART, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert queued == [] and not (run / "slurm").exists()
    assert len(err) == 1 and err[0].startswith("hpcjobs submit: refused: node-local:") and "--no-check" in err[0], err
    assert cli.main(["submit", QUICKSTART, "--run-dir", str(run), "--no-check"]) == 0
    assert len(queued) == 1


def test_a_missing_store_is_a_blocker_and_a_real_one_is_read(tmp_path, capsys):
    def store_row(*sets):
        rc = cli.main(["doctor", QUICKSTART, "--fast", "--json", "--run-dir", str(tmp_path / "r"), *sets])
        return rc, next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "store")

    rc, row = store_row("--set", f"data.store={tmp_path / 'missing.h5'}")
    assert rc == 2 and row["level"] == "blocker" and "not found" in row["message"], row
    store = tmp_path / "store.h5"
    store.write_bytes(os.urandom(1 << 20))  # read as bytes: the check reads, it does not parse
    rc, row = store_row("--set", f"data.store={store}")
    assert row["level"] == "ok" and "MB/s" in row["message"], row


@pytest.mark.slurm
def test_on_the_local_cluster_a_run_dir_on_this_hosts_disk_is_fine(on_cluster, tmp_path, capsys):
    # the local cluster's nodes are this host: a run directory on its own disk is seen by every job
    p = probe(config.load(QUICKSTART), str(tmp_path / "r"), where="submit")
    assert p.partition_nodes, "scontrol gave no nodes"
    row = rows(p, config.load(QUICKSTART), "node-local")[0]
    assert row.level == checks.OK, row
    if (p.fstype or "") in ("ext4", "xfs", "btrfs", "overlay", "tmpfs", "zfs"):
        assert "this host" in row.message, row


def test_a_cudnn_that_dropped_volta_blocks_on_a_v100_only():
    cfg = bede()
    assert level(healthy(cudnn="9.11.0.98"), cfg, "compute capability") == checks.BLOCKER
    assert level(healthy(cudnn="9.3.0.75"), cfg, "compute capability") == checks.OK
    assert level(healthy(cudnn="9.11.0.98", gpus=[A100]), cfg, "compute capability") == checks.OK


def test_the_feed_row_compares_the_feeders_rate_with_the_steps_recorded_one():
    cfg = bede()
    assert rows(healthy(), cfg, "feed") == []  # not measured (no store, or the fast subset): no row
    slow = healthy(feed_rate=300.0, record={"feed_check": {"step_samples_per_s": 1000.0}})
    assert level(slow, cfg, "feed") == checks.WARNING and "headroom 0.30x" in rows(slow, cfg, "feed")[0].message
    fast = healthy(feed_rate=5000.0, record={"steps_per_epoch": 10}, epoch_seconds=2.0)  # 10 x batch per 2 s
    assert level(fast, cfg, "feed") == checks.OK
    assert "known after a session" in rows(healthy(feed_rate=5000.0), cfg, "feed")[0].message


def test_doctor_measures_a_store_through_the_feeder_as_the_feed_check_does(tmp_path, capsys):
    store = tmp_path / "digits.h5"
    assert cli.main(["prepare", QUICKSTART, "--output", str(store)]) == 0
    capsys.readouterr()
    cli.main(["doctor", QUICKSTART, "--json", "--run-dir", str(tmp_path / "r"), "--set", f"data.store={store}",
              "--set", "data.feed=disk"])
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "feed")
    assert row["level"] == "ok" and "the disk feed gives" in row["message"] and "samples/s" in row["message"], row
