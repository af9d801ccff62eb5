"""What doctor looks at, gathered into one plain object (``Probe``): the checks
(``checks.py``) read only it, so a test hands them a stand-in that reports a V100, a full
disk or a broken lock, and the logic under test is the real one.

``probe(cfg, run_dir, full=False)`` fills the fields that need no TensorFlow import (the
versions from the installed packages' metadata, CUDA/cuDNN from TensorFlow's own
``build_info.py`` read as text, the launcher's commands, the run directory's file system,
the partition's nodes, the store); ``full=True`` adds what does (the GPUs TensorFlow
sees, Horovod's build, the checkpoint size of the built model).
"""
from __future__ import annotations

import ast
import fcntl
import importlib.metadata as md
import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from ..cluster import costs
from ..rundir import RunDir

TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos", "intel-tensorflow",
                    "tf-nightly")
# file systems a node sees as its own: what they hold is gone when a job moves to another node
LOCAL_FS = {"tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "overlay", "vfat", "devtmpfs"}
SAMPLE_BYTES = 16 << 20  # the store's read sample
SAMPLE_FILES = 2000  # a folder source: at most this many files listed
WRITE_SAMPLE = 16 << 20  # the write-rate sample
ON_DISK = "the run's newest checkpoint"  # Probe.checkpoint_from when it was measured on disk


@dataclass
class Gpu:
    name: str
    capability: tuple[int, int] | None  # (7, 0) for a V100


@dataclass
class Probe:
    """Everything the checks read.  None means "not probed" (the fast subset) or "not known"."""
    where: str = "doctor"  # doctor | submit (what the checks are run for)
    machine: str = ""
    python: str = ""
    tensorflow: str | None = None
    keras: str | None = None
    build: dict | None = None  # TensorFlow's build_info: is_cuda_build, cuda_version, cuda_compute_capabilities...
    cudnn: str | None = None  # the cuDNN pip package installed beside it (nvidia-cudnn-cu12/13), if any
    gpus: list | None = None  # [Gpu]; None: not probed
    horovod: str | None = None  # Horovod's version (installed), or None
    horovod_built: dict | None = None  # {"mpi": bool, "nccl": bool, "gloo": bool}; None: not probed
    commands: dict = field(default_factory=dict)  # name -> path, or None when missing
    fs_path: str = ""  # the folder probed: the run directory or its nearest existing parent
    fstype: str | None = None
    mount: str | None = None
    free_bytes: int | None = None
    lock_error: str | None = None  # why an fcntl lock could not be taken and released; None: it could
    write_rate: float | None = None  # bytes/s, written and fsync'ed
    partition: str | None = None
    partition_nodes: list | None = None  # [(node, address)]; None: not known (no Slurm here)
    this_host: set = field(default_factory=set)  # this host's names and addresses
    checkpoint_bytes: int | None = None
    checkpoint_from: str = ""  # how checkpoint_bytes was found
    store: str | None = None  # the file or folder the training reads (None: a built-in dataset)
    store_error: str | None = None
    store_bytes: int | None = None  # its total size
    store_rate: float | None = None  # bytes/s read over a sample
    epoch_seconds: float | None = None  # an epoch of this run, from its metrics.csv
    feed_rate: float | None = None  # samples/s of the run's feeder over the store (data.feed.measure_feed)
    record: dict = field(default_factory=dict)  # run.json
    errors: list = field(default_factory=list)  # what could not be probed, and why


# --------------------------------------------------------------------------- the stack, no TensorFlow import
def _version(*names: str) -> str | None:
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def tf_build_info() -> dict | None:
    """TensorFlow's ``build_info`` dict, read from its ``python/platform/build_info.py`` as
    text (importing it would import TensorFlow); None when TensorFlow is not installed."""
    try:
        spec = importlib.util.find_spec("tensorflow")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "python", "platform", "build_info.py")
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "build_info" for t in node.targets):
            value = node.value
            if isinstance(value, ast.Call) and value.args:  # collections.OrderedDict([...])
                value = value.args[0]
            try:
                return dict(ast.literal_eval(value))
            except (ValueError, TypeError):
                return None
    return None


# --------------------------------------------------------------------------- file system
def mount_of(path: str) -> tuple[str | None, str | None]:
    """(mount point, file system type) of the mount holding ``path`` (/proc/mounts)."""
    best, fstype = None, None
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                point = parts[1].replace("\\040", " ")
                if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best or ""):
                    best, fstype = point, parts[2]
    except OSError:
        pass
    return best, fstype


def lock_test(folder: str) -> str | None:
    """Take an fcntl lock (flock, as ``RunDir.lock``) on a new file in ``folder``, check that
    a second descriptor is refused it, release it; None when all went well, else why not."""
    try:
        fd, path = tempfile.mkstemp(prefix=".hpcjobs-lock-test-", dir=folder)
    except OSError as e:
        return f"cannot create a file there ({e.strerror})"
    other = None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return "a second lock on the same file was granted: the locks do not exclude"
        except BlockingIOError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError as e:
        return f"flock failed: {e.strerror or e}"
    finally:
        if other is not None:
            os.close(other)
        os.close(fd)
        os.remove(path)


def _scontrol(*args: str) -> str | None:
    if not shutil.which("scontrol"):
        return None
    try:
        p = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def _fields(line: str) -> dict:
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


def partition_nodes(partition: str | None) -> tuple[str | None, list | None]:
    """(partition, [(node, address)]) from scontrol: the given partition or the default one."""
    text = _scontrol("show", "partition", "-o", *([partition] if partition else []))
    if not text:
        return partition, None
    rows = [_fields(line) for line in text.splitlines() if line.strip()]
    row = next((r for r in rows if not partition and r.get("Default") == "YES"), rows[0] if rows else None)
    if not row or not row.get("Nodes") or row.get("Nodes") == "(null)":
        return partition, None
    nodes_text = _scontrol("show", "node", "-o", row["Nodes"])
    if not nodes_text:
        return row.get("PartitionName", partition), None
    out = []
    for line in nodes_text.splitlines():
        r = _fields(line)
        if r.get("NodeName"):
            out.append((r["NodeName"], r.get("NodeAddr") or r.get("NodeHostName") or r["NodeName"]))
    return row.get("PartitionName", partition), out


def this_host() -> set:
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), platform.node()}
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return names


# --------------------------------------------------------------------------- the store
def store_path(cfg, base_dir: str = ".") -> str | None:
    """The file or folder training reads: data.store, else data.source when it is a path."""
    d = cfg.data
    path = d.store or d.source
    if not path or (not d.store and not os.path.exists(path) and "/" not in path and "." not in path):
        return None  # a built-in dataset's name
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def read_sample(path: str, limit: int = SAMPLE_BYTES) -> tuple[int, float, int | None]:
    """(bytes read, seconds, total bytes) over up to ``limit`` bytes of a file or a folder's
    files; the total is None for a folder of more than SAMPLE_FILES files (not all listed)."""
    if not os.path.exists(path):
        raise FileNotFoundError("not found")
    files = [path] if os.path.isfile(path) else []
    truncated = False
    if not files:
        for folder, _, names in os.walk(path):
            files += [os.path.join(folder, n) for n in sorted(names)]
            if len(files) > SAMPLE_FILES:
                files, truncated = files[:SAMPLE_FILES], True
                break
    total = None if truncated else sum(os.path.getsize(f) for f in files)
    done, t = 0, time.monotonic()
    for f in files:
        with open(f, "rb") as fh:
            while done < limit:
                chunk = fh.read(4 << 20)
                if not chunk:
                    break
                done += len(chunk)
        if done >= limit:
            break
    return done, max(time.monotonic() - t, 1e-6), total


def epoch_seconds(rd: RunDir) -> float | None:
    try:
        rows = rd.read_metrics()
    except Exception:  # an unreadable metrics.csv: no figure (the run's own commands say why)
        return None
    secs = [r.get("seconds") for r in rows if isinstance(r.get("seconds"), (int, float)) and r.get("seconds") > 0]
    return float(min(secs)) if secs else None


# --------------------------------------------------------------------------- the probe
def probe(cfg, run_dir: str, full: bool = False, where: str = "doctor") -> Probe:
    p = Probe(where=where, machine=platform.machine(), python=platform.python_version())
    p.tensorflow = _version(*TF_DISTRIBUTIONS)
    p.keras = _version("keras")
    p.build = tf_build_info()
    p.cudnn = _version("nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "nvidia-cudnn-cu11")
    p.horovod = _version("horovod")
    p.commands = {c: shutil.which(c) for c in ("sbatch", "squeue", "scontrol", "mpirun")}
    rd = RunDir(run_dir)
    p.record = rd.read_record().to_dict()
    p.fs_path = costs.existing_folder(run_dir)
    p.mount, p.fstype = mount_of(p.fs_path)
    try:
        st = os.statvfs(p.fs_path)
        p.free_bytes = st.f_bavail * st.f_frsize
    except OSError as e:
        p.errors.append(f"statvfs {p.fs_path}: {e.strerror}")
    p.lock_error = lock_test(p.fs_path)
    try:
        p.write_rate = costs.write_rate(p.fs_path, WRITE_SAMPLE)
    except OSError as e:
        p.errors.append(f"write {p.fs_path}: {e.strerror}")
    p.partition, p.partition_nodes = partition_nodes(cfg.slurm.partition)
    p.this_host = this_host()
    size = costs.checkpoint_bytes_on_disk(run_dir)
    if size:
        p.checkpoint_bytes, p.checkpoint_from = size, ON_DISK
    p.store = store_path(cfg)
    if p.store:
        try:
            done, seconds, p.store_bytes = read_sample(p.store)
            p.store_rate = done / seconds if done else None
        except OSError as e:
            p.store_error = f"{e.strerror or e}"  # FileNotFoundError("not found") has no strerror
    p.epoch_seconds = epoch_seconds(rd)
    if full:
        _full(p, cfg)
    return p


def _full(p: Probe, cfg):
    """What needs TensorFlow: the GPUs it sees, Horovod's build, the built model's checkpoint size."""
    try:
        import tensorflow as tf
    except Exception as e:  # a broken install says so in the stack check
        p.errors.append(f"import tensorflow: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return
    p.gpus = []
    for dev in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(dev) or {}
        p.gpus.append(Gpu(details.get("device_name") or dev.name, details.get("compute_capability")))
    if cfg.distribute.strategy == "horovod" and p.horovod:
        try:
            import horovod.tensorflow as hvd

            p.horovod_built = {"mpi": bool(hvd.mpi_built()), "nccl": bool(hvd.nccl_built()),
                               "gloo": bool(hvd.gloo_built())}
        except Exception as e:  # its library does not load: the check says so
            p.errors.append(f"import horovod.tensorflow: {type(e).__name__}")
            p.horovod_built = {"mpi": False, "nccl": False, "gloo": False}
    if cfg.data.store and not p.store_error:
        try:
            p.feed_rate = feed_rate(cfg)
        except Exception as e:  # the training will say why, in its own words
            p.errors.append(f"measure the feed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    if not p.checkpoint_bytes:
        try:
            p.checkpoint_bytes, p.checkpoint_from = checkpoint_size(cfg), "the built model and optimizer"
        except Exception as e:  # the data or the model cannot be built here: the training will say why
            p.errors.append(f"build the model: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")


def feed_rate(cfg) -> float:
    """Samples/s of the run's feeder over its store, one worker: the feed check's own
    measurement (``data.feed.measure_feed``), so doctor and a session's start agree."""
    from ..data import load_data
    from ..data.feed import Feeder, measure_feed

    d, t = cfg.data, cfg.training
    feeder = Feeder(load_data(cfg), feed=d.feed, memory_budget=d.memory_budget, epochs_per_segment=d.epochs_per_segment,
                    seed=d.seed + t.seed, augment=d.augment, global_batch=t.batch_size)
    return measure_feed(feeder)


def checkpoint_size(cfg) -> int:
    """Bytes of a checkpoint of ``cfg``'s model: its variables and its optimizer's, built."""
    from ..data import load_data
    from ..models import build as models
    from ..train.optim import make_optimizer

    data = load_data(cfg)
    model = models.build(cfg.model, data.image_shape, data.num_classes, data.mean, data.std, cfg.data.normalize)
    opt = make_optimizer(cfg.optimizer, cfg.optimizer.learning_rate, 1000)
    opt.build(model.trainable_variables)
    variables = opt.variables() if callable(opt.variables) else opt.variables
    return sum(int(v.numpy().nbytes) for v in list(model.variables) + list(variables))
