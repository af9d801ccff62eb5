"""Data sources: each returns a ``Samples`` index (labels, class names, and a way to
load sample i), whatever the files look like.

Built-in real datasets (all offline): ``digits`` (scikit-learn), ``lfw``
(scikit-image's lfw_subset), ``fashion-mnist`` (Debian's dataset-fashion-mnist).
Paths: a folder with one sub-folder per class, a ``.csv``/``.json`` listing of
(path, label), a ``.npz`` with images and labels, a folder of MNIST-style IDX files.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from .images import IMAGE_EXTENSIONS, decode
from .limits import check_npz_arrays

MAX_LISTING_BYTES = 256 << 20  # a .csv/.json listing (about 3 million rows of paths)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class SourceError(UserError, ValueError):
    """The source cannot be read; the message names the file (exit code 2)."""


@dataclass
class Samples:
    labels: np.ndarray  # int64, one per sample
    class_names: list[str]
    origin: str  # what was read, for messages and the store's metadata
    arrays: np.ndarray | None = None  # in-memory images, (N, H, W) or (N, H, W, C)
    paths: Sequence[str] | None = None  # or one file per sample

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        return self.arrays[i] if self.arrays is not None else decode(self.paths[i])

    def name(self, i: int) -> str:
        return self.paths[i] if self.paths is not None else f"{self.origin}[{i}]"


def _check_labels(labels: np.ndarray, n_classes: int, origin: str) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        raise SourceError(f"{origin}: sample {bad[0]} has label {labels[bad[0]]}, "
                          f"outside the {n_classes} classes")
    return labels


# --------------------------------------------------------------------------- built-ins
def _digits() -> Samples:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return Samples(d.target.astype(np.int64), [str(n) for n in d.target_names], "digits", arrays=images)


def _lfw() -> Samples:
    from skimage.data import lfw_subset

    images = np.round(lfw_subset() * 255).astype(np.uint8)
    labels = np.array([1] * 100 + [0] * 100, dtype=np.int64)  # first 100 are faces
    return Samples(labels, ["non-face", "face"], "lfw", arrays=images)


def _fashion_mnist(folder: str = FASHION_MNIST_DIR) -> Samples:
    if not os.path.isdir(folder):
        raise SourceError(f"{folder}: not found; install it with `apt-get install dataset-fashion-mnist`")
    return read_idx_folder(folder, FASHION_MNIST_CLASSES)


BUILTIN: dict[str, Callable[[], Samples]] = {
    "digits": _digits,
    "lfw": _lfw,
    "fashion-mnist": _fashion_mnist,
}


# --------------------------------------------------------------------------- file readers shared with infer
def image_files(folder: str, *, skip_hidden: bool = False) -> list[str]:
    """The image files (by extension) below ``folder``: folder by folder in sorted order,
    sorted within each.  ``skip_hidden`` leaves out dot-files and dot-folders.

    One ``os.scandir`` per folder (the entry's type comes with the listing: no stat per
    file) and one sort of the whole list at the end, so a folder of a million files
    lists in seconds."""
    found: list[tuple[str, str]] = []
    stack = [folder]
    while stack:
        root = stack.pop()
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue  # as os.walk: a folder that cannot be listed is left out
        for e in entries:
            name = e.name
            if skip_hidden and name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows a link, as os.walk lists it (but does not descend into it)
            except OSError:
                is_dir = False
            if is_dir:
                if not e.is_symlink():
                    stack.append(e.path)
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((root, name))
    found.sort()
    return [os.path.join(root, name) for root, name in found]


def listing_items(path: str, expected: str) -> list:
    """The raw entries of a listing: a ``.json`` file's list, or a ``.csv`` file's rows with
    their cells stripped (a blank line is an empty row).  ``expected`` names what the JSON
    list should hold, for the message when it is not a list."""
    from ..rundir import FileRefused, read_capped

    try:
        text = read_capped(path, MAX_LISTING_BYTES, "listing").decode("utf-8")
        if not path.lower().endswith(".json"):
            return [[c.strip() for c in row] for row in csv.reader(io.StringIO(text, newline=""))]
        data = json.loads(text)
    except FileRefused as e:
        raise SourceError(str(e)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read listing ({e})") from None
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of {expected}")
    return data


def listing_path(listing: str, entry: str) -> str:
    """A listing's entry as a path: a relative one is relative to the listing's folder."""
    return entry if os.path.isabs(entry) else os.path.join(os.path.dirname(os.path.abspath(listing)), entry)


@contextlib.contextmanager
def open_npz(path: str):
    """The opened ``.npz`` (no pickles); a file numpy cannot read is a SourceError."""
    from ..rundir import FileRefused, check_regular

    try:
        check_regular(path, "npz")  # a FIFO would block the open, a device never end
        with np.load(path, allow_pickle=False) as z:
            yield z
    except FileRefused as e:
        raise SourceError(str(e)) from None
    except SourceError:
        raise
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot read npz ({e})") from None


# --------------------------------------------------------------------------- files
def read_idx(path: str) -> np.ndarray:
    """An MNIST-style IDX file (optionally .gz) as an array."""
    from ..rundir import FileRefused, check_regular
    from .limits import memory_available

    opener = gzip.open if path.endswith(".gz") else open
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    try:
        check_regular(path, "dataset file (IDX)")
        with opener(path, "rb") as f:
            data = f.read(4)
            if len(data) < 4 or data[0] != 0 or data[1] != 0:
                raise SourceError(f"{path}: not an IDX file (bad magic number)")
            if data[2] not in dtypes:
                raise SourceError(f"{path}: unknown IDX element type {data[2]:#x}")
            data += f.read(4 * data[3])
            shape = struct.unpack(f">{data[3]}I", data[4:].ljust(4 * data[3], b"\0"))
            size = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtypes[data[2]]).itemsize
            if size > memory_available() / 2:  # read no more than the header declares, and only if it fits
                raise SourceError(f"{path}: declares {size:,} bytes, more than this process may use")
            data += f.read(size)
    except FileRefused as e:
        raise SourceError(str(e)) from None
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: cannot read IDX file ({e})") from None
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise SourceError(f"{path}: truncated IDX file (its header)")
    body = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise SourceError(f"{path}: truncated IDX file ({body.size} of {int(np.prod(shape))} values)")
    return body.reshape(shape).astype(body.dtype.newbyteorder("="))


def read_idx_folder(folder: str, class_names: list[str] | None = None) -> Samples:
    """Pairs of ``*images-idx3-ubyte[.gz]`` and ``*labels-idx1-ubyte[.gz]`` files (train first)."""
    files = sorted(os.listdir(folder))
    image_files = [f for f in files if "images" in f and "idx3" in f]
    images, labels = [], []
    # train before t10k, so the order is the conventional one
    for name in sorted(image_files, key=lambda f: (not f.startswith("train"), f)):
        label_name = name.replace("images", "labels").replace("idx3", "idx1")
        if label_name not in files:
            raise SourceError(f"{os.path.join(folder, name)}: no matching labels file {label_name}")
        x = read_idx(os.path.join(folder, name))
        y = read_idx(os.path.join(folder, label_name))
        if len(x) != len(y):
            raise SourceError(f"{os.path.join(folder, label_name)}: {len(y)} labels for {len(x)} images")
        images.append(x)
        labels.append(y)
    if not images:
        raise SourceError(f"{folder}: no IDX image files (*images-idx3-ubyte*)")
    y = np.concatenate(labels).astype(np.int64)
    names = _numbered_classes(y, folder)
    names = class_names if class_names and len(class_names) >= len(names) else names
    return Samples(_check_labels(y, len(names), folder), names, folder, arrays=np.concatenate(images))


def read_folder(folder: str) -> Samples:
    """One sub-folder per class; class names are the sorted sub-folder names."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise SourceError(f"{folder}: no class sub-folders (expected {folder}/<class>/<image>)")
    paths, labels = [], []
    for c, name in enumerate(classes):
        found = image_files(os.path.join(folder, name))
        paths += found
        labels += [c] * len(found)
    if not paths:
        raise SourceError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders")
    return Samples(np.array(labels, dtype=np.int64), classes, folder, paths=paths)


def read_listing(path: str) -> Samples:
    """A CSV (columns path,label; header optional) or JSON list of {"path", "label"}."""
    rows: list[tuple[str, str]] = []
    items = listing_items(path, '{"path": ..., "label": ...}')
    if path.lower().endswith(".json"):
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "path" not in item or "label" not in item:
                raise SourceError(f"{path}: entry {i} needs 'path' and 'label'")
            rows.append((str(item["path"]), str(item["label"])))
    else:
        for i, row in enumerate(items):
            if not row or (i == 0 and [c.lower() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2:
                raise SourceError(f"{path}: line {i + 1}: expected path,label")
            rows.append((row[0], row[1]))
    if not rows:
        raise SourceError(f"{path}: the listing is empty")
    paths = []
    for i, (p, label) in enumerate(rows):
        if not label:
            raise SourceError(f"{path}: entry {i + 1} ({p}) has an empty label")
        full = listing_path(path, p)
        if not os.path.exists(full):
            raise SourceError(f"{path}: entry {i + 1} names a missing file: {full}")
        paths.append(full)
    classes = sorted({label for _, label in rows})
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.array([lookup[label] for _, label in rows], dtype=np.int64)
    return Samples(labels, classes, path, paths=paths)


MAX_NUMBERED_CLASSES = 100_000


def _numbered_classes(y: np.ndarray, origin: str) -> list[str]:
    """Class names 0..max label for labels without names; a label that is no small
    non-negative integer is refused before a name is made for every number below it."""
    if y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise SourceError(f"{origin}: labels must be integers (got {y.dtype}, {y.size} values)")
    lo, hi = int(np.min(y)), int(np.max(y))
    if lo < 0 or hi >= MAX_NUMBERED_CLASSES:
        bad = lo if lo < 0 else hi
        raise SourceError(f"{origin}: label {bad}: labels without class_names must be 0 to "
                          f"{MAX_NUMBERED_CLASSES - 1:,} (add a class_names array for other classes)")
    return [str(i) for i in range(hi + 1)]


def read_npz(path: str) -> Samples:
    """``images`` (or ``x``) and ``labels`` (or ``y``); optional ``class_names``."""
    with open_npz(path) as z:
        keys = set(z.files)
        xk = next((k for k in ("images", "x", "x_train") if k in keys), None)
        yk = next((k for k in ("labels", "y", "y_train") if k in keys), None)
        if xk is None or yk is None:
            raise SourceError(f"{path}: needs arrays 'images' and 'labels' (found: {', '.join(sorted(keys))})")
        check_npz_arrays(path, z, [k for k in (xk, yk, "class_names") if k in keys], SourceError)
        x, y = z[xk], z[yk]
        names = [str(n) for n in z["class_names"]] if "class_names" in keys else None
    if len(x) != len(y):
        raise SourceError(f"{path}: {len(y)} labels for {len(x)} images")
    if names is None:
        names = _numbered_classes(y, path)
    return Samples(_check_labels(y, len(names), path), names, path, arrays=x)


def open_source(source: str, base_dir: str = ".") -> Samples:
    """Samples for a built-in name or a path (relative paths against ``base_dir``)."""
    if source in BUILTIN:
        return BUILTIN[source]()
    path = source if os.path.isabs(source) else os.path.join(base_dir, source)
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or folder (built-in sources: {', '.join(BUILTIN)})")
    lower = path.lower()
    if os.path.isdir(path):
        if any("idx3" in f for f in os.listdir(path)):
            return read_idx_folder(path)
        return read_folder(path)
    if lower.endswith((".csv", ".json")):
        return read_listing(path)
    if lower.endswith(".npz"):
        return read_npz(path)
    raise SourceError(f"{path}: unknown source type (a folder, .csv, .json, .npz, an IDX folder or a built-in)")
