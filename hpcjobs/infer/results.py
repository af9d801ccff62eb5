"""The results of one ``--output``, written atomically, and the shards' part files.

* ``STEM.h5``: ``probabilities`` (N, classes) float32, ``top_k/indices`` (N, k) int32,
  ``top_k/probabilities`` (N, k) float32, ``path`` (N,) utf-8, ``row`` (N,) the position in
  the input list, ``errors/{row,path,reason}``; attributes ``class_names``, ``top_k``,
  ``rows_total``, ``errors``, ``model``, ``input``;
* ``STEM.csv``: ``path,class,probability,top_k`` with top_k as ``name:prob;...``;
* ``STEM.errors.csv``: ``path,reason`` of every input that could not be read;
* ``STEM.part-IIIII-of-NNNNN.h5``: a finished shard, laid out like ``STEM.h5``;
  ``merge`` joins them in row order into the outputs and removes them.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from ..rundir import atomic_path
from .errors import InferError
from .shards import Shard

FORMAT = "hpcjobs-infer/1"
READ_ROWS = 65536  # rows per block when joining part files
CSV_HEADER = ["path", "class", "probability", "top_k"]
ERRORS_HEADER = ["path", "reason"]


@dataclass(frozen=True)
class Outputs:
    """The files of one ``--output``: results, errors, and the shards' part files."""

    stem: str
    h5: Optional[str]
    csv: Optional[str]
    submission: Optional[Any] = None  # infer.submission (a Kaggle-style CSV beside the results)

    @property
    def errors(self) -> str:
        return f"{self.stem}.errors.csv"

    def part(self, shard: Shard) -> str:
        return f"{self.stem}.{shard.tag}.h5"

    def chunks(self, shard: Shard) -> str:
        return f"{self.stem}.{shard.tag}.chunks"

    @property
    def submission_csv(self) -> Optional[str]:
        return f"{self.stem}.submission.csv" if self.submission else None

    @property
    def files(self) -> list[str]:
        return [p for p in (self.h5, self.csv, self.submission_csv) if p]


_EXT = {".h5": "h5", ".hdf5": "h5", ".csv": "csv"}


def outputs_for(output: str, fmt: str = "auto", submission=None) -> Outputs:
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
    return Outputs(stem, h5, csv_path, submission)


# --------------------------------------------------------------------------- refusing a bad --output
def _is_result(path: str) -> bool:
    """Whether an existing file is one infer wrote (results, errors CSV), so it may be replaced."""
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".csv"):
        try:
            with open(path, encoding="utf-8", errors="replace", newline="") as f:
                header = next(csv.reader(f), None)
        except (OSError, csv.Error):
            return False
        return header in (CSV_HEADER, ERRORS_HEADER)
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except OSError:
        return False


def _check_writable(folder: str, output: str):
    """Refuse an output folder that cannot be made or written in (nothing is created here)."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InferError(f"--output {output}: {existing} is a file, not a folder; choose another --output")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InferError(f"--output {output}: cannot write in {existing} ({e.strerror or e}); "
                         "choose a writable place") from None


def check_outputs(outs: Outputs, input_path: Optional[str] = None, shard: Optional[Shard] = None):
    """Before any work: refuse to write over the input, over an existing file that is not an
    infer result, or into a folder that cannot be written."""
    targets = [*outs.files, outs.errors] + ([outs.part(shard), outs.chunks(shard)] if shard else [])
    if input_path and os.path.exists(input_path):
        for t in targets:
            if os.path.exists(t) and os.path.samefile(t, input_path):
                raise InferError(f"--output {t}: that is the input ({input_path}); results never replace "
                                 "their input, choose another --output")
    for t in (*outs.files, outs.errors):
        if os.path.lexists(t) and not _is_result(t):
            raise InferError(f"{t}: exists and is not an hpcjobs infer result; delete it or choose another "
                             "--output")
    _check_writable(os.path.dirname(os.path.abspath(outs.stem)), outs.h5 or outs.csv or outs.stem)


# --------------------------------------------------------------------------- pieces and result files
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


def str_array(values) -> np.ndarray:
    return np.array(list(values), dtype=str) if len(values) else np.zeros(0, str)


def _fmt(p: float) -> str:
    return f"{p:.6g}"


_H5_COLUMNS = ("probabilities", "top_k/indices", "top_k/probabilities", "path", "row")
_H5_ERRORS = ("row", "path", "reason")


def _open_h5(stack: contextlib.ExitStack, path: str, n_classes: int, top_k: int):
    import h5py

    f = stack.enter_context(h5py.File(stack.enter_context(atomic_path(path)), "w"))
    text = h5py.string_dtype("utf-8")
    block = max(1, min(4096, (1 << 18) // max(n_classes, 1)))
    for name, dt, width in (("probabilities", "f4", n_classes), ("top_k/indices", "i4", top_k),
                            ("top_k/probabilities", "f4", top_k)):
        f.create_dataset(name, (0, width), dt, maxshape=(None, width), chunks=(block, width))
    f.create_dataset("path", (0,), text, maxshape=(None,), chunks=(block,))
    f.create_dataset("row", (0,), "i8", maxshape=(None,), chunks=(block,))
    for name, dt in zip(_H5_ERRORS, ("i8", text, text)):
        f.create_dataset(f"errors/{name}", (0,), dt, maxshape=(None,), chunks=(256,))
    return f


def _append(dataset, at: int, data):
    dataset.resize(at + len(data), axis=0)
    dataset[at:at + len(data)] = data


def _add_h5(f, p: Piece, rows: int, skipped: int):
    for name, data in zip(_H5_COLUMNS, (p.probabilities, p.top_k_indices, p.top_k_probabilities,
                                        p.path.astype(object), p.row)):
        _append(f[name], rows, data)
    for name, data in zip(_H5_ERRORS, (p.error_row, p.error_path.astype(object), p.error_reason.astype(object))):
        _append(f[f"errors/{name}"], skipped, data)


def _open_csv(stack: contextlib.ExitStack, path: str, header: list[str]):
    out = stack.enter_context(open(stack.enter_context(atomic_path(path)), "w", newline="", encoding="utf-8"))
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(header)
    return writer


def _csv_rows(p: Piece, class_names: list[str]) -> Iterator[list]:
    for path, ti, tp in zip(p.path, p.top_k_indices, p.top_k_probabilities):
        yield [path, class_names[ti[0]], _fmt(tp[0]), ";".join(f"{class_names[j]}:{_fmt(q)}" for j, q in zip(ti, tp))]


def _submission_rows(p: Piece, class_names: list[str], sub) -> Iterator[list]:
    for row, path, ti in zip(p.row, p.path, p.top_k_indices):
        ident = {"row": int(row) + sub.first_id, "path": path,
                 "stem": os.path.splitext(os.path.basename(str(path)))[0]}[sub.id]
        yield [ident, class_names[ti[0]]]


def write_results(pieces: Iterable[Piece], class_names: list[str], top_k: int, attrs: dict, *,
                  h5: Optional[str] = None, csv_path: Optional[str] = None,
                  errors_csv: Optional[str] = None, submission=None, submission_csv=None) -> tuple[int, int]:
    """Stream pieces (in row order) into the HDF5 and CSV results and the errors CSV, each
    written under a temporary name and renamed into place only when complete.
    Returns (rows written, rows skipped)."""
    import h5py

    rows = skipped = 0
    with contextlib.ExitStack() as stack:
        f = _open_h5(stack, h5, len(class_names), top_k) if h5 else None
        writer = _open_csv(stack, csv_path, CSV_HEADER) if csv_path else None
        err = _open_csv(stack, errors_csv, ERRORS_HEADER) if errors_csv else None
        sub = _open_csv(stack, submission_csv, [submission.id_column, submission.label_column] if submission.header
                        else None) if submission_csv else None
        for p in pieces:
            if f is not None:
                _add_h5(f, p, rows, skipped)
            if writer is not None:
                writer.writerows(_csv_rows(p, class_names))
            if err is not None:
                err.writerows(zip(p.error_path, p.error_reason))
            if sub is not None:
                sub.writerows(_submission_rows(p, class_names, submission))
            rows += len(p.row)
            skipped += len(p.error_row)
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
        errors = {k: f[f"errors/{k}"] for k in _H5_ERRORS}
        e = dict(error_row=errors["row"][...], error_path=str_array(errors["path"].asstr()[...]),
                 error_reason=str_array(errors["reason"].asstr()[...]))
        for a in range(0, max(n, 1), READ_ROWS):
            b = min(a + READ_ROWS, n)
            yield Piece(f["row"][a:b], str_array(f["path"].asstr()[a:b]), f["probabilities"][a:b],
                        f["top_k/indices"][a:b], f["top_k/probabilities"][a:b], **e)
            e = {}


def part_attrs(path: str) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in f.attrs}
    except OSError as e:
        raise InferError(f"{path}: not a readable part file ({e}); delete it and rerun its shard") from None
    attrs.pop("class_names", None)
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}


def finish(outs: Outputs, pieces: Iterable[Piece], class_names: list[str], k: int, attrs: dict, log):
    """Write the outputs of the whole input (an unsharded run, or the merge); (rows, skipped)."""
    attrs = {key: v for key, v in attrs.items() if key not in ("shard", "num_shards")}
    rows, skipped = write_results(pieces, class_names, k, attrs, h5=outs.h5, csv_path=outs.csv,
                                  errors_csv=outs.errors, submission=outs.submission,
                                  submission_csv=outs.submission_csv)
    log(f"{rows + skipped} inputs: {rows} predicted, {skipped} skipped as unreadable"
        + (f" (listed in {outs.errors})" if skipped else "") + f"; results: {', '.join(outs.files)}")
    return rows, skipped


# --------------------------------------------------------------------------- merge
_PART = re.compile(r"\.part-(\d{5,})-of-(\d{5,})\.h5$")


def _find_parts(outs: Outputs) -> list[str]:
    """The part files of every shard of one run, in shard order; refuses gaps and mixtures."""
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
    return [parts[i] for i in range(count)]


def _check_parts(ordered: list[str], attrs: list[dict]):
    first, count = attrs[0], len(ordered)
    for i, (p, a) in enumerate(zip(ordered, attrs)):
        for key in ("format", "input", "model", "rows_total", "top_k"):
            if a.get(key) != first.get(key):
                raise InferError(f"{p}: {key} differs from {ordered[0]}'s (parts of different runs); "
                                 "delete the stale parts and rerun them")
        if a.get("rows_lo") != (attrs[i - 1]["rows_hi"] if i else 0) or a.get("num_shards") != count:
            raise InferError(f"{p}: rows {a.get('rows_lo')}..{a.get('rows_hi')} do not follow the previous part")
    if attrs[-1]["rows_hi"] != first["rows_total"]:
        raise InferError(f"{ordered[-1]}: the parts cover {attrs[-1]['rows_hi']} of {first['rows_total']} rows")


def merge(outs: Outputs, log=print) -> int:
    """Join the part files of every shard, in row order, into the outputs; remove the parts."""
    import h5py

    ordered = _find_parts(outs)
    attrs = [part_attrs(p) for p in ordered]
    _check_parts(ordered, attrs)
    first = attrs[0]
    check_outputs(outs, first.get("input_path"))
    with h5py.File(ordered[0], "r") as f:
        class_names = [str(c) for c in f.attrs["class_names"]]

    def pieces():
        for p in ordered:
            yield from read_part(p)

    keep = {key: first[key] for key in ("input", "rows_total", "model", "input_path", "model_path", "split")
            if key in first}
    keep.update(rows_lo=0, rows_hi=first["rows_total"])
    finish(outs, pieces(), class_names, int(first["top_k"]), keep, log)
    for p in ordered:
        os.remove(p)
    log(f"merged {len(ordered)} parts")
    return 0
