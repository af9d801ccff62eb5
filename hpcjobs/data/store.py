"""Stratified splits and the HDF5 sample store written by ``hpcjobs prepare``.

The store holds uint8 images at the model's input size, per split:
``/<split>/images`` (N, H, W, C), ``/<split>/labels`` and ``/<split>/source_index``,
plus attributes: class names, per-channel mean and std of the training split,
and the source.  The training split is stored in *stratified order*: classes are
interleaved evenly, so every contiguous range of it has the class distribution of
the whole split (within one sample per class).  The hybrid feeder relies on that to
read segments with one sequential read each.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import RunFailure, UserError
from ..rundir import FileRefused, check_regular, fsync_dir, fsync_file, os_reason
from .images import ImageError, native_channels, to_model_image
from .sources import Samples, SourceError

SPLITS = ("train", "val", "test")
CHUNK = 1024


def default_test_share(n: int) -> float:
    """The seed handbook's rule of thumb."""
    return 0.2 if n < 1000 else 0.1 if n < 10000 else 0.05


def stratified_order(indices: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reorder ``indices`` so classes are spread evenly along the sequence.

    Sample r of class c (after a shuffle within the class) gets the key (r + 0.5) / n_c;
    sorting by key places each class at even spacing, so any window holds each class in
    proportion, within one sample.
    """
    indices = np.asarray(indices)
    keys = np.empty(len(indices))
    for c in np.unique(labels[indices]):
        pos = np.flatnonzero(labels[indices] == c)
        pos = rng.permutation(pos)
        keys[pos] = (np.arange(len(pos)) + 0.5) / len(pos)
    # ties between classes broken by a random jitter-free secondary key: the label
    order = np.lexsort((labels[indices], keys))
    return indices[order]


def stratified_split(labels: np.ndarray, val_share: float, test_share: float, seed: int,
                     class_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Indices of train/val/test; each class keeps its share in every split (within one)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    need = 1 + (val_share > 0) + (test_share > 0)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        if n < need:
            name = class_names[c] if class_names else str(c)
            raise SourceError(f"class '{name}' has {n} sample(s): too few to split into "
                              f"{need} parts (train{', val' if val_share else ''}{', test' if test_share else ''})")
        n_test = int(round(n * test_share))
        n_val = int(round(n * val_share))
        if test_share > 0:
            n_test = max(1, n_test)
        if val_share > 0:
            n_val = max(1, n_val)
        n_test = min(n_test, n - 1 - (val_share > 0))
        n_val = min(n_val, n - 1 - n_test)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {s: stratified_order(np.concatenate(parts[s]).astype(np.int64), labels, rng) for s in SPLITS}


@dataclass
class Split:
    images: Any  # numpy array or h5py dataset, (N, H, W, C) uint8
    labels: np.ndarray  # int32
    source_index: np.ndarray  # position in the source

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.images.shape))


@dataclass
class Prepared:
    """The prepared data set, in memory or backed by an HDF5 store."""

    splits: dict[str, Split]
    class_names: list[str]
    mean: np.ndarray  # per channel, in pixel units 0..255
    std: np.ndarray
    source: str
    path: str | None = None  # the store file, if any
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _file: Any = None
    test_origin: str = ""  # data.test_split: source: the source's own test set, in words ("": split here)
    staged: Any = None  # stage.Staged: where a staged store was copied from, in how long

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.splits["train"].images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_table(self) -> str:
        width = max(8, *(len(n) for n in self.class_names))
        lines = [f"{'class':<{width}} " + " ".join(f"{s:>7}" for s in SPLITS)]
        counts = {s: np.bincount(self.splits[s].labels, minlength=self.num_classes) for s in SPLITS}
        for c, name in enumerate(self.class_names):
            lines.append(f"{name:<{width}} " + " ".join(f"{counts[s][c]:>7}" for s in SPLITS))
        lines.append(f"{'total':<{width}} " + " ".join(f"{len(self.splits[s]):>7}" for s in SPLITS))
        return "\n".join(lines)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class _Progress:
    """A bar on a terminal, a line every 10% otherwise."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.stream = max(total, 1), label, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = -1
        self.start = time.monotonic()

    def update(self, done: int):
        pct = int(100 * done / self.total)
        if self.tty:
            bar = "#" * (pct // 4)
            self.stream.write(f"\r{self.label} [{bar:<25}] {done}/{self.total}")
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif pct // 10 != self.last // 10 and done < self.total or done >= self.total and self.last < 100:
            self.stream.write(f"{self.label}: {done}/{self.total} ({pct}%)\n")
            self.stream.flush()
        self.last = pct


def prepare(samples: Samples, size: tuple[int, int] | None, channels: int | None,
            val_share: float, test_share: float | str | None, seed: int, out_path: str | None = None,
            strict: bool = False, progress: bool = False, force: bool = False) -> Prepared:
    """Preprocess, split and store a source.  ``out_path`` None keeps it in memory.

    Images that cannot be read are skipped and listed (``strict`` makes them an error).
    The store is written to a temporary file, fsync'ed, and renamed only when complete;
    it never replaces its own source or a file that is not a store, unless ``force``.
    """
    n = len(samples)
    if n == 0:
        raise SourceError(f"{samples.origin}: no samples")
    check_classes(samples)
    if test_share == "source":
        parts = own_test_split(samples, val_share, seed)
    else:
        test_share = default_test_share(n) if test_share is None else test_share
        parts = stratified_split(samples.labels, val_share, test_share, seed, samples.class_names)
    test_origin = samples.test_origin if test_share == "source" else ""
    first = _first_readable(samples)
    if size is None:
        size = tuple(first.shape[:2])
    if channels is None:
        channels = native_channels(first)
    shape = (size[0], size[1], channels)
    meta = dict(class_names=samples.class_names, source=samples.origin, seed=seed,
                val_share=val_share, test_share=test_share, test_origin=test_origin)
    if not out_path:
        splits, skipped, stats = _fill(samples, parts, shape, strict, progress, None)
        mean, std = stats.mean_std()
        return Prepared(splits, list(samples.class_names), mean.astype(np.float32), std.astype(np.float32),
                        samples.origin, skipped=skipped, test_origin=test_origin)
    check_output(out_path, samples, force)
    with _new_store(out_path) as h5:
        _, skipped, stats = _fill(samples, parts, shape, strict, progress, h5)
        mean, std = stats.mean_std()
        h5.attrs["hpcjobs"] = json.dumps(dict(meta, mean=mean.tolist(), std=std.tolist(),
                                              skipped=[list(s) for s in skipped]))
    return open_store(out_path)


def own_test_split(samples: Samples, val_share: float, seed: int) -> dict[str, np.ndarray]:
    """``data.test_split: source``: the source's own test set is the test split, and
    validation is split from the rest, stratified by class, as usual."""
    if samples.test_index is None or not len(samples.test_index):
        raise SourceError(f"data.test_split: source: {samples.origin} has no test set of its own (IDX t10k files, "
                          "an .npz with x_test and y_test, or a folder with train/ and test/ class folders); "
                          "give a share (e.g. 0.1) or null")
    rest = np.setdiff1d(np.arange(len(samples), dtype=np.int64), samples.test_index)
    parts = stratified_split(samples.labels[rest], val_share, 0.0, seed, samples.class_names)
    return {"train": rest[parts["train"]], "val": rest[parts["val"]],
            "test": np.sort(np.asarray(samples.test_index, np.int64))}


def check_classes(samples: Samples):
    """At least two classes, none of them empty (a folder source names the folder)."""
    counts = np.bincount(samples.labels, minlength=len(samples.class_names))
    folder = samples.paths is not None and os.path.isdir(samples.origin)
    for name, count in zip(samples.class_names, counts):
        if count == 0:
            if folder:
                raise SourceError(f"{os.path.join(samples.origin, name)}: an empty class folder (no images); "
                                  "remove it or add images")
            raise SourceError(f"{samples.origin}: class '{name}' has no samples")
    if len(counts) < 2:
        what = f"one class folder ({samples.class_names[0]})" if folder else f"one class ({samples.class_names[0]})"
        raise SourceError(f"{samples.origin}: only {what}; a classifier needs two or more")


class _Stats:
    """Per-channel running sums of the training split's pixels."""

    def __init__(self, channels: int):
        self.count, self.sums, self.sq = 0, np.zeros(channels), np.zeros(channels)

    def add(self, arr: np.ndarray):
        f = arr.reshape(-1, arr.shape[-1]).astype(np.float64)
        self.count += len(f)
        self.sums += f.sum(0)
        self.sq += (f * f).sum(0)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        count = max(self.count, 1)
        mean = self.sums / count
        std = np.sqrt(np.maximum(self.sq / count - mean**2, 0.0))
        return mean, np.where(std < 1e-3, 1.0, std)


def _fill(samples: Samples, parts: dict, shape: tuple, strict: bool, progress: bool, h5):
    """Every split preprocessed into memory (``h5`` None) or into the store's datasets."""
    splits, skipped, stats = {}, [], _Stats(shape[2])
    bar = _Progress(sum(len(p) for p in parts.values()), "prepare") if progress else None
    done = [0]

    def tick(k: int):
        done[0] += k
        if bar:
            bar.update(done[0])

    for name in SPLITS:
        idx = parts[name]
        if h5 is not None:
            g = h5.create_group(name)
            images = g.create_dataset("images", shape=(len(idx), *shape), maxshape=(None, *shape),
                                      dtype=np.uint8, chunks=(min(max(len(idx), 1), 256), *shape))
        else:
            images = np.empty((len(idx), *shape), np.uint8)
        kept = _fill_split(samples, idx, shape, images, strict, skipped, stats if name == "train" else None, tick)
        labels = samples.labels[kept].astype(np.int32)
        if h5 is not None:
            images.resize((len(kept), *shape))
            g.create_dataset("labels", data=labels)
            g.create_dataset("source_index", data=kept)
        else:
            images = images[:len(kept)]
        splits[name] = Split(images, labels, kept)
    if len(splits["train"]) == 0:
        raise SourceError(f"{samples.origin}: no readable training images")
    return splits, skipped, stats


def _fill_split(samples: Samples, idx: np.ndarray, shape: tuple, images, strict: bool, skipped: list,
                stats: _Stats | None, tick) -> np.ndarray:
    """Samples ``idx`` preprocessed into ``images`` in order, unreadable ones skipped (or raised
    with ``strict``); returns the source indices kept."""
    kept, out = [], 0
    for start in range(0, len(idx), CHUNK):
        block = []
        for i in idx[start:start + CHUNK]:
            try:
                block.append(to_model_image(samples.load(int(i)), shape[:2], shape[2]))
                kept.append(i)
            except ImageError as e:
                if strict:
                    raise
                skipped.append((e.path, e.reason))
        if block:
            arr = np.stack(block)
            images[out:out + len(arr)] = arr
            out += len(arr)
            if stats is not None:
                stats.add(arr)
        tick(len(idx[start:start + CHUNK]))
    return np.array(kept, dtype=np.int64)


# --------------------------------------------------------------------------- the store file
class StoreError(UserError, ValueError):
    """The store cannot be written where it was asked for (exit code 2): names the path."""


def is_store(path: str) -> bool:
    """Whether ``path`` is an HDF5 file written by ``hpcjobs prepare``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "hpcjobs" in f.attrs
    except (OSError, ValueError):
        return False


def _is_source(path: str, samples: Samples) -> bool:
    files = [samples.origin] + list(samples.paths or ())
    real = os.path.realpath(path)
    return any(os.path.realpath(f) == real for f in files if os.path.isfile(f))


def check_output(out_path: str, samples: Samples, force: bool = False):
    """Refuse to write a store over its own source, or over a file that is not a store
    (``force`` allows both); a folder is never replaced."""
    if os.path.isdir(out_path):
        raise StoreError(f"{out_path}: is a folder; name the store file (e.g. {out_path.rstrip('/')}/store.h5)")
    if force or not os.path.lexists(out_path):
        return
    if _is_source(out_path, samples):
        raise StoreError(f"{out_path}: is the source being prepared; name another --output "
                         "(or give --force to replace the source)")
    if not is_store(out_path):
        raise StoreError(f"{out_path}: exists and is not an hpcjobs store; not replacing it "
                         "(name another --output, or give --force)")


@contextlib.contextmanager
def _new_store(out_path: str):
    """An HDF5 file at a temporary name beside ``out_path``, fsync'ed and renamed over it
    when the block succeeds, removed otherwise."""
    import h5py

    folder = os.path.dirname(os.path.abspath(out_path))
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        # chunks 4 KiB aligned: a feeder maps rows straight from the file (data/rows.py)
        h5 = h5py.File(tmp, "w", alignment_threshold=4096, alignment_interval=4096)
    except OSError as e:
        raise StoreError(f"{out_path}: cannot write the store there ({os_reason(e, folder)})") from None
    try:
        yield h5
        h5.close()
        fsync_file(tmp)
        os.replace(tmp, out_path)
        fsync_dir(folder)
    except OSError as e:  # a full disk, a quota, an I/O error: the machine's, not the input's
        raise RunFailure(f"{out_path}: writing the store failed ({os_reason(e, folder)})") from None
    finally:
        h5.close()
        if os.path.exists(tmp):
            os.remove(tmp)


def _first_readable(samples: Samples) -> np.ndarray:
    for i in range(min(len(samples), 100)):
        try:
            return samples.load(i)
        except ImageError:
            continue
    raise SourceError(f"{samples.origin}: none of the first 100 images can be read")


def open_store(path: str) -> Prepared:
    """Open an HDF5 store read-only; images stay on disk until a feeder reads them."""
    import h5py

    if not os.path.exists(path):
        raise SourceError(f"{path}: no such store; create it with `hpcjobs prepare CONFIG`")
    try:
        check_regular(path, "store")  # a FIFO would block the open
        f = h5py.File(path, "r")
        meta = json.loads(f.attrs["hpcjobs"])
        splits = {s: Split(f[s]["images"], f[s]["labels"][...], f[s]["source_index"][...]) for s in SPLITS}
    except FileRefused as e:
        raise SourceError(str(e)) from None
    except (OSError, KeyError, ValueError) as e:
        raise SourceError(f"{path}: not a readable hpcjobs store ({e})") from None
    return Prepared(splits, meta["class_names"], np.array(meta["mean"], np.float32),
                    np.array(meta["std"], np.float32), meta["source"], path=path,
                    skipped=[tuple(s) for s in meta.get("skipped", [])], _file=f,
                    test_origin=str(meta.get("test_origin") or ""))
