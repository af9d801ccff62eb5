"""The ordered rows of an inference input, read with ``hpcjobs.data``'s readers.

* a folder tree: every image file below it (dot-files and dot-folders skipped), sorted
  by relative path; a row's ``path`` is ``FOLDER/relpath``;
* a ``.csv`` listing (first column the path, an optional ``path`` header, other columns
  ignored) or a ``.json`` list of paths or of ``{"path": ...}``: in listing order; a row's
  ``path`` is written as the listing gives it.  A listed file that is missing is not an
  error here: it becomes a skipped row, like any unreadable image;
* an hpcjobs ``.h5`` store: one split (``test`` by default) or ``all``: ``STORE:split[j]``;
* an ``.npz`` with an ``images`` (or ``x``) array, labels optional: ``FILE[i]``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..data.images import IMAGE_EXTENSIONS
from ..data.limits import check_npz_arrays
from ..data.sources import SourceError, image_files, listing_items, listing_path, open_npz


@dataclass
class Inputs:
    """The ordered rows of an input and how to read row i's raw image."""

    origin: str
    names: list[str]  # the ``path`` written for each row
    load: Callable[[int], object]  # row i's raw image: a file path (decoded by images.model_image) or an array
    fingerprint: str  # changes when the row list (or an array file) changes
    close: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self.names)


def _digest(names: Iterable[str], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for n in names:
        h.update(n.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:20]


def printable(name: str) -> str:
    """A file name as valid UTF-8 (undecodable bytes from the file system become U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _file_stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _folder_inputs(folder: str) -> Inputs:
    found = image_files(folder, skip_hidden=True)
    if not found:
        raise SourceError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder tree")
    paths = [os.path.join(folder, r) for r in sorted(os.path.relpath(p, folder) for p in found)]
    return Inputs(folder, [printable(p) for p in paths], lambda i: paths[i], _digest(paths))


def _json_entry(path: str, i: int, item) -> str:
    p = item.get("path") if isinstance(item, dict) else item
    if not isinstance(p, str) or not p.strip():
        raise SourceError(f"{path}: entry {i}: expected a path or {{\"path\": ...}}")
    return p.strip()


def _listing_inputs(path: str) -> Inputs:
    is_json = path.lower().endswith(".json")
    entries: list[str] = []
    for i, item in enumerate(listing_items(path, 'paths or of {"path": ...}')):
        p = _json_entry(path, i, item) if is_json else (item[0] if item else "")
        if not p or (not is_json and not entries and p.lower() == "path"):
            continue  # a blank CSV line, or the CSV header
        entries.append(p)
    if not entries:
        raise SourceError(f"{path}: the listing is empty")
    full = [listing_path(path, p) for p in entries]
    if not any(os.path.isfile(p) for p in full):  # e.g. foo,bar: nothing to predict is no success
        raise SourceError(f"{path}: none of its {len(full)} entries is an existing file (the first column "
                          f"must be the image path; the first entry is {entries[0][:80]!r})")
    return Inputs(path, entries, lambda i: full[i], _digest(full))


def _store_inputs(path: str, split: str) -> Inputs:
    from ..data.store import SPLITS, open_store

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
    with open_npz(path) as z:
        keys = list(z.files)
        key = next((k for k in ("images", "x", "x_test", "x_train") if k in keys), None)
        if key:
            check_npz_arrays(path, z, [key], SourceError)
        arr = z[key] if key else None
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
