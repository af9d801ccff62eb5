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
    # the samples of the source's own test set (IDX t10k files, an .npz's x_test, a test/ folder), if known
    test_index: np.ndarray | None = None
    test_origin: str = ""  # what that test set is, in words

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
    images, labels, test_files = [], [], []
    # train before t10k, so the order is the conventional one
    for name in sorted(image_files, key=lambda f: (not f.startswith("train"), f)):
        label_name = name.replace("images", "labels").replace("idx3", "idx1")
        if label_name not in files:
            raise SourceError(f"{os.path.join(folder, name)}: no matching labels file {label_name}")
        x = read_idx(os.path.join(folder, name))
        y = read_idx(os.path.join(folder, label_name))
        if len(x) != len(y):
            raise SourceError(f"{os.path.join(folder, label_name)}: {len(y)} labels for {len(x)} images")
        if not name.startswith("train") and images:  # t10k (or test) files after a train file: the test set
            start = sum(len(a) for a in images)
            test_files.append((name, np.arange(start, start + len(x), dtype=np.int64)))
        images.append(x)
        labels.append(y)
    if not images:
        raise SourceError(f"{folder}: no IDX image files (*images-idx3-ubyte*)")
    y = np.concatenate(labels).astype(np.int64)
    names = _numbered_classes(y, folder)
    names = class_names if class_names and len(class_names) >= len(names) else names
    test = np.concatenate([i for _, i in test_files]) if test_files else None
    return Samples(_check_labels(y, len(names), folder), names, folder, arrays=np.concatenate(images),
                   test_index=test, test_origin=", ".join(os.path.join(folder, n) for n, _ in test_files))


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


def read_npz(path: str, own_test: bool = False) -> Samples:
    """``images`` (or ``x``) and ``labels`` (or ``y``); optional ``class_names``.  With
    ``own_test`` an ``x_test``/``y_test`` pair is read too, after the training arrays, as
    the source's own test set."""
    with open_npz(path) as z:
        keys = set(z.files)
        xk = next((k for k in ("images", "x", "x_train") if k in keys), None)
        yk = next((k for k in ("labels", "y", "y_train") if k in keys), None)
        if xk is None or yk is None:
            raise SourceError(f"{path}: needs arrays 'images' and 'labels' (found: {', '.join(sorted(keys))})")
        check_npz_arrays(path, z, [k for k in (xk, yk, "class_names") if k in keys], SourceError)
        x, y = z[xk], z[yk]
        names = [str(n) for n in z["class_names"]] if "class_names" in keys else None
        test = None
        if own_test and {"x_test", "y_test"} <= keys:
            check_npz_arrays(path, z, ["x_test", "y_test"], SourceError)
            xt, yt = z["x_test"], z["y_test"]
            if len(xt) != len(yt):
                raise SourceError(f"{path}: y_test: {len(yt)} labels for {len(xt)} images")
            if xt.shape[1:] != x.shape[1:]:
                raise SourceError(f"{path}: x_test: images of shape {xt.shape[1:]}, {xk}'s are {x.shape[1:]}")
            test = np.arange(len(x), len(x) + len(xt), dtype=np.int64)
            x, y = np.concatenate([x, xt]), np.concatenate([np.asarray(y).reshape(-1), np.asarray(yt).reshape(-1)])
    if len(x) != len(y):
        raise SourceError(f"{path}: {len(y)} labels for {len(x)} images")
    if names is None:
        names = _numbered_classes(y, path)
    return Samples(_check_labels(y, len(names), path), names, path, arrays=x, test_index=test,
                   test_origin=f"{path} (x_test, y_test)" if test is not None else "")


def read_train_test_folders(folder: str) -> Samples:
    """A folder holding ``train/`` and ``test/``, each with one sub-folder per class: the
    classes are train's; test/ is the source's own test set (its classes must be train's)."""
    train = read_folder(os.path.join(folder, "train"))
    test = read_folder(os.path.join(folder, "test"))
    lookup = {name: i for i, name in enumerate(train.class_names)}
    extra = [n for n in test.class_names if n not in lookup]
    if extra:
        raise SourceError(f"{os.path.join(folder, 'test')}: class folder(s) {', '.join(extra[:5])} are not in "
                          f"{os.path.join(folder, 'train')}")
    test_labels = np.array([lookup[test.class_names[c]] for c in test.labels], np.int64)
    n = len(train)
    return Samples(np.concatenate([train.labels, test_labels]), train.class_names, folder,
                   paths=list(train.paths) + list(test.paths), test_index=np.arange(n, n + len(test), dtype=np.int64),
                   test_origin=os.path.join(folder, "test"))


def user_source(spec: str) -> Samples:
    """``data.source: my_data.py:load``: ``load()`` returns (images uint8 N x H x W [x C],
    labels, class_names) or (paths, labels, class_names) of image files."""
    from .. import plugins

    key, where = "data.source", plugins.where(spec)
    fn = plugins.resolve(spec, "data", key)
    out = plugins.call(fn, key, where)
    what = f"{key}: {where}: {fn.__name__}() returned"
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise SourceError(f"{what} a {type(out).__name__}; expected (images, labels, class_names) or "
                          "(paths, labels, class_names)")
    x, labels, names = out
    if isinstance(names, (str, bytes)) or not hasattr(names, "__len__") or not len(names):
        raise SourceError(f"{what} class_names {names!r}; expected a list of class names")
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise SourceError(f"{what} a class name twice")
    try:
        labels = np.asarray(labels)
    except Exception as e:
        raise SourceError(f"{what} labels that are no array ({type(e).__name__})") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"{what} labels of shape {labels.shape} and type {labels.dtype}; expected one integer "
                          "per sample")
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
            raise SourceError(f"{what} images of shape {x.shape} and type {x.dtype}; expected uint8 N x H x W "
                              "or N x H x W x C (C 1 or 3)")
        arrays, paths = x, None
    else:
        paths = [str(p) for p in x] if isinstance(x, (list, tuple)) else None
        if paths is None or not all(isinstance(p, str) for p in x):
            raise SourceError(f"{what} a {type(x).__name__} as images; expected a uint8 array or a list of paths")
        missing = next((p for p in paths if not os.path.isfile(p)), None)
        if missing is not None:
            raise SourceError(f"{what} a path that is no file: {missing}")
        arrays = None
    if len(labels) != (len(arrays) if arrays is not None else len(paths)):
        raise SourceError(f"{what} {len(labels)} labels for {len(arrays) if arrays is not None else len(paths)} "
                          "images")
    return Samples(_check_labels(labels, len(names), where), names, where, arrays=arrays, paths=paths)


def open_source(source: str, base_dir: str = ".", own_test: bool = False) -> Samples:
    """Samples for a built-in name, the user's own loader (``file.py:load``) or a path
    (relative paths against ``base_dir``).  ``own_test`` (``data.test_split: source``): read
    the source's own test set too, where a source keeps it apart (an .npz's x_test, a
    folder's test/ tree); IDX folders always mark theirs."""
    if source in BUILTIN:
        return BUILTIN[source]()
    from .. import plugins

    if plugins.is_spec(source):
        return user_source(source)
    path = source if os.path.isabs(source) else os.path.join(base_dir, source)
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or folder (built-in sources: {', '.join(BUILTIN)})")
    lower = path.lower()
    if os.path.isdir(path):
        if any("idx3" in f for f in os.listdir(path)):
            return read_idx_folder(path)
        if own_test and all(os.path.isdir(os.path.join(path, d)) for d in ("train", "test")):
            return read_train_test_folders(path)
        return read_folder(path)
    if lower.endswith((".csv", ".json")):
        return read_listing(path)
    if lower.endswith(".npz"):
        return read_npz(path, own_test)
    raise SourceError(f"{path}: unknown source type (a folder, .csv, .json, .npz, an IDX folder or a built-in)")
