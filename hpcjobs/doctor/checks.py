"""The checks: plain functions of a ``Probe`` and a config, each giving ``Check`` rows
(ok, warning or blocker, with one line that says what was seen and what to do).

``CHECKS`` lists them in the order of the table, each marked ``fast`` (needs no TensorFlow
import: ``submit`` runs those) or not.  Nothing here probes anything: ``probe.py`` does.
"""
from __future__ import annotations

import socket
from dataclasses import asdict, dataclass

from ..cluster import costs
from ..rundir import format_size
from ..units import slurm_seconds
from .probe import ON_DISK

OK, WARNING, BLOCKER = "ok", "warning", "blocker"
PLATFORMS = ("x86_64", "ppc64le", "aarch64")
NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "cephfs", "panfs", "wekafs",
              "glusterfs", "fuse.glusterfs", "fuse.sshfs", "pvfs2", "orangefs")


@dataclass(frozen=True)
class Check:
    name: str
    level: str  # ok | warning | blocker
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def _tf_parts(version: str | None) -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in (version or "").split(".")[:2])
        return major, minor
    except ValueError:
        return 0, 0


def check_platform(p, cfg) -> list[Check]:
    level = OK if p.machine in PLATFORMS else WARNING
    tail = "" if level == OK else f"; hpcjobs is tested on {', '.join(PLATFORMS)}"
    return [Check("platform", level, f"{p.machine}, Python {p.python}{tail}")]


def check_stack(p, cfg) -> list[Check]:
    if p.where == "submit" and (cfg.slurm.python or cfg.slurm.activate):
        return []  # the job runs another environment than this one: doctor inside a job checks it
    b = p.build or {}
    built = (f"CUDA {b.get('cuda_version')}, cuDNN {b.get('cudnn_version')}" if b.get("is_cuda_build")
             else "a CPU build")
    if not p.tensorflow:
        return [Check("stack", BLOCKER, "TensorFlow is not installed here: pip install 'tensorflow[and-cuda]' "
                                        "(x86_64), or Open-CE's conda channel on POWER9 (Bede)")]
    tf, keras = _tf_parts(p.tensorflow), _tf_parts(p.keras)
    seen = f"TensorFlow {p.tensorflow} + Keras {p.keras}, {built}"
    if tf == (2, 14) and keras[0] == 2 or tf >= (2, 16) and keras[0] == 3:
        return [Check("stack", OK, f"{seen}: supported")]
    return [Check("stack", BLOCKER, f"{seen}: not a supported stack; use TensorFlow 2.14 with Keras 2 "
                                    "(Open-CE 1.11) or TensorFlow >= 2.16 with Keras 3")]


def check_cuda(p, cfg) -> list[Check]:
    gpus = cfg.slurm.gpus_per_node
    if not gpus or p.build is None or p.where == "submit":  # GPU builds are checked where the GPUs are
        return []
    if not p.build.get("is_cuda_build"):
        return [Check("cuda build", BLOCKER, f"slurm.gpus_per_node is {gpus}, but this TensorFlow is a CPU build: "
                                             "install a GPU build (pip install 'tensorflow[and-cuda]'; Open-CE on "
                                             "POWER9), or set gpus_per_node: 0")]
    caps = ", ".join(p.build.get("cuda_compute_capabilities") or []) or "not recorded"
    return [Check("cuda build", OK, f"CUDA {p.build.get('cuda_version')}, cuDNN {p.build.get('cudnn_version')}, "
                                    f"kernels for {caps}")]


def check_gpus(p, cfg) -> list[Check]:
    if p.gpus is None:
        return []
    want, seen = cfg.slurm.gpus_per_node, len(p.gpus)
    names = ", ".join(sorted({g.name for g in p.gpus})) or "none"
    if want and not seen:
        return [Check("gpus", BLOCKER, f"no GPU seen, slurm.gpus_per_node asks for {want}: run doctor inside a "
                                       f"job on a GPU node (srun --gpus-per-node={want} hpcjobs doctor CONFIG); "
                                       "there, check the driver and CUDA_VISIBLE_DEVICES")]
    if seen < want:
        return [Check("gpus", WARNING, f"{seen} GPU(s) seen ({names}), slurm.gpus_per_node asks for {want}: "
                                       "fine in a smaller allocation; the job gets its own")]
    return [Check("gpus", OK, f"{seen} GPU(s) seen ({names}); gpus_per_node {want}")]


def covered(capability: tuple[int, int], built: list[str]) -> bool:
    """Whether a GPU of ``capability`` runs a build with kernels ``built`` (sm_70, compute_90...):
    a binary for the same major and an equal or lower minor, or PTX for an equal or lower one."""
    major, minor = capability
    for entry in built:
        kind, _, number = entry.partition("_")
        if not number.isdigit():
            continue
        m, n = int(number[:-1]), int(number[-1])
        if kind == "sm" and m == major and n <= minor or kind == "compute" and (m, n) <= (major, minor):
            return True
    return False


def _volta_dropped(p) -> str | None:
    """Why this CUDA/cuDNN has no Volta (7.0) support, or None: CUDA 13 and cuDNN 9.11 dropped it."""
    cuda = _tf_parts((p.build or {}).get("cuda_version"))
    if cuda[0] >= 13:
        return f"CUDA {p.build.get('cuda_version')}"
    cudnn = _tf_parts(p.cudnn)
    if cudnn >= (9, 11):
        return f"cuDNN {p.cudnn} (nvidia-cudnn)"
    return None


def check_capability(p, cfg) -> list[Check]:
    if not p.gpus or not p.build:
        return []
    built = p.build.get("cuda_compute_capabilities") or []
    out = []
    dropped = _volta_dropped(p)
    if dropped and any(g.capability and g.capability[0] == 7 and g.capability[1] < 5 for g in p.gpus):
        out.append(Check("compute capability", BLOCKER, f"{dropped} has no Volta (7.0) support: pin an older one "
                                                        "(pip install 'nvidia-cudnn-cu12<9.11') on V100 nodes"))
    for cap in sorted({g.capability for g in p.gpus if g.capability}):
        names = ", ".join(sorted({g.name for g in p.gpus if g.capability == cap}))
        if not built:
            out.append(Check("compute capability", OK, f"{names}: {cap[0]}.{cap[1]} (the build lists no kernels)"))
        elif covered(cap, built):
            out.append(Check("compute capability", OK,
                             f"{names}: {cap[0]}.{cap[1]}, in the build ({', '.join(built)})"))
        else:
            out.append(Check("compute capability", BLOCKER,
                             f"{names}: compute capability {cap[0]}.{cap[1]}, but this TensorFlow has kernels for "
                             f"{', '.join(built)} only: install a build for sm_{cap[0]}{cap[1]}"))
    return out


def check_precision(p, cfg) -> list[Check]:
    precision = cfg.training.precision
    caps = [g.capability for g in p.gpus or [] if g.capability]
    if precision == "float32" or not caps:
        return [] if p.gpus is None or precision == "float32" else \
            [Check("precision", WARNING, f"training.precision {precision} with no GPU seen: mixed precision only "
                                         "pays on a GPU")]
    low = min(caps)
    if precision == "mixed_bfloat16" and low < (8, 0):
        return [Check("precision", BLOCKER, f"training.precision mixed_bfloat16, but the GPU is compute capability "
                                            f"{low[0]}.{low[1]} (bf16 needs 8.0, Ampere; a V100 is 7.0): use "
                                            "mixed_float16 (with loss scaling, the V100 path)")]
    if precision == "mixed_float16" and low < (7, 0):
        return [Check("precision", WARNING, f"training.precision mixed_float16 on compute capability "
                                            f"{low[0]}.{low[1]}: no tensor cores before 7.0; float32 may be faster")]
    return [Check("precision", OK, f"training.precision {precision} on compute capability {low[0]}.{low[1]}")]


def check_horovod(p, cfg) -> list[Check]:
    if cfg.distribute.strategy != "horovod" or p.where == "submit" and (cfg.slurm.python or cfg.slurm.activate):
        return []
    if not p.horovod:
        return [Check("horovod", BLOCKER, "distribute.strategy is horovod, but Horovod is not installed: "
                                          "bash slurm/install-horovod.sh (or another strategy)")]
    b = p.horovod_built
    if b is None:
        return [Check("horovod", OK, f"Horovod {p.horovod} installed (its build is checked by the full doctor)")]
    built = ", ".join(k.upper() for k, v in b.items() if v) or "nothing"
    if not (b.get("mpi") or b.get("gloo")):
        return [Check("horovod", BLOCKER, f"Horovod {p.horovod} built with {built}: neither MPI nor Gloo, so its "
                                          "ranks cannot meet; rebuild it with Open MPI on PATH "
                                          "(bash slurm/install-horovod.sh)")]
    if cfg.slurm.gpus_per_node and not b.get("nccl"):
        return [Check("horovod", WARNING, f"Horovod {p.horovod} built with {built}, no NCCL: the GPUs' allreduce goes "
                                          "through host memory; rebuild with HOROVOD_GPU_OPERATIONS=NCCL")]
    return [Check("horovod", OK, f"Horovod {p.horovod} built with {built}")]


def check_commands(p, cfg) -> list[Check]:
    need = ["sbatch", "squeue", "scontrol"] + (["mpirun"] if cfg.slurm.launcher == "mpirun" else [])
    if p.where == "submit":
        if not p.commands.get("sbatch"):
            return []  # no Slurm here: submit says so itself, in one line, when it calls sbatch
        need.remove("sbatch")
    missing = [c for c in need if not p.commands.get(c)]
    if not missing:
        return [Check("commands", OK, f"{', '.join(need)} found")]
    why = {"sbatch": "to submit", "squeue": "for the job's end time and status", "scontrol": "for requeues",
           "mpirun": "slurm.launcher is mpirun"}
    # a job on another node may have them where this login node has not: a warning at submission
    level = WARNING if p.where == "submit" else BLOCKER
    return [Check("commands", level, "not on PATH: " + "; ".join(f"{c} ({why[c]})" for c in missing)
                  + ": load Slurm's module (or Open MPI's), or add them to the container")]


def check_lock(p, cfg) -> list[Check]:
    where = f"{p.fs_path} ({p.fstype or 'unknown file system'})"
    if p.lock_error is None:
        return [Check("lock", OK, f"an fcntl lock taken and released in {where}")]
    return [Check("lock", BLOCKER, f"no working fcntl lock in {where}: {p.lock_error}; mount with locks "
                                   "(Lustre: -o flock) or give a --run-dir on a file system that has them")]


def check_space(p, cfg) -> list[Check]:
    if p.free_bytes is None:
        return [Check("space", WARNING, f"free space of {p.fs_path} unknown")]
    free = format_size(p.free_bytes)
    keep = cfg.checkpoint.max_to_keep
    if not p.checkpoint_bytes:
        if p.free_bytes < 64 << 20:
            return [Check("space", BLOCKER, f"{p.fs_path}: {free} free, the disk is full: free space or give "
                                            "another --run-dir")]
        return [Check("space", OK, f"{free} free in {p.fs_path} (the checkpoint's size is known once the model is "
                                   "built: hpcjobs doctor without --fast)")]
    need = (keep + 1) * p.checkpoint_bytes  # a new one is written before the oldest goes
    what = (f"{p.fs_path}: {free} free; {keep} checkpoints kept + 1 being written of "
            f"{format_size(p.checkpoint_bytes)} ({p.checkpoint_from}) need {format_size(need)}")
    if p.free_bytes < need:
        return [Check("space", BLOCKER, f"{what}: free space, lower checkpoint.max_to_keep, or give another --run-dir")]
    if p.free_bytes < 2 * need:
        return [Check("space", WARNING, f"{what}, less than twice that is free (the best weights and the export "
                                        "come on top)")]
    return [Check("space", OK, what)]


def _resolves_here(address: str, here: set) -> bool:
    if address in here or address.startswith("127."):
        return True
    try:
        ip = socket.gethostbyname(address)
    except OSError:
        return False
    return ip in here or ip.startswith("127.")


def check_node_local(p, cfg) -> list[Check]:
    fstype = (p.fstype or "").lower()
    if fstype in NETWORK_FS or fstype.startswith("fuse.") and fstype != "fuse.overlay":
        return [Check("node-local", OK, f"{p.fs_path} is on {p.fstype} ({p.mount}), which every node sees")]
    where = f"{p.fs_path} is on {p.fstype or 'an unknown file system'} ({p.mount}), local to this host"
    s = cfg.slurm
    nodes = p.partition_nodes
    if nodes is None:
        return [Check("node-local", WARNING, f"{where}; the partition's nodes are not known here (no scontrol "
                                             "answer): a job on another node would not see it; use a shared file "
                                             "system for --run-dir")]
    if nodes and all(_resolves_here(addr, p.this_host) for _, addr in nodes):
        return [Check("node-local", OK, f"{where}, but every node of partition {p.partition} ({len(nodes)}) is "
                                        "this host (a local cluster): the jobs see it")]
    requeues = s.max_requeues > 0 or s.slot is not None
    hosts = len({addr for _, addr in nodes})
    if requeues or hosts > 1:
        why = "a requeued job (or the next slot) can start on another node" if requeues else \
            "the job may run on another node"
        return [Check("node-local", BLOCKER, f"{where}; partition {p.partition} has {hosts} hosts and {why}, which "
                                             "would not see the checkpoints: give a --run-dir on a shared file system")]
    return [Check("node-local", WARNING, f"{where}; partition {p.partition} has one host and no requeue")]


def check_store(p, cfg) -> list[Check]:
    if not p.store:
        return [Check("store", OK, f"data.source {cfg.data.source}: a built-in dataset, prepared in memory")]
    if p.store_error:
        return [Check("store", BLOCKER, f"{p.store}: cannot be read ({p.store_error}): check data.store / "
                                        "data.source and its permissions")]
    if p.store_rate is None:
        return [Check("store", BLOCKER, f"{p.store}: nothing to read (empty): run hpcjobs prepare, or check the path")]
    rate = f"{p.store}: read at {p.store_rate / 1e6:.0f} MB/s over a sample"
    if not p.epoch_seconds or not p.store_bytes:
        return [Check("store", OK, f"{rate} (the rate training needs is known after an epoch of this run)")]
    need = p.store_bytes / p.epoch_seconds  # a pass over the store per epoch
    if p.store_rate < need:
        return [Check("store", WARNING, f"{rate}; an epoch of this run reads it at {need / 1e6:.0f} MB/s: the input "
                                        "will stall; copy the store to faster (node-local) storage or feed from "
                                        "memory (data.feed)")]
    return [Check("store", OK, f"{rate}; training reads it at {need / 1e6:.1f} MB/s")]


def check_feed(p, cfg) -> list[Check]:
    """The feeder over the store (measured as a session's feed check measures it) against the
    train step's rate this run recorded (its feed check), or its samples per epoch-second."""
    if p.feed_rate is None:
        return []
    rate = f"the {cfg.data.feed} feed gives {p.feed_rate:,.0f} samples/s"
    step = (p.record.get("feed_check") or {}).get("step_samples_per_s")
    if not step and p.epoch_seconds and p.record.get("steps_per_epoch"):
        step = p.record["steps_per_epoch"] * cfg.training.batch_size / p.epoch_seconds
    if not step:
        return [Check("feed", OK, f"{rate} (the rate training needs is known after a session of this run)")]
    headroom = p.feed_rate / step
    if headroom < cfg.data.feed_headroom:
        return [Check("feed", WARNING, f"{rate}, training takes {step:,.0f}: headroom {headroom:.2f}x, below "
                                       f"data.feed_headroom {cfg.data.feed_headroom:g}; data.feed, "
                                       "data.memory_budget or data.stage: auto")]
    return [Check("feed", OK, f"{rate}, training takes {step:,.0f}: headroom {headroom:.1f}x")]


def run_costs(p) -> costs.Costs | None:
    """The run's measured costs; else an estimate from the checkpoint's size and the write rate."""
    found = costs.measured(p.record)
    if found is None and p.checkpoint_bytes and p.write_rate:
        found = costs.estimated(p.checkpoint_bytes, p.write_rate, f" ({p.checkpoint_from})")
    return found


def check_time(p, cfg) -> list[Check]:
    s = cfg.slurm
    key = "slurm.slot" if s.slot else "slurm.time"
    limit = slurm_seconds(s.slot or s.time)
    found = run_costs(p)
    auto = s.signal_margin == "auto"
    out = []
    if auto:
        # what submit renders: measured sessions, else the checkpoint on disk (submit builds no model)
        rendered = found if costs.measured(p.record) or p.checkpoint_from == ON_DISK else None
        margin = costs.auto_margin(rendered)
        if rendered is None and found is not None:
            out.append(Check("time", OK, f"signal_margin auto renders {margin} s until a session is measured; "
                                         f"a stop would need {found.margin} s ({found.source})"))
    else:
        margin = s.signal_margin
    if margin >= limit:
        out.append(Check("time", BLOCKER, f"signal_margin {margin} s{' (auto)' if auto else ''} is not below "
                                          f"{key} {costs.format_seconds(limit)}: raise {key}"))
    out += [Check("time", level, message) for level, message in costs.time_findings(limit, margin, found, auto, key)]
    return out


# (function, fast): fast ones import no TensorFlow and run at every submission
CHECKS = (
    (check_platform, True), (check_stack, True), (check_cuda, True), (check_gpus, False),
    (check_capability, False), (check_precision, False), (check_horovod, True), (check_commands, True),
    (check_lock, True), (check_space, True), (check_node_local, True), (check_store, True), (check_feed, False),
    (check_time, True),
)


def run(p, cfg, fast_only: bool = False) -> list[Check]:
    out = []
    for fn, fast in CHECKS:
        if fast or not fast_only:
            out += fn(p, cfg)
    return out


def blockers(rows: list[Check]) -> list[Check]:
    return [r for r in rows if r.level == BLOCKER]
