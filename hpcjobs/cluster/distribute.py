"""ClusterInfo + config into a tf.distribute strategy or a Horovod wrapper.

The training loop sees one ``Runtime``: a strategy (the default strategy for one
device), how many input pipelines (workers) there are and which one this is, how
many replicas this process drives, and whether it is the chief (the only writer).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from .info import ClusterError, ClusterInfo
from ..config import DistributeConfig

DEFAULT_PORT = 23456


@dataclass
class Runtime:
    kind: str  # none | mirrored | multiworker | horovod
    strategy: Any
    worker: int = 0  # this process's input pipeline
    workers: int = 1  # input pipelines
    local_replicas: int = 1  # replicas this process drives
    hvd: Optional[Any] = None  # horovod.tensorflow, when kind == horovod
    compression: Optional[Any] = None  # Horovod's gradient compression (hvd.Compression.fp16 or none)
    gpus: int = 0  # GPUs this process sees

    @property
    def replicas(self) -> int:
        return self.workers * self.local_replicas

    @property
    def is_chief(self) -> bool:
        return self.worker == 0

    def scale_lr(self, lr: float, how: str) -> float:
        n = self.replicas
        return lr * {"none": 1.0, "linear": float(n), "sqrt": math.sqrt(n)}[how]


def _gpus_with_memory_growth(tf) -> list:
    """The physical GPUs, each set to allocate its memory as needed (before first use)."""
    gpus = tf.config.list_physical_devices("GPU")
    for g in gpus:
        try:
            tf.config.experimental.set_memory_growth(g, True)
        except (RuntimeError, ValueError):
            pass
    return gpus


def _configure_devices(tf, cfg: DistributeConfig, info: ClusterInfo):
    gpus = _gpus_with_memory_growth(tf)
    if cfg.logical_cpu_devices > 0:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.logical_cpu_devices)
    return gpus


def _tf_config_from_slurm(info: ClusterInfo, port: int) -> dict:
    """A TF_CONFIG for a Slurm step with one task per node (or several).

    Built from the node list like SlurmClusterResolver, without its GPU query, so it also
    works on CPU-only nodes.
    """
    if not info.nodes or info.world_size < 1:
        raise ClusterError("multi-worker training in Slurm needs SLURM_STEP_NODELIST: launch with srun")
    per_node = max(1, math.ceil(info.world_size / len(info.nodes)))
    # a port per rank: unique even when several "nodes" share one host (the local test cluster)
    workers = [f"{info.nodes[r // per_node]}:{port + r}" for r in range(info.world_size)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": info.rank}}


def setup(cfg: DistributeConfig, info: ClusterInfo) -> Runtime:
    import tensorflow as tf

    gpus = _configure_devices(tf, cfg, info)
    kind = cfg.strategy
    if kind == "auto":
        if info.world_size > 1:
            kind = "horovod" if info.launcher == "mpi" else "multiworker"
        elif len(gpus) > 1 or cfg.logical_cpu_devices > 1:
            kind = "mirrored"
        else:
            kind = "none"
    if kind == "none":
        if info.world_size > 1:
            raise ClusterError(f"distribute.strategy none, but {info.world_size} processes were launched: "
                               "use multiworker or horovod, or launch one process")
        return Runtime("none", tf.distribute.get_strategy(), gpus=len(gpus))
    if kind == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
                  [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        return Runtime("mirrored", strategy, local_replicas=strategy.num_replicas_in_sync, gpus=len(gpus))
    if kind == "multiworker":
        if info.tf_config is None:
            if info.launcher != "slurm":
                raise ClusterError("distribute.strategy multiworker needs TF_CONFIG or a Slurm step "
                                   "(launch with srun)")
            os.environ["TF_CONFIG"] = json.dumps(_tf_config_from_slurm(info, DEFAULT_PORT))
        comm = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=comm)
        resolver = strategy.cluster_resolver
        worker = int(resolver.task_id or 0)
        workers = len(resolver.cluster_spec().as_dict().get("worker", [1]))
        return Runtime("multiworker", strategy, worker=worker, workers=workers,
                       local_replicas=strategy.num_replicas_in_sync // workers, gpus=len(gpus))
    if kind == "horovod":
        try:
            import horovod.tensorflow as hvd
        except ImportError:
            raise ClusterError("distribute.strategy horovod: Horovod is not installed; "
                               "build it with slurm/install-horovod.sh") from None
        if cfg.horovod_fusion_threshold is not None:  # read by hvd.init()
            os.environ["HOROVOD_FUSION_THRESHOLD"] = str(cfg.horovod_fusion_threshold)
        hvd.init()
        if gpus:  # one GPU per rank, from the rank on its node
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        compression = hvd.Compression.fp16 if cfg.horovod_compression == "fp16" else hvd.Compression.none
        return Runtime("horovod", tf.distribute.get_strategy(), worker=hvd.rank(), workers=hvd.size(), hvd=hvd,
                       compression=compression, gpus=min(1, len(gpus)))
    raise ClusterError(f"distribute.strategy: unknown strategy {kind}")


def inference_strategy(info: Optional[ClusterInfo] = None, devices: Optional[list[str]] = None):
    """The strategy one inference process predicts with: every local GPU (MirroredStrategy);
    one GPU per process when a launcher started one process per GPU (``info.local_size``
    > 1); otherwise the default device.  ``devices`` names the replicas (for tests)."""
    import tensorflow as tf

    if devices:
        return tf.distribute.MirroredStrategy(devices=devices)
    gpus = _gpus_with_memory_growth(tf)
    if gpus and info is not None and info.local_size > 1:
        tf.config.set_visible_devices(gpus[info.local_rank % len(gpus)], "GPU")
        return tf.distribute.get_strategy()
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(devices=[d.name for d in tf.config.list_logical_devices("GPU")])
    return tf.distribute.get_strategy()
