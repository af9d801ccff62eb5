"""Typed, frozen, strict configuration.

Every default lives in a dataclass below; a YAML file only overrides.  Loading is
strict: an unknown key, a wrong type or an impossible value raises ConfigError,
which names the file and the key path (and, for a misspelt key, the closest
valid one).  Reading YAML (``yaml.safe_load`` semantics plus limits: duplicate keys,
depth, alias expansion), the conversion and ``--set`` live in
:mod:`hpcjobs.config_load`; checks across fields in :mod:`hpcjobs.config_checks`; the
optimizer and training sections in :mod:`hpcjobs.config_train` (all re-exported here).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import field
from typing import Any, Literal, Optional, Union

from .checks import BUILTIN_ARCHS, check_across, check_arch, check_model, unknown_arch  # noqa: F401
from .loader import ConfigError, build, read_with_base
from .loader import section as _frozen
from .loader import dump, read_yaml, to_dict  # noqa: F401  (hpcjobs.config's names)
from .overrides import apply_overrides, parse_override  # noqa: F401
from .search import ParamSpec, SearchConfig  # noqa: F401
from .transfer import HeadConfig, TransferConfig
from .train import (SEED_MAX, HookConfig, LossConfig, OptimizerConfig, StageConfig, TopBlocks,  # noqa: F401
                    TrainingConfig)
from .train import (MONITORS, DiagnoseConfig, EarlyStoppingConfig, PlateauConfig,  # noqa: F401
                    ScheduleConfig, StopAtConfig, check_monitor, direction)  # (hpcjobs.config's names too)
from .. import plugins
from ..units import SLURM_MEM, check_time_budget, parse_bytes, parse_shard, slurm_seconds


# --------------------------------------------------------------------------- sections
@_frozen
class AugmentConfig:
    """Random augmentation of training images (never of validation or test)."""

    flip_horizontal: bool = False
    flip_vertical: bool = False
    rotation: float = 0.0  # degrees, +-
    shift: float = 0.0  # fraction of size, +-
    zoom: float = 0.0  # fraction, +-
    brightness: float = 0.0  # fraction of 255, +-
    contrast: float = 0.0  # fraction, +-

    def __post_init__(self):
        for name, top in (("rotation", 180), ("shift", 1), ("zoom", 0.99), ("brightness", 1), ("contrast", 1)):
            if not 0 <= getattr(self, name) <= top:
                raise ValueError(f"{name}: must be in [0, {top}]")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, f.name) for f in dataclasses.fields(self))


@_frozen
class DataConfig:
    # A built-in dataset (digits, lfw, fashion-mnist) or a path: a folder of class
    # sub-folders, a .csv/.json listing, a .npz, a folder of IDX files, or an .h5 store.
    source: str = "digits"
    # HDF5 store written by `hpcjobs prepare` and read by `train`; null = keep in memory.
    store: Optional[str] = None
    # node-local staging of data.store: null (read in place), auto (copy it to the node's
    # $SLURM_TMPDIR, else $TMPDIR, else /tmp, once per node) or a folder to copy it to
    stage: Optional[str] = None
    image_size: Optional[tuple[int, int]] = None  # (height, width); null = the source's
    channels: Optional[int] = None  # 1 or 3; null = the source's
    validation_split: float = 0.1
    # null: 20% below 1,000 samples, 10% below 10,000, else 5%; source: the source's own test set
    # (IDX t10k files, an .npz's x_test/y_test, a folder's test/ class tree), validation then from the rest
    test_split: Optional[Union[float, Literal["source"]]] = None
    feed: Literal["auto", "memory", "disk", "hybrid"] = "auto"
    memory_budget: str = "4GiB"
    epochs_per_segment: int = 2
    # at a session's start, the feeder's samples/s measured against the train step's (a second
    # or two; run.json feed_check); a warning when the feed has less than feed_headroom x the step's.
    # auto: in every session of a Slurm job (not in local runs, where the CPU is both feed and step)
    feed_check: Union[bool, Literal["auto"]] = "auto"
    feed_headroom: float = 1.2
    normalize: Literal["standardize", "rescale"] = "standardize"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    classes: tuple[str, ...] = ()  # only these classes of the source (in this order); empty: all
    max_per_class: Optional[int] = None  # a stratified subset of the training split: N images per class
    folds: Optional[int] = None  # K-fold cross-validation over train + validation; null = one fixed split
    fold: Optional[int] = None  # which fold this run validates on; null with folds: all folds in turn
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.validation_split < 1:
            raise ValueError("validation_split: must be in [0, 1)")
        share = self.test_split if isinstance(self.test_split, float) else 0
        if not 0 <= share < 1:
            raise ValueError("test_split: must be in [0, 1), source or null")
        if self.validation_split + share >= 1:
            raise ValueError("validation_split: validation_split + test_split must be below 1")
        if self.image_size is not None and not 1 <= min(self.image_size) <= max(self.image_size) <= 8192:
            raise ValueError("image_size: must be [height, width], each from 1 to 8192")
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed: must be from 0 to {SEED_MAX}")
        if self.channels not in (None, 1, 3):
            raise ValueError("channels: must be 1, 3 or null")
        if self.stage is not None and not self.store:
            raise ValueError("stage: needs data.store (a store written by `hpcjobs prepare`); an in-memory "
                             "prepare has nothing to stage")
        if not self.feed_headroom > 0:
            raise ValueError("feed_headroom: must be > 0 (the feed's samples/s over the train step's)")
        if self.stage == "":
            raise ValueError("stage: null, auto or a folder")
        if self.epochs_per_segment < 1:
            raise ValueError("epochs_per_segment: must be >= 1")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ValueError("max_per_class: must be >= 1 or null")
        twice = next((c for i, c in enumerate(self.classes) if c in self.classes[:i]), None)
        if twice is not None:  # [1, 1] would train a "2-class" model of one class
            raise ValueError(f"classes: {twice!r} is listed twice")
        if self.folds is not None and self.folds < 2:
            raise ValueError("folds: must be >= 2 or null")
        if self.fold is not None and (self.folds is None or not 0 <= self.fold < self.folds):
            raise ValueError(f"fold: must be from 0 to folds - 1 ({'set data.folds first' if self.folds is None else self.folds - 1})")
        try:
            if parse_bytes(self.memory_budget) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"memory_budget: not a positive size: {self.memory_budget!r} (e.g. 512MiB)")


@_frozen
class ModelConfig:
    # simple_cnn | small_resnet | any keras.applications name (e.g. ResNet50, MobileNetV2) | kerashub:PATH (a
    # KerasHub preset folder: its backbone, weights and image preprocessing, and a new head)
    arch: str = "simple_cnn"
    weights: Optional[str] = None  # keras.applications: a weights file, or imagenet (from the cache); never downloaded
    weights_cache: Optional[str] = None  # where imagenet weights are; null: $KERAS_HOME/models or ~/.keras/models
    head: HeadConfig = field(default_factory=HeadConfig)
    bn_trainable: bool = False  # BatchNormalization of unfrozen blocks trains too (default: inference mode)
    # an hpcjobs run or export, or a .weights.h5 written for this architecture: copy the layers that match by
    # name and shape (those filled and those left are reported)
    init_from: Optional[str] = None
    freeze_backbone: bool = False
    dropout: float = 0.5
    width: int = 32  # filters of the first conv layer of the built-in nets
    l2: float = 0.0  # L2 penalty on the built-in nets' kernels (and their head)
    # your own model.arch (path/to/file.py:build or package.module:build): build(input_shape, num_classes,
    # **options); its output is probabilities or logits (then hpcjobs adds the softmax)
    options: dict[str, Any] = field(default_factory=dict)
    outputs: Literal["probabilities", "logits"] = "probabilities"

    def __post_init__(self):
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout: must be in [0, 1)")
        if self.width < 1:
            raise ValueError("width: must be >= 1")
        if self.l2 < 0:
            raise ValueError("l2: must be >= 0")
        check_model(self)


@_frozen
class CheckpointConfig:
    every_steps: Optional[int] = None
    every_minutes: Optional[float] = 10.0
    every_epochs: Optional[int] = None  # also at the end of every N-th epoch
    max_to_keep: int = 3
    async_write: bool = True  # saves block only while copying to host memory

    def __post_init__(self):
        if self.every_steps is not None and self.every_steps < 1:
            raise ValueError("every_steps: must be >= 1 or null")
        if self.every_minutes is not None and self.every_minutes <= 0:
            raise ValueError("every_minutes: must be > 0 or null")
        if self.every_epochs is not None and self.every_epochs < 1:
            raise ValueError("every_epochs: must be >= 1 or null")
        if self.max_to_keep < 1:
            raise ValueError("max_to_keep: must be >= 1")


@_frozen
class DistributeConfig:
    strategy: Literal["auto", "none", "mirrored", "multiworker", "horovod"] = "auto"
    logical_cpu_devices: int = 0  # >0: split the CPU into N logical devices (testing mirrored)
    horovod_compression: Literal["none", "fp16"] = "none"  # gradients sent as float16 in the allreduce
    horovod_fusion_threshold: Optional[int] = None  # bytes of tensors fused per allreduce; null: Horovod's 128 MiB

    def __post_init__(self):
        if not 0 <= self.logical_cpu_devices <= 64:
            raise ValueError("logical_cpu_devices: must be from 0 to 64")
        if self.horovod_fusion_threshold is not None and self.horovod_fusion_threshold < 0:
            raise ValueError("horovod_fusion_threshold: must be >= 0 (0 turns fusion off) or null")


@_frozen
class SlurmConfig:
    """Resources and behaviour of Slurm jobs (`hpcjobs submit`; flags of the same names override)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    ntasks_per_node: Optional[int] = None  # null: 1 (tf.distribute) or gpus_per_node (horovod)
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # per node: 64G, 500M, 64GiB
    time: str = "01:00:00"  # Slurm's forms (a bare number is minutes, as in sbatch) or 90m, 4h, 2d
    job_name: Optional[str] = None  # null: the config's name
    modules: tuple[str, ...] = ()  # `module load` each, in order
    activate: Optional[str] = None  # e.g. path/to/venv/bin/activate (sourced), or a conda env name
    extra_sbatch: tuple[str, ...] = ()  # more #SBATCH options, e.g. --constraint=v100
    max_requeues: int = 10
    # seconds before the time limit for SIGUSR1; auto: what the run's measured sessions need
    # (the slowest save + the longest call + a safety term; hpcjobs.cluster.costs)
    signal_margin: int | Literal["auto"] = 120
    python: Optional[str] = None  # the job's interpreter; null: the one running `hpcjobs submit`
    srun_args: tuple[str, ...] = ()  # more srun options, e.g. --mpi=pmix for Horovod
    launcher: str = "srun"  # srun, or mpirun: Open MPI's own Slurm support (Bede's bede-mpirun; no PMI needed)
    mpirun_args: tuple[str, ...] = ()  # more mpirun options, e.g. "--mca btl ^openib"
    infer_partition: Optional[str] = None  # inference jobs; null: partition
    infer_time: Optional[str] = None  # inference jobs; null: time
    prepare_partition: Optional[str] = None  # `submit --prepare` CPU jobs; null: partition
    prepare_time: Optional[str] = None  # `submit --prepare` jobs; null: time
    array: int = 0  # >0: a job array of this many tasks (training: repeats with seeds seed..seed+N-1)
    array_parallel: Optional[int] = None  # at most this many array tasks at once
    search: tuple[str, ...] = ()  # grid search as a job array: "key.path=v1,v2,..." each
    slot: Optional[str] = None  # daily (or other) time slots: each job's --time, e.g. 01:00:00
    slot_every: str = "day"  # day, week, or a duration like 12h
    slot_at: Optional[str] = None  # HH:MM of the first slot
    slot_count: Optional[int] = None  # a cap on the chain's jobs; null: each slot submits the next until the run is done
    trials_per_node: int = 1  # submit --search: search workers per array task, one GPU each (Bede 4, JADE 8)

    _NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,:+-]*")
    _OPTION = re.compile(r"(?:#SBATCH\s+)?--?[A-Za-z][A-Za-z0-9-]*(?:[=\s].*)?", re.S)
    _KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+=.+", re.S)
    _AT = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?")

    def __post_init__(self):
        for name in ("nodes", "max_requeues"):
            if getattr(self, name) < (1 if name == "nodes" else 0):
                raise ValueError(f"{name}: must be >= {1 if name == 'nodes' else 0}")
        if self.gpus_per_node < 0:
            raise ValueError("gpus_per_node: must be >= 0")
        for name in ("ntasks_per_node", "cpus_per_task", "array_parallel"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 or null")
        if self.array < 0:
            raise ValueError("array: must be >= 0")
        if self.slot_count is not None and self.slot_count < 1:
            raise ValueError("slot_count: must be >= 1 or null (until the run is done)")
        if not 1 <= self.trials_per_node <= 64:
            raise ValueError("trials_per_node: must be from 1 to 64")
        if self.signal_margin != "auto" and self.signal_margin < 1:
            raise ValueError("signal_margin: must be >= 1")
        # nothing that reaches a job script may carry a line break or another control character
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, str) and (not v.strip() or any(ord(c) < 32 or ord(c) == 127 for c in v)):
                    raise ValueError(f"{f.name}: {v!r}: empty, or has a line break or control character")
        for name in ("partition", "account", "qos", "infer_partition", "prepare_partition"):
            v = getattr(self, name)
            if v is not None and not self._NAME.fullmatch(v):
                raise ValueError(f"{name}: {v!r} is not a Slurm name (letters, digits, _ . , : + -)")
        if self.job_name is not None and "/" in self.job_name:
            raise ValueError(f"job_name: {self.job_name!r}: no '/' (the name is part of the log file name)")
        if self.mem is not None and not SLURM_MEM.fullmatch(self.mem.strip()):
            raise ValueError(f"mem: {self.mem!r} is not a size like 64G, 500M or 64GiB")
        if self.launcher not in ("srun", "mpirun"):
            raise ValueError(f"launcher: {self.launcher!r}: must be srun or mpirun")
        for name in ("modules", "srun_args", "mpirun_args"):
            for v in getattr(self, name):
                if name == "modules" and len(v.split()) != 1:
                    raise ValueError(f"modules: {v!r}: one module per entry")
                if name != "modules" and not self._OPTION.fullmatch(v):
                    raise ValueError(f"{name}: {v!r}: expected an option like "
                                     f"{'--mpi=pmix' if name == 'srun_args' else '--mca btl ^openib'}")
        for v in self.extra_sbatch:
            if not self._OPTION.fullmatch(v):
                raise ValueError(f"extra_sbatch: {v!r}: expected an sbatch option like --constraint=v100")
        for v in self.search:
            if not self._KEY.fullmatch(v):
                raise ValueError(f"search: {v!r}: expected key.path=value1,value2,...")
        if self.array and self.search:
            raise ValueError("array: give array (repeats) or search (a grid), not both")
        self._check_times()

    def _check_times(self):
        """time, infer_time and the slot settings: Slurm times of a minute or more, the
        warning signal before the limit, a slot no longer than its period."""
        seconds = {}
        for name in ("time", "infer_time", "prepare_time", "slot", "slot_every"):
            v = getattr(self, name)
            if v is None or (name == "slot_every" and v in ("day", "week")):
                continue
            try:
                seconds[name] = slurm_seconds(v)
            except ValueError as e:
                raise ValueError(f"{name}: {e}")
            if seconds[name] < 60:
                raise ValueError(f"{name}: {v!r} is below Slurm's minimum of one minute")
        if self.slot_at is not None and not self._AT.fullmatch(self.slot_at.strip()):
            raise ValueError(f"slot_at: {self.slot_at!r}: expected HH:MM (24-hour clock)")
        limit = seconds.get("slot", seconds["time"])
        if self.signal_margin != "auto" and self.signal_margin >= limit:
            raise ValueError(f"signal_margin: {self.signal_margin} s is not below the time limit "
                             f"({int(limit)} s): lower signal_margin or raise time")
        if self.slot is not None:
            every = {"day": 86400, "week": 7 * 86400}.get(self.slot_every) or seconds["slot_every"]
            if seconds["slot"] > every:
                raise ValueError(f"slot: {self.slot} is longer than slot_every ({self.slot_every})")


@_frozen
class SubmissionConfig:
    """A Kaggle-style CSV of the predicted labels, e.g. ``ImageId,Label`` (the KAUST tutorial)."""

    id_column: str = "ImageId"
    label_column: str = "Label"
    id: Literal["row", "path", "stem"] = "row"  # row: the input's position + first_id; stem: file name
    first_id: int = 1
    header: bool = True


@_frozen
class InferConfig:
    model: Optional[str] = None  # a run directory or an export directory
    # an image folder tree, a .csv/.json listing (path column; labels optional),
    # an hpcjobs .h5 store or an .npz of images
    input: Optional[str] = None
    output: Optional[str] = None  # results file: .h5 or .csv (see format)
    format: Literal["auto", "h5", "csv", "both"] = "auto"  # auto: by the output's extension
    split: Literal["test", "val", "train", "all"] = "test"  # which split of an .h5 store
    batch_size: int = 256
    top_k: int = 5
    chunk_size: int = 1024  # rows per atomically committed chunk (the unit of resume)
    workers: Optional[int] = None  # decode threads; null = the CPU count
    shard: Optional[str] = None  # "i/n"; null = from the Slurm array or MPI rank, else 0/1
    time_budget: Optional[str] = None  # stop after the chunk that would cross it (exit 75)
    submission: Optional[SubmissionConfig] = None  # also STEM.submission.csv, Kaggle style (id, label)
    # import the Python code an export carries (a model of the trainer's own: export/code/); importing code
    # runs it, so only for a source you trust (the same as --trust-code; how `submit --infer` says it)
    trust_code: bool = False

    def __post_init__(self):
        for name in ("batch_size", "top_k", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise ValueError("workers: must be >= 1 or null")
        if self.shard is not None:
            try:
                parse_shard(self.shard)
            except ValueError as e:
                raise ValueError(f"shard: {e}") from None
        check_time_budget(self.time_budget)


EXPORT_FORMATS = ("keras", "saved_model", "tflite", "tflite_int8", "onnx")


@_frozen
class ExportConfig:
    """The export bundle written at the end of training (and by ``hpcjobs export``)."""

    from_: Literal["best", "latest"] = "best"  # YAML key ``from``: best epoch by the monitor, or the last weights
    # model.keras is always written; saved_model (serving, uint8 input), tflite (float32),
    # tflite_int8 (dynamic-range int8), onnx (needs the onnx extra) are converted from it
    formats: tuple[Literal["keras", "saved_model", "tflite", "tflite_int8", "onnx"], ...] = ("keras",)
    min_agreement: float = 0.995  # every format's top-1 agreement with model.keras on the test split
    # RUN/plots/training.png and the test split's evaluation/confusion_matrix.png (0.3 s and matplotlib
    # per run: a search of many trials may go without); the CSV and JSON files are always written
    plots: bool = True

    def __post_init__(self):
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("formats: a format is listed twice")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError("min_agreement: must be in [0, 1]")


@_frozen
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    search: SearchConfig = field(default_factory=SearchConfig)  # hpcjobs search and lr-find (config_search.py)

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ValueError("name: use letters, digits, '.', '_' and '-' only")
        if self.name.startswith("."):  # '.' and '..' would make runs/<name> the runs folder or the current one
            raise ValueError(f"name: {self.name!r} starts with '.'; it names the folder runs/<name>")
        check_across(self)


# --------------------------------------------------------------------------- loading
def absolute_code_paths(values: dict, base_dir: str) -> dict:
    """``values`` with every relative ``file.py:name`` of the user's code made absolute."""
    def fix(section: str, key: str):
        sec = values.get(section)
        if isinstance(sec, dict) and key in sec:
            values[section] = dict(sec, **{key: plugins.absolute(sec[key], base_dir)})

    fix("model", "arch")
    fix("data", "source")
    fix("training", "loss")
    loss = values.get("training", {}).get("loss") if isinstance(values.get("training"), dict) else None
    if isinstance(loss, dict) and "name" in loss:  # training.loss: {name: my_loss.py:fn, ...}
        values["training"] = dict(values["training"], loss=dict(loss, name=plugins.absolute(loss["name"], base_dir)))
    hooks = values.get("training", {}).get("hooks") if isinstance(values.get("training"), dict) else None
    if isinstance(hooks, list):
        values["training"] = dict(values["training"], hooks=[
            plugins.absolute(h, base_dir) if isinstance(h, str) else
            dict(h, hook=plugins.absolute(h["hook"], base_dir)) if isinstance(h, dict) and "hook" in h else h
            for h in hooks])
    return values


def from_dict(values: dict, where: str = "<config>", overrides: list[str] | None = None,
              base_dir: str | None = None) -> Config:
    """A Config from ``values`` (and ``--set`` ``overrides``); code files relative to
    ``base_dir`` (default: the current directory)."""
    values = absolute_code_paths(apply_overrides(dict(values or {}), list(overrides or [])), base_dir or os.getcwd())
    try:
        return build(Config, values, where, "")
    except ConfigError as e:
        if overrides and e.where == where:
            # the bad value may come from --set; say both
            e = ConfigError(f"{where} (with --set)", e.key, e.message)
        raise e


def load(path: str, overrides: list[str] | None = None) -> Config:
    """Load a config file.  ``base: other.yaml`` (relative to the file) is read first.
    The user's code files (``file.py:name`` in model.arch, data.source, training.loss,
    training.hooks) are relative to the file, and made absolute here."""
    values = read_with_base(path)
    if "name" not in values:
        values["name"] = os.path.splitext(os.path.basename(path))[0]
    return from_dict(values, path, overrides, base_dir=os.path.dirname(os.path.abspath(path)))
