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
from .images import LEGACY_PATH, ImageError, native_channels
from .sources import Samples, SourceError

SPLITS = ("train", "val", "test")
CHUNK = 1024
SMALL_ARRAYS = 20_000  # an in-memory source this small is prepared in this process (same result)


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
    image_path: str = "tf/1"  # how raw images became these (images.IMAGE_PATHS); older stores: tf/1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.splits["train"].images.shape[1:])

    @property
    def image_path_about(self) -> str:
        """The image path that made these images, in words (for the model card)."""
        from .images import IMAGE_PATHS

        return IMAGE_PATHS.get(self.image_path, "unknown to this hpcjobs")

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


class PrepareStopped(Exception):
    """A stop signal ended prepare at a chunk boundary; the chunks made are kept (exit 75)."""


def prepare(samples: Samples, size: tuple[int, int] | None, channels: int | None,
            val_share: float, test_share: float | str | None, seed: int, out_path: str | None = None,
            strict: bool = False, progress: bool = False, force: bool = False, workers: int | None = None,
            stop=None) -> Prepared:
    """Preprocess, split and store a source.  ``out_path`` None keeps it in memory.

    Images that cannot be read are skipped and listed (``strict`` makes them an error).
    The work runs in chunks on ``workers`` processes (default: the CPUs this process may
    use); the result is the same, byte for byte, whatever their number.  A store is made
    resumably (``chunks.PartialDir``): a killed prepare run again continues after the
    chunks it completed; ``stop()`` turning true (a stop signal) ends it at a chunk
    boundary with :class:`PrepareStopped`.  The store is written to a temporary file,
    fsync'ed, and renamed only when complete; it never replaces its own source or a file
    that is not a store, unless ``force``.
    """
    from .chunks import PartialDir, chunk_rows, default_workers, source_fingerprint
    from .images import IMAGE_PATH

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
                val_share=val_share, test_share=test_share, test_origin=test_origin, image_path=IMAGE_PATH)
    job = _Job(samples, parts, shape, strict, chunk_rows(shape), workers or default_workers(), stop)
    if not out_path:
        splits, skipped, stats = job.in_memory(progress)
        mean, std = stats.mean_std()
        return Prepared(splits, list(samples.class_names), mean.astype(np.float32), std.astype(np.float32),
                        samples.origin, skipped=skipped, test_origin=test_origin, image_path=IMAGE_PATH)
    check_output(out_path, samples, force)
    identity = dict(format="hpcjobs-prepare-chunks/1", source=samples.origin,
                    fingerprint=source_fingerprint(samples), shape=list(shape), seed=seed, val_share=val_share,
                    test_share=test_share, image_path=IMAGE_PATH, chunk_rows=job.rows)  # not --strict: below
    partial = PartialDir(out_path, identity)
    try:
        done = partial.open(force, StoreError)
    except OSError as e:
        folder = os.path.dirname(os.path.abspath(out_path))
        raise StoreError(f"{out_path}: cannot write the store there ({os_reason(e, folder)})") from None
    job.to_files(partial, done, progress)
    with _new_store(out_path, os.path.join(partial.path, "store.h5.tmp")) as h5:
        skipped, stats = job.assemble(partial, h5)
        mean, std = stats.mean_std()
        h5.attrs["hpcjobs"] = json.dumps(dict(meta, mean=mean.tolist(), std=std.tolist(),
                                              skipped=[list(s) for s in skipped]))
    partial.remove()
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
    """Per-channel running sums of the training split's pixels, added chunk by chunk in order."""

    def __init__(self, channels: int):
        self.count, self.sums, self.sq = 0, np.zeros(channels), np.zeros(channels)

    def add_sums(self, sums: np.ndarray):
        self.count += int(sums[0][0])
        self.sums += sums[1]
        self.sq += sums[2]

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        count = max(self.count, 1)
        mean = self.sums / count
        std = np.sqrt(np.maximum(self.sq / count - mean**2, 0.0))
        return mean, np.where(std < 1e-3, 1.0, std)


class _Job:
    """Every split cut into chunks (the same cut whatever the number of workers)."""

    def __init__(self, samples: Samples, parts: dict, shape: tuple, strict: bool, rows: int, workers: int,
                 stop=None):
        self.samples, self.parts, self.shape, self.strict = samples, parts, shape, strict
        self.rows, self.workers, self.stop = rows, workers, stop or (lambda: False)
        self.keys = [(s, k) for s in SPLITS for k in range(-(-len(parts[s]) // rows))]
        self.total = sum(len(p) for p in parts.values())
        if samples.paths is None and self.total < SMALL_ARRAYS:  # a pool would take longer to start than the work
            self.workers = 1

    def index(self, split: str, k: int) -> np.ndarray:
        return self.parts[split][k * self.rows:(k + 1) * self.rows]

    def task(self, key, out):
        split, k = key
        idx = self.index(split, k)
        s = self.samples
        items = [s.paths[int(i)] for i in idx] if s.paths is not None else [s.arrays[int(i)] for i in idx]
        return (key, items, idx, self.shape, self.meta_path, self.strict, split == "train", out)

    @property
    def meta_path(self) -> str:
        from .images import IMAGE_PATH

        return IMAGE_PATH

    def _run(self, keys, out, bar_start: int, progress: bool):
        from .chunks import run_chunks

        bar = _Progress(self.total, "prepare") if progress else None
        done = bar_start
        if bar and done:
            bar.update(done)
        tasks = [self.task(key, out(key)) for key in keys]
        for key, result in run_chunks(tasks, self.workers, self.stop):
            done += len(self.index(*key))
            if bar:
                bar.update(done)
            yield key, result

    def in_memory(self, progress: bool):
        results = dict(self._run(self.keys, lambda key: None, 0, progress))
        if len(results) < len(self.keys):
            raise PrepareStopped("prepare stopped by a signal before it was done")
        return self._gather(lambda key: results[key], None)

    def to_files(self, partial, done: set, progress: bool):
        """The chunks not yet in ``partial``, each committed to its own file."""
        import sys

        start = sum(len(self.index(*key)) for key in done)
        if done:
            print(f"continuing at {start:,}/{self.total:,} ({len(done)} of {len(self.keys)} chunks done, "
                  f"in {partial.path})", file=sys.stderr, flush=True)
        todo = [key for key in self.keys if key not in done]
        made = sum(1 for _ in self._run(todo, lambda key: partial.chunk(*key), start, progress))
        if made < len(todo):
            done_now = start + sum(len(self.index(*key)) for key in todo if os.path.exists(partial.chunk(*key)))
            raise PrepareStopped(f"prepare stopped at a chunk boundary: {done_now:,}/{self.total:,} done "
                                 f"(kept in {partial.path}); run it again to continue")

    def assemble(self, partial, h5):
        return self._gather(lambda key: partial.load(*key, images=False), h5, partial)[1:]

    def _gather(self, result_of, h5, partial=None):
        """The splits from the chunks' results, in order: kept indices, skipped images,
        statistics; the images into ``h5`` (from the chunk files) or into memory."""
        shape = self.shape
        splits, skipped, stats = {}, [], _Stats(shape[2])
        for name in SPLITS:
            keys = [key for key in self.keys if key[0] == name]
            results = [result_of(key) for key in keys]
            kept = np.concatenate([r["kept"] for r in results]) if results else np.zeros(0, np.int64)
            for r in results:
                skipped += [tuple(x.split("\0", 1)) for x in r["skipped"]]
                if name == "train":
                    stats.add_sums(r["sums"])
            labels = self.samples.labels[kept].astype(np.int32)
            if h5 is not None:
                g = h5.create_group(name)
                images = g.create_dataset("images", shape=(len(kept), *shape), maxshape=(None, *shape),
                                          dtype=np.uint8, chunks=(min(max(len(kept), 1), 256), *shape))
                at = 0
                for key in keys:
                    arr = partial.load(*key, images=True)["images"]
                    images[at:at + len(arr)] = arr
                    at += len(arr)
                g.create_dataset("labels", data=labels)
                g.create_dataset("source_index", data=kept)
            else:
                parts = [r["images"] for r in results]
                images = np.concatenate(parts) if parts else np.empty((0, *shape), np.uint8)
            splits[name] = Split(images, labels, kept)
        if self.strict and skipped:  # a chunk kept from a run without --strict
            raise ImageError(*skipped[0])
        if len(splits["train"]) == 0:
            raise SourceError(f"{self.samples.origin}: no readable training images")
        return splits, skipped, stats


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
def _new_store(out_path: str, tmp: str):
    """An HDF5 file at the temporary name ``tmp`` (on the same file system), fsync'ed and
    renamed over ``out_path`` when the block succeeds, removed otherwise."""
    import h5py

    folder = os.path.dirname(os.path.abspath(out_path))
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
                    test_origin=str(meta.get("test_origin") or ""),
                    image_path=meta.get("image_path", LEGACY_PATH))
