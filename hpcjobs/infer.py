"""Batch inference with an exported model: shards, resumable chunks, merge.

    hpcjobs infer CONFIG                                   # the config's infer: section
    hpcjobs infer --model RUN_OR_EXPORT --input PATH --output preds.h5 [--shard i/n]
    hpcjobs infer --merge --output preds.h5                # join the shards' part files

The path of the data
--------------------
1. **Rows.**  The input becomes a fixed, ordered list of rows:

   * a folder tree: every image file (``IMAGE_EXTENSIONS``; dot-files and dot-folders
     skipped) below it, sorted by relative path; a row's ``path`` is ``FOLDER/relpath``;
   * a ``.csv`` listing (first column the path, an optional ``path`` header, any other
     columns such as a label ignored) or a ``.json`` list of paths or of
     ``{"path": ...}``: in listing order; relative paths are relative to the listing,
     and a row's ``path`` is written as the listing gives it;
   * an hpcjobs ``.h5`` store: the ``test`` split by default (the held-out images of
     a training run); ``infer.split`` / ``--split`` picks ``train``, ``val`` or ``all``
     (train, val, test concatenated); a row's ``path`` is ``STORE:split[j]``;
   * an ``.npz`` with an ``images`` (or ``x``) array, labels optional: ``FILE[i]``.

2. **Shards.**  Shard i of n takes the contiguous rows ``[i*N//n, (i+1)*N//n)``.  The
   shard comes from ``--shard i/n``, else from the Slurm array (``SLURM_ARRAY_TASK_ID``
   of ``SLURM_ARRAY_TASK_COUNT``, ids from 0), else from the MPI rank under mpirun,
   else it is 0/1.  All of it is read through ``hpcjobs.cluster.detect()``.

3. **Decode and preprocess** on a pool of ``infer.workers`` threads (default: the CPU
   count), rows kept in order, about two batches ahead of the model, feeding a
   ``tf.data`` pipeline (``from_generator``, prefetched, distributed over the
   replicas).  Every image goes through ``hpcjobs.data.images.decode`` and
   ``hpcjobs.data.images.to_model_image`` (size and channels from preprocessing.json's
   ``input_shape``): the very function ``hpcjobs prepare`` stores training images with.
   (Plain threads rather than a ``tf.numpy_function`` map: the eager resize inside
   ``to_model_image`` ran about 1.5x slower on tf.data's own threads.)  The model holds
   its own normalisation; batches go in as pixels 0..255.  With several local GPUs the
   model is replicated over them (MirroredStrategy); on CPU it runs on the CPU.

4. **Chunks.**  Every ``infer.chunk_size`` rows of a shard are committed as one file,
   ``STEM.part-IIIII-of-NNNNN.chunks/FIRSTROW-ENDROW.npz``, written under a temporary
   name, fsync'ed and renamed into place.  A restarted shard (after a signal, the time
   budget, a requeue or SIGKILL) checks the folder's ``manifest.json`` (same input
   rows, model, top_k), then continues after the last whole chunk: no row is lost or
   repeated.  SIGUSR1/SIGTERM or the time budget (``--time-budget``, or the Slurm job's
   end) stop the job after the current chunk with exit code 75.

5. **Outputs.**  When a shard of several is complete its chunks are joined into
   ``STEM.part-IIIII-of-NNNNN.h5``; ``--merge`` (or rank 0 under mpirun, once all
   ranks are done) joins the parts in row order into the outputs and removes the parts.
   An unsharded run writes the outputs directly.  The outputs, all written atomically:

   * ``STEM.h5``: ``probabilities`` (N, classes) float32, ``top_k/indices`` (N, k)
     int32, ``top_k/probabilities`` (N, k) float32, ``path`` (N,) utf-8, ``row`` (N,) the
     position in the input list, ``errors/{row,path,reason}``; attributes
     ``class_names``, ``top_k``, ``rows_total``, ``errors``, ``model``, ``input``;
   * ``STEM.csv``: ``path,class,probability,top_k`` with top_k as ``name:prob;...``;
   * ``STEM.errors.csv``: ``path,reason`` of every input that could not be read
     (corrupt, truncated, empty, not an image); those rows are skipped, and the job
     still exits 0.

   Which of the first two: by the output's extension (``.h5``/``.hdf5``, ``.csv``), or
   ``infer.format: h5 | csv | both``.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .config import ConfigError, InferConfig
from .errors import EX_TEMPFAIL
from .data.images import IMAGE_EXTENSIONS, ImageError, decode, to_model_image
from .data.sources import SourceError
from .rundir import atomic_path, atomic_write
from .signals import StopFlag
from . import units
from .units import parse_duration

FORMAT = "hpcjobs-infer/1"
READ_ROWS = 65536  # rows per block when joining part files


class InferError(ConfigError):
    """A user error of ``hpcjobs infer`` (exit code 2): one line naming the file and the fix."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.where, self.key, self.message = "infer", "", message


# =========================================================================== inputs
@dataclass
class Inputs:
    """The ordered rows of an input and how to read row i's raw image."""

    origin: str
    names: list[str]  # the ``path`` written for each row
    load: Callable[[int], np.ndarray]  # raises ImageError for a bad file
    fingerprint: str  # changes when the row list (or an array file) changes
    close: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self.names)


def _digest(names: Iterable[str], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for n in names:
        h.update(n.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:20]


def _printable(name: str) -> str:
    """A file name as valid UTF-8 (undecodable bytes from the file system become U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _file_stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _folder_inputs(folder: str) -> Inputs:
    rel = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                rel.append(os.path.relpath(os.path.join(root, f), folder))
    if not rel:
        raise SourceError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder tree")
    paths = [os.path.join(folder, r) for r in sorted(rel)]
    return Inputs(folder, [_printable(p) for p in paths], lambda i: decode(paths[i]), _digest(paths))


def _listing_inputs(path: str) -> Inputs:
    entries: list[str] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.lower().endswith(".json"):
                data = json.load(f)
                if not isinstance(data, list):
                    raise SourceError(f"{path}: expected a JSON list of paths or of {{\"path\": ...}}")
                for i, item in enumerate(data):
                    p = item.get("path") if isinstance(item, dict) else item
                    if not isinstance(p, str) or not p.strip():
                        raise SourceError(f"{path}: entry {i}: expected a path or {{\"path\": ...}}")
                    entries.append(p.strip())
            else:
                for i, row in enumerate(csv.reader(f)):
                    if not row or not row[0].strip():
                        continue
                    if not entries and row[0].strip().lower() == "path":
                        continue  # the header
                    entries.append(row[0].strip())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read listing ({e})") from None
    if not entries:
        raise SourceError(f"{path}: the listing is empty")
    base = os.path.dirname(os.path.abspath(path))
    full = [p if os.path.isabs(p) else os.path.join(base, p) for p in entries]
    return Inputs(path, entries, lambda i: decode(full[i]), _digest(full))


def _store_inputs(path: str, split: str) -> Inputs:
    from .data.store import SPLITS, open_store

    store = open_store(path)
    names, arrays, starts = [], [], []
    for s in SPLITS if split == "all" else (split,):
        images = store.splits[s].images
        starts.append(len(names))
        arrays.append(images)
        names += [f"{path}:{s}[{j}]" for j in range(len(images))]
    if not names:
        store.close()
        raise SourceError(f"{path}: the store's {split} split is empty (choose another with --split)")

    def load(i: int) -> np.ndarray:
        k = int(np.searchsorted(starts, i, side="right")) - 1
        return arrays[k][i - starts[k]]

    return Inputs(path, names, load, _digest(names, _file_stamp(path)), close=store.close)


def _npz_inputs(path: str) -> Inputs:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            key = next((k for k in ("images", "x", "x_test", "x_train") if k in keys), None)
            arr = z[key] if key else None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot read npz ({e})") from None
    if arr is None:
        raise SourceError(f"{path}: needs an array 'images' (found: {', '.join(sorted(keys)) or 'none'})")
    if arr.ndim not in (3, 4) or len(arr) == 0:
        raise SourceError(f"{path}: '{key}' has shape {arr.shape}; expected (N, H, W) or (N, H, W, C)")
    names = [f"{path}[{i}]" for i in range(len(arr))]
    return Inputs(path, names, lambda i: arr[i], _digest(names, _file_stamp(path)))


def open_inputs(path: str, split: str = "test") -> Inputs:
    """The rows of a folder tree, a .csv/.json listing, an hpcjobs .h5 store or an .npz."""
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or folder (infer.input)")
    lower = path.lower()
    if os.path.isdir(path):
        return _folder_inputs(path)
    if lower.endswith((".csv", ".json")):
        return _listing_inputs(path)
    if lower.endswith((".h5", ".hdf5")):
        return _store_inputs(path, split)
    if lower.endswith(".npz"):
        return _npz_inputs(path)
    raise SourceError(f"{path}: unknown input type (an image folder, a .csv/.json listing, an .h5 store "
                      "or an .npz)")


# =========================================================================== shards and files
@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def rows(self, n: int) -> tuple[int, int]:
        """The contiguous rows [lo, hi) of this shard among n."""
        return self.index * n // self.count, (self.index + 1) * n // self.count

    @property
    def tag(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    try:
        return Shard(*units.parse_shard(text))
    except ValueError:
        raise InferError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 3/8") from None


def choose_shard(explicit: Optional[str], info) -> tuple[Shard, str]:
    """This process's shard: --shard, else the Slurm array task, else the MPI (or srun) rank."""
    ranks = info.world_size > 1  # srun, mpirun or TF_CONFIG started several processes
    if explicit:
        if ranks:
            raise InferError(f"--shard {explicit} with {info.world_size} launched processes: every process "
                             "would run the same shard; drop --shard (the ranks shard the input themselves)")
        return parse_shard(explicit), "--shard"
    if info.array_task_count and info.array_task_count > 1:
        if ranks:
            raise InferError(f"{info.world_size} processes in each task of a Slurm array: run one process per "
                             "array task, or give up the array and let the ranks shard the input")
        task, count = info.array_task_id, info.array_task_count
        if task is None or not 0 <= task < count:
            raise InferError(f"SLURM_ARRAY_TASK_ID {task} is outside 0..{count - 1}: submit the array as "
                             f"--array=0-{count - 1}, or give --shard i/n")
        return Shard(task, count), f"Slurm array task {task} of {count}"
    if ranks:
        return Shard(info.rank, info.world_size), f"{info.launcher} rank {info.rank} of {info.world_size}"
    return Shard(), "unsharded"


@dataclass(frozen=True)
class Outputs:
    """The files of one ``--output``: results, errors, and the shards' part files."""

    stem: str
    h5: Optional[str]
    csv: Optional[str]

    @property
    def errors(self) -> str:
        return f"{self.stem}.errors.csv"

    def part(self, shard: Shard) -> str:
        return f"{self.stem}.{shard.tag}.h5"

    def chunks(self, shard: Shard) -> str:
        return f"{self.stem}.{shard.tag}.chunks"

    @property
    def files(self) -> list[str]:
        return [p for p in (self.h5, self.csv) if p]


_EXT = {".h5": "h5", ".hdf5": "h5", ".csv": "csv"}


def outputs_for(output: str, fmt: str = "auto") -> Outputs:
    stem, ext = os.path.splitext(output)
    kind = _EXT.get(ext.lower())
    if kind is None:
        stem = output
    if fmt == "auto":
        if kind is None:
            raise InferError(f"--output {output}: cannot tell the format from the extension; name it .h5 or "
                             ".csv, or set infer.format (h5, csv or both)")
        fmt = kind
    h5 = (output if kind == "h5" else stem + ".h5") if fmt in ("h5", "both") else None
    csv_path = (output if kind == "csv" else stem + ".csv") if fmt in ("csv", "both") else None
    return Outputs(stem, h5, csv_path)


# =========================================================================== results
@dataclass
class Piece:
    """Results of consecutive input rows: the good rows and the skipped ones."""

    row: np.ndarray  # int64 (m,)
    path: np.ndarray  # str (m,)
    probabilities: np.ndarray  # float32 (m, classes)
    top_k_indices: np.ndarray  # int32 (m, k)
    top_k_probabilities: np.ndarray  # float32 (m, k)
    error_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    error_path: np.ndarray = field(default_factory=lambda: np.zeros(0, str))
    error_reason: np.ndarray = field(default_factory=lambda: np.zeros(0, str))

    def save(self, f):
        np.savez(f, **{k.name: getattr(self, k.name) for k in dataclasses.fields(self)})

    @classmethod
    def load(cls, path: str) -> "Piece":
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k.name: z[k.name] for k in dataclasses.fields(cls)})


def _str_array(values) -> np.ndarray:
    return np.array(list(values), dtype=str) if len(values) else np.zeros(0, str)


def _fmt(p: float) -> str:
    return f"{p:.6g}"


def write_results(pieces: Iterable[Piece], class_names: list[str], top_k: int, attrs: dict, *,
                  h5: Optional[str] = None, csv_path: Optional[str] = None,
                  errors_csv: Optional[str] = None) -> tuple[int, int]:
    """Stream pieces (in row order) into the HDF5 and CSV results and the errors CSV, each
    written under a temporary name and renamed into place only when complete.
    Returns (rows written, rows skipped)."""
    import h5py

    n_classes = len(class_names)
    rows = skipped = 0
    with contextlib.ExitStack() as stack:
        f = writer = err = None
        if h5:
            f = stack.enter_context(h5py.File(stack.enter_context(atomic_path(h5)), "w"))
            text = h5py.string_dtype("utf-8")
            block = max(1, min(4096, (1 << 18) // max(n_classes, 1)))
            f.create_dataset("probabilities", (0, n_classes), "f4", maxshape=(None, n_classes),
                             chunks=(block, n_classes))
            f.create_dataset("top_k/indices", (0, top_k), "i4", maxshape=(None, top_k), chunks=(block, top_k))
            f.create_dataset("top_k/probabilities", (0, top_k), "f4", maxshape=(None, top_k),
                             chunks=(block, top_k))
            f.create_dataset("path", (0,), text, maxshape=(None,), chunks=(block,))
            f.create_dataset("row", (0,), "i8", maxshape=(None,), chunks=(block,))
            for name, dt in (("row", "i8"), ("path", text), ("reason", text)):
                f.create_dataset(f"errors/{name}", (0,), dt, maxshape=(None,), chunks=(256,))
        if csv_path:
            out = stack.enter_context(open(stack.enter_context(atomic_path(csv_path)), "w", newline="",
                                           encoding="utf-8"))
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(["path", "class", "probability", "top_k"])
        if errors_csv:
            eout = stack.enter_context(open(stack.enter_context(atomic_path(errors_csv)), "w", newline="",
                                            encoding="utf-8"))
            err = csv.writer(eout, lineterminator="\n")
            err.writerow(["path", "reason"])
        for p in pieces:
            m, e = len(p.row), len(p.error_row)
            if f is not None:
                for name, data in (("probabilities", p.probabilities), ("top_k/indices", p.top_k_indices),
                                   ("top_k/probabilities", p.top_k_probabilities),
                                   ("path", p.path.astype(object)), ("row", p.row)):
                    f[name].resize(rows + m, axis=0)
                    f[name][rows:rows + m] = data
                for name, data in (("row", p.error_row), ("path", p.error_path.astype(object)),
                                   ("reason", p.error_reason.astype(object))):
                    f[f"errors/{name}"].resize(skipped + e, axis=0)
                    f[f"errors/{name}"][skipped:skipped + e] = data
            if writer is not None:
                for path, ti, tp in zip(p.path, p.top_k_indices, p.top_k_probabilities):
                    writer.writerow([path, class_names[ti[0]], _fmt(tp[0]),
                                     ";".join(f"{class_names[j]}:{_fmt(q)}" for j, q in zip(ti, tp))])
            if err is not None:
                err.writerows(zip(p.error_path, p.error_reason))
            rows += m
            skipped += e
        if f is not None:
            for k, v in dict(attrs, format=FORMAT, top_k=top_k, rows=rows, errors=skipped).items():
                f.attrs[k] = v
            f.attrs["class_names"] = np.array(class_names, dtype=h5py.string_dtype("utf-8"))
    return rows, skipped


def read_part(path: str) -> Iterator[Piece]:
    """The pieces of a part (or results) HDF5 file, in row order."""
    import h5py

    with h5py.File(path, "r") as f:
        n = len(f["row"])
        errors = {k: f[f"errors/{k}"] for k in ("row", "path", "reason")}
        e = dict(error_row=errors["row"][...], error_path=_str_array(errors["path"].asstr()[...]),
                 error_reason=_str_array(errors["reason"].asstr()[...]))
        for a in range(0, max(n, 1), READ_ROWS):
            b = min(a + READ_ROWS, n)
            yield Piece(f["row"][a:b], _str_array(f["path"].asstr()[a:b]), f["probabilities"][a:b],
                        f["top_k/indices"][a:b], f["top_k/probabilities"][a:b], **e)
            e = {}


def _part_attrs(path: str) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in f.attrs}
    except OSError as e:
        raise InferError(f"{path}: not a readable part file ({e}); delete it and rerun its shard") from None
    attrs.pop("class_names", None)
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}


# =========================================================================== chunks
_CHUNK = re.compile(r"^(\d{12})-(\d{12})\.npz$")


class ChunkDir:
    """The committed chunks of one shard, one ``.npz`` per chunk, renamed into place when
    complete, and a manifest naming what they are results of."""

    def __init__(self, path: str, identity: dict, lo: int, hi: int):
        self.path, self.identity, self.lo, self.hi = path, identity, lo, hi
        self.files: list[str] = []

    @property
    def manifest(self) -> str:
        return os.path.join(self.path, "manifest.json")

    def resume(self) -> int:
        """Check the manifest, drop partial files; the first row not yet committed."""
        if os.path.isdir(self.path):
            try:
                with open(self.manifest, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None
            if old is not None and old != self.identity:
                diff = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
                raise InferError(f"{self.path}: unfinished results of a different run (differs in "
                                 f"{', '.join(diff)}); delete it or choose another --output")
        os.makedirs(self.path, exist_ok=True)
        if not os.path.exists(self.manifest):
            atomic_write(self.manifest, json.dumps(self.identity, indent=1) + "\n")
        spans = {}
        for name in os.listdir(self.path):
            m = _CHUNK.match(name)
            if m:
                spans[int(m.group(1))] = (int(m.group(2)), name)
            elif name != "manifest.json":  # a temporary file of a killed commit
                os.remove(os.path.join(self.path, name))
        pos = self.lo
        while pos in spans and pos < self.hi:
            end, name = spans.pop(pos)
            self.files.append(name)
            pos = end
        for _, name in spans.values():  # not contiguous with the committed rows
            os.remove(os.path.join(self.path, name))
        return pos

    def commit(self, lo: int, hi: int, piece: Piece):
        name = f"{lo:012d}-{hi:012d}.npz"
        with atomic_path(os.path.join(self.path, name)) as tmp:
            with open(tmp, "wb") as f:
                piece.save(f)
        self.files.append(name)

    def pieces(self) -> Iterator[Piece]:
        for name in self.files:
            yield Piece.load(os.path.join(self.path, name))

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


# =========================================================================== the model
def _strategy(tf, info, devices: Optional[list[str]] = None):
    """Every local GPU (MirroredStrategy); one GPU per process when a launcher started one
    process per GPU; otherwise the default device.  ``devices`` is for tests."""
    if devices:
        return tf.distribute.MirroredStrategy(devices=devices)
    gpus = tf.config.list_physical_devices("GPU")
    for g in gpus:
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(g, True)
    if gpus and info is not None and info.local_size > 1:
        tf.config.set_visible_devices(gpus[info.local_rank % len(gpus)], "GPU")
        return tf.distribute.get_strategy()
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(devices=[d.name for d in tf.config.list_logical_devices("GPU")])
    return tf.distribute.get_strategy()


class Predictor:
    """The exported model, loaded once, and the preprocessing it was trained with."""

    def __init__(self, model_path: str, info=None, devices: Optional[list[str]] = None):
        import tensorflow as tf

        from . import export

        self.tf = tf
        folder = export.find(model_path)
        self.strategy = _strategy(tf, info, devices)
        with self.strategy.scope():
            self.model, self.info = export.load(folder)  # ExportError before any work
        self.folder = folder
        self.shape = tuple(int(d) for d in self.info["input_shape"])
        self.class_names = [str(c) for c in self.info["class_names"]]
        h = hashlib.sha256()
        for name in ("preprocessing.json", "model.keras"):
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        self.fingerprint = h.hexdigest()[:20]
        self._steps: dict[int, Callable] = {}

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def preprocess(self, raw: np.ndarray) -> np.ndarray:
        """A raw image as the model's input: the training preprocessing (uint8 H, W, C)."""
        h, w, c = self.shape
        img = to_model_image(raw, (h, w), c)
        if img.shape != self.shape:
            raise ValueError(f"preprocessed to shape {img.shape}, expected {self.shape}")
        return img

    def _step(self, k: int) -> Callable:
        if k not in self._steps:
            tf, model, strategy = self.tf, self.model, self.strategy

            def replica(x):
                p = tf.cast(model(tf.cast(x, tf.float32), training=False), tf.float32)
                top = tf.math.top_k(p, k=k)
                return p, top.values, top.indices

            self._steps[k] = tf.function(lambda x: strategy.run(replica, args=(x,)), reduce_retracing=True)
        return self._steps[k]

    def _local(self, value) -> np.ndarray:
        parts = self.strategy.experimental_local_results(value)
        return np.concatenate([t.numpy() for t in parts]) if len(parts) > 1 else parts[0].numpy()

    def batches(self, inputs: Inputs, lo: int, hi: int, *, batch_size: int, top_k: int, workers: int,
                errors: dict) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(probabilities, top-k probabilities, top-k indices) of rows lo..hi in order, one
        batch at a time.  A row that cannot be read is predicted on a blank image and its
        reason put in ``errors[row]`` before its batch is yielded."""
        tf = self.tf
        shape = self.shape

        def load(i: int) -> np.ndarray:
            try:
                return self.preprocess(inputs.load(i))
            except Exception as e:  # a bad input file must not stop the job
                errors[i] = e.reason if isinstance(e, ImageError) else f"{type(e).__name__}: {e}"
                return np.zeros(shape, np.uint8)

        ds = tf.data.Dataset.from_generator(
            lambda: _decoded_batches(load, lo, hi, batch_size, workers),
            output_signature=tf.TensorSpec((None, *shape), tf.uint8))
        options = tf.data.Options()
        options.autotune.enabled = False  # a fixed pipeline; no autotuner stall at teardown
        ds = ds.prefetch(1).with_options(options)
        step = self._step(min(top_k, len(self.class_names)))
        for batch in self.strategy.experimental_distribute_dataset(ds):
            yield tuple(self._local(v) for v in step(batch))


def _decoded_batches(load: Callable[[int], np.ndarray], lo: int, hi: int, batch_size: int,
                     workers: int) -> Iterator[np.ndarray]:
    """Rows lo..hi loaded by a pool of threads, in order, stacked into batches.  About two
    batches are in flight, so decoding runs ahead while the model predicts."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="hpcjobs-decode")
    try:
        window: deque = deque()
        ahead = 2 * batch_size + workers
        nxt = lo
        batch = []
        while nxt < hi or window:
            while nxt < hi and len(window) < ahead:
                window.append(pool.submit(load, nxt))
                nxt += 1
            batch.append(window.popleft().result())
            if len(batch) == batch_size or not window:
                yield np.stack(batch)
                batch = []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# =========================================================================== a shard
@dataclass
class _Job:
    cfg: InferConfig
    outputs: Outputs
    shard: Shard
    deadline: Optional[float]  # time.monotonic() value
    workers: int
    log: Callable[[str], None]


def _run_shard(job: _Job, predictor: Predictor, inputs: Inputs, stop: StopFlag) -> str:
    """Run (or resume) this process's shard.  'done', or the reason it stopped early."""
    cfg, outs, shard, log = job.cfg, job.outputs, job.shard, job.log
    n = len(inputs)
    lo, hi = shard.rows(n)
    k = min(cfg.top_k, len(predictor.class_names))
    identity = {"format": FORMAT, "input": inputs.fingerprint, "rows_total": n, "model": predictor.fingerprint,
                "top_k": k, "shard": shard.index, "num_shards": shard.count, "rows_lo": lo, "rows_hi": hi}
    attrs = dict(identity, input_path=_printable(inputs.origin), model_path=predictor.folder)
    if inputs.origin.lower().endswith((".h5", ".hdf5")):
        attrs["split"] = cfg.split
    part = outs.part(shard)
    if shard.count > 1 and os.path.exists(part):
        old = _part_attrs(part)
        if any(old.get(key) != value for key, value in identity.items()):
            raise InferError(f"{part}: the results of a different run (input, model or top_k); delete it "
                             "or choose another --output")
        log(f"shard {shard}: already done ({part})")
        shutil.rmtree(outs.chunks(shard), ignore_errors=True)
        return "done"

    chunks = ChunkDir(outs.chunks(shard), identity, lo, hi)
    pos = chunks.resume()
    if pos > lo:
        log(f"shard {shard}: resuming at row {pos} ({pos - lo} of {hi - lo} rows done)")
    errors: dict[int, str] = {}
    buf: list[tuple[np.ndarray, ...]] = []
    buffered = 0
    t0 = t_chunk = t_log = time.monotonic()
    done_here = 0
    reason = None
    if pos < hi:
        batches = predictor.batches(inputs, pos, hi, batch_size=cfg.batch_size, top_k=k, workers=job.workers,
                                    errors=errors)
        end = min(pos + cfg.chunk_size, hi)
        for out in batches:
            buf.append(out)
            buffered += len(out[0])
            while pos < hi and buffered >= end - pos:
                joined = [np.concatenate(col) if len(buf) > 1 else col[0] for col in zip(*buf)]
                m = end - pos
                buf = [tuple(a[m:] for a in joined)] if buffered > m else []
                buffered -= m
                rows = np.arange(pos, end)
                bad = np.array([r in errors for r in rows], bool)
                reasons = [errors.pop(int(r)) for r in rows[bad]]
                probs, top_p, top_i = (a[:m][~bad] for a in joined)
                piece = Piece(rows[~bad], _str_array([inputs.names[r] for r in rows[~bad]]), probs,
                              top_k_indices=top_i.astype(np.int32), top_k_probabilities=top_p,
                              error_row=rows[bad], error_path=_str_array([inputs.names[r] for r in rows[bad]]),
                              error_reason=_str_array(reasons))
                chunks.commit(pos, end, piece)
                done_here += m
                pos, end = end, min(end + cfg.chunk_size, hi)
                now = time.monotonic()
                took, t_chunk = now - t_chunk, now
                if now - t_log >= 10 or pos >= hi:
                    log(f"shard {shard}: {pos - lo}/{hi - lo} rows, {done_here / (now - t0):.0f} img/s")
                    t_log = now
                if pos < hi:
                    if stop.signal:
                        reason = stop.signal
                    elif job.deadline is not None and now + 1.5 * took + 2.0 >= job.deadline:
                        reason = "time budget"
                if reason:
                    break
            if reason:
                break
        batches.close()
        if pos < hi and not reason:
            raise RuntimeError(f"shard {shard}: the input pipeline ended at row {pos}, before row {hi}")
    if reason:
        log(f"shard {shard}: stopped by {reason} after row {pos} ({pos - lo} of {hi - lo} done); "
            "run the same command again to continue")
        return reason

    if shard.count == 1:
        _finish(outs, chunks.pieces(), predictor.class_names, k, attrs, log)
    else:
        rows, skipped = write_results(chunks.pieces(), predictor.class_names, k, attrs, h5=part)
        log(f"shard {shard}: done, {rows} rows, {skipped} skipped: {part}")
    chunks.remove()
    return "done"


def _finish(outs: Outputs, pieces: Iterable[Piece], class_names: list[str], k: int, attrs: dict, log):
    attrs = {key: v for key, v in attrs.items() if key not in ("shard", "num_shards")}
    rows, skipped = write_results(pieces, class_names, k, attrs, h5=outs.h5, csv_path=outs.csv,
                                  errors_csv=outs.errors)
    log(f"{rows + skipped} inputs: {rows} predicted, {skipped} skipped as unreadable"
        + (f" (listed in {outs.errors})" if skipped else "") + f"; results: {', '.join(outs.files)}")


# =========================================================================== merge
_PART = re.compile(r"\.part-(\d{5,})-of-(\d{5,})\.h5$")


def merge(outs: Outputs, log=print) -> int:
    """Join the part files of every shard, in row order, into the outputs; remove the parts."""
    import h5py

    found = {}
    for path in glob.glob(glob.escape(outs.stem) + ".part-*-of-*.h5"):
        m = _PART.search(path[len(outs.stem):])
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    if not found:
        raise InferError(f"{outs.stem}.part-*-of-*.h5: no part files (run the shards first)")
    if len(found) > 1:
        raise InferError(f"{outs.stem}: part files of {' and '.join(map(str, sorted(found)))} shards; "
                         "delete the stale ones")
    (count, parts), = found.items()
    missing = [i for i in range(count) if i not in parts]
    if missing:
        shown = ", ".join(f"{i}/{count}" for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise InferError(f"{outs.stem}: {len(missing)} of {count} shards not finished ({shown}); "
                         f"run them (e.g. --shard {missing[0]}/{count}) and merge again")
    ordered = [parts[i] for i in range(count)]
    attrs = [_part_attrs(p) for p in ordered]
    first = attrs[0]
    for i, (p, a) in enumerate(zip(ordered, attrs)):
        for key in ("format", "input", "model", "rows_total", "top_k"):
            if a.get(key) != first.get(key):
                raise InferError(f"{p}: {key} differs from {ordered[0]}'s (parts of different runs); "
                                 "delete the stale parts and rerun them")
        if a.get("rows_lo") != (attrs[i - 1]["rows_hi"] if i else 0) or a.get("num_shards") != count:
            raise InferError(f"{p}: rows {a.get('rows_lo')}..{a.get('rows_hi')} do not follow the previous part")
    if attrs[-1]["rows_hi"] != first["rows_total"]:
        raise InferError(f"{ordered[-1]}: the parts cover {attrs[-1]['rows_hi']} of {first['rows_total']} rows")
    with h5py.File(ordered[0], "r") as f:
        class_names = [str(c) for c in f.attrs["class_names"]]

    def pieces():
        for p in ordered:
            yield from read_part(p)

    keep = {key: first[key] for key in ("input", "rows_total", "model", "input_path", "model_path", "split")
            if key in first}
    keep.update(rows_lo=0, rows_hi=first["rows_total"])
    _finish(outs, pieces(), class_names, int(first["top_k"]), keep, log)
    for p in ordered:
        os.remove(p)
    log(f"merged {count} parts")
    return 0


# =========================================================================== the command
def _mpi_comm(info):
    """MPI_COMM_WORLD when mpirun started several ranks (mpi4py is how ranks talk here)."""
    if info.launcher != "mpi" or info.world_size <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise InferError("launched by mpirun with several ranks, but mpi4py is not installed "
                         "(pip install mpi4py)") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size:
        raise InferError(f"mpi4py sees {comm.Get_size()} ranks, the launcher {info.world_size}: "
                         "mpi4py is built against another MPI than mpirun's")
    return comm


def _say(text: str):
    print(text, flush=True)


def infer(cfg: InferConfig, *, info=None, predictor: Optional[Predictor] = None, log=_say) -> int:
    """Run this process's shard of an inference job: 0 when done, 75 when stopped early."""
    if not cfg.output:
        raise InferError("infer.output: required (--output FILE.h5 or FILE.csv)")
    outs = outputs_for(cfg.output, cfg.format)
    if not cfg.input:
        raise InferError("infer.input: required (--input FOLDER, LISTING.csv/.json, STORE.h5 or FILE.npz)")
    if not cfg.model and predictor is None:
        raise InferError("infer.model: required (--model RUN_DIR or EXPORT_DIR)")
    t0 = time.monotonic()
    if info is None:
        from .cluster import detect

        info = detect()
    shard, why = choose_shard(cfg.shard, info)
    deadline = t0 + parse_duration(cfg.time_budget) if cfg.time_budget else None
    if info.job_end_time:
        job_deadline = t0 + (info.job_end_time - time.time()) - 10.0
        deadline = job_deadline if deadline is None else min(deadline, job_deadline)
    comm = _mpi_comm(info)
    job = _Job(cfg, outs, shard, deadline, cfg.workers or os.cpu_count() or 1, log)

    status, error = "failed", None
    with StopFlag() as stop:
        try:
            inputs = open_inputs(cfg.input, cfg.split)
            try:
                predictor = predictor or Predictor(cfg.model, info)
                lo, hi = shard.rows(len(inputs))
                log(f"infer: {len(inputs)} inputs from {cfg.input}; shard {shard} ({why}): rows {lo}..{hi}; "
                    f"model {predictor.folder} {predictor.shape}, {predictor.replicas} replica(s)")
                status = _run_shard(job, predictor, inputs, stop)
            finally:
                inputs.close()
        except BaseException as e:
            if comm is None:
                raise
            error = e  # every rank must reach the allgather below, or the others hang
    if comm is None:
        if status == "done" and shard.count > 1:
            log(f"when every shard is done: hpcjobs infer --merge --output {cfg.output}")
        return 0 if status == "done" else EX_TEMPFAIL
    statuses = comm.allgather(status)  # also the barrier before rank 0 merges
    if error is not None:
        raise error
    if "failed" in statuses:
        log(f"rank {info.rank}: rank(s) {[r for r, s in enumerate(statuses) if s == 'failed']} failed; "
            "not merging")
        return 1
    if any(s != "done" for s in statuses):
        return EX_TEMPFAIL  # every rank says "more to do", so the job is requeued
    if info.rank == 0:
        return merge(outs, log)
    return 0


def add_arguments(parser):
    parser.add_argument("config", nargs="?", help="YAML config with an infer: section (optional)")
    parser.add_argument("--model", help="run directory or export directory (infer.model; default: --run-dir)")
    parser.add_argument("--input", help="image folder tree, .csv/.json listing, hpcjobs .h5 store or .npz")
    parser.add_argument("--output", help="results file, .h5 or .csv (STEM.errors.csv lists unreadable inputs)")
    parser.add_argument("--split", choices=["test", "val", "train", "all"],
                        help="split of an .h5 store input (default test)")
    parser.add_argument("--shard", metavar="I/N",
                        help="run shard I of N (default: the Slurm array task or MPI rank, else 0/1)")
    parser.add_argument("--time-budget", metavar="DURATION",
                        help="stop after the chunk that would cross this (90s, 15m, 1h); exit 75")
    parser.add_argument("--merge", action="store_true", help="join the shards' part files into --output")


def _settings(args) -> InferConfig:
    """The infer: section of the config (if any) with the command line's flags on top.
    The model: --model, else infer.model, else --run-dir, else the config's runs/<name>
    (``hpcjobs submit --infer`` always passes the run directory; an infer.model says more)."""
    from . import config

    if args.config:
        cfg = config.load(args.config, args.set)
    else:
        cfg = config.from_dict({}, "hpcjobs infer", args.set)
    model = args.model or cfg.infer.model or args.run_dir or (os.path.join("runs", cfg.name) if args.config
                                                              else None)
    flags = {"model": model, "input": args.input, "output": args.output, "split": args.split,
             "shard": args.shard, "time_budget": args.time_budget}
    try:
        return dataclasses.replace(cfg.infer, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        key, _, msg = str(e).partition(": ")
        raise ConfigError("command line", f"--{key.replace('_', '-')}", msg or str(e)) from None


def cmd_infer(args) -> int:
    cfg = _settings(args)
    if args.merge:
        if not cfg.output:
            raise InferError("--merge needs --output (the results file the shards were run with)")
        return merge(outputs_for(cfg.output, cfg.format))
    return infer(cfg)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: hpcjobs infer ...")
