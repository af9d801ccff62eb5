"""Reading rows of a split: whole contiguous ranges at a time, into aligned arrays.

A feeder holds a segment or a window of the training split in memory.  ``RowReader``
reads it with one contiguous read per range of rows: straight from the store's file
with ``os.preadv`` (which lets go of the GIL, so the tf.data threads and the feeder's
generator keep running) wherever the HDF5 dataset is stored as raw bytes, through h5py
otherwise.  The arrays are 64-byte aligned, so TensorFlow takes them without a copy.

``view`` goes one step further for a single range whose bytes lie contiguous and
64-byte aligned in the file (as ``prepare`` writes stores): an array over the file
mapped read-only, no copy at all; ``ask`` has the kernel read its pages ahead
(``posix_fadvise``), and the page cache holds them.
"""
from __future__ import annotations

import mmap
import os
import sys
import threading

import numpy as np


class RowReader:
    """Reads row ranges of a split into one 64-byte aligned array (which TensorFlow then
    takes without a copy): one contiguous read per range, with ``os.preadv`` straight from
    the file (the GIL let go) where the HDF5 dataset is stored raw (contiguous, or in
    unfiltered chunks of whole rows), through h5py otherwise, by copy from a numpy array."""

    def __init__(self, images, path: str | None = None):
        self.images, self.path = images, path
        self.row = int(np.prod(images.shape[1:])) * images.dtype.itemsize
        self.extents = None if isinstance(images, np.ndarray) or not path else _raw_extents(images)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._map: mmap.mmap | bool | None = None  # False: the file cannot be mapped

    def read(self, ranges: list[tuple[int, int]]) -> np.ndarray:
        """Rows [lo, hi) of every range, concatenated into one array."""
        total = sum(hi - lo for lo, hi in ranges)
        out = self._array((total, *self.images.shape[1:]))
        fd = os.open(self.path, os.O_RDONLY) if self.extents is not None else None
        try:
            o = 0
            for lo, hi in ranges:
                if fd is not None:
                    self._pread(fd, lo, hi, memoryview(out.reshape(-1))[o * self.row:])
                elif isinstance(self.images, np.ndarray):
                    out[o:o + hi - lo] = self.images[lo:hi]
                elif hi > lo:
                    self.images.read_direct(out, np.s_[lo:hi], np.s_[o:o + hi - lo])
                o += hi - lo
        finally:
            if fd is not None:
                os.close(fd)
        return out

    def _span(self, lo: int, hi: int) -> tuple[int, int] | None:
        """(first byte, length) of rows [lo, hi) when they lie contiguous in the file."""
        if self.extents is None or hi <= lo:
            return None
        firsts, offsets, rows = self.extents
        j, k = (int(np.searchsorted(firsts, r, side="right")) - 1 for r in (lo, hi - 1))
        if np.any(np.diff(offsets[j:k + 1]) != rows * self.row):  # extents apart in the file
            return None
        return int(offsets[j]) + (lo - int(firsts[j])) * self.row, (hi - lo) * self.row

    def view(self, lo: int, hi: int) -> np.ndarray | None:
        """Rows [lo, hi) over the file mapped read-only (no copy), or None where they are not
        one aligned span of it or the file cannot be mapped."""
        span = self._span(lo, hi)
        if span is None or span[0] % 64 or self._map is False:
            return None
        with self._lock:
            if self._map is None:
                try:
                    with open(self.path, "rb") as f:
                        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):  # a file system without mmap: read instead
                    self._map = False
                    return None
        return np.frombuffer(self._map, np.uint8, span[1], span[0]).reshape(hi - lo, *self.images.shape[1:])

    def ask(self, lo: int, hi: int):
        """Have the kernel read rows [lo, hi) into the page cache, in the background."""
        span = self._span(lo, hi)
        if span is not None and hasattr(os, "posix_fadvise"):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, span[0], span[1], os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def _array(self, shape: tuple[int, ...]) -> np.ndarray:
        """A 64-byte aligned uint8 array in a buffer handed out before whose arrays are all
        gone (TensorFlow holds a reference to the one it uses), else in a new buffer; up to
        three are kept for reuse, so reads neither fault pages in nor zero them."""
        size = int(np.prod(shape))
        with self._lock:  # two streams of one feeder must not take the same buffer
            raw = next((b for b in self._free if len(b) >= size + 64 and sys.getrefcount(b) <= 3), None)
            if raw is None:  # 3: the list, ``b``, getrefcount's argument
                raw = np.empty(size + 64 + size // 32, np.uint8)
                if len(self._free) < 3:
                    self._free.append(raw)
            return raw[(-raw.ctypes.data) % 64:][:size].reshape(shape)

    def _pread(self, fd: int, lo: int, hi: int, dest: memoryview):
        firsts, offsets, rows = self.extents
        done = 0
        while lo < hi:
            j = int(np.searchsorted(firsts, lo, side="right")) - 1
            n = min(hi, int(firsts[j]) + rows) - lo
            want, at = n * self.row, int(offsets[j]) + (lo - int(firsts[j])) * self.row
            got = 0
            while got < want:
                k = os.preadv(fd, [dest[done + got:done + want]], at + got)
                if k <= 0:
                    raise OSError(f"{self.path}: short read at byte {at + got}")
                got += k
            lo, done = lo + n, done + want


def _raw_extents(images) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(first row, byte offset) of every raw extent of an h5py dataset and rows per
    extent, or None when its rows cannot be read as plain bytes."""
    try:
        if images.id.get_create_plist().get_nfilters() or len(images) == 0:
            return None
        offset = images.id.get_offset()
        if offset is not None:  # contiguous layout
            return np.array([0]), np.array([offset]), len(images)
        step = images.chunks[0] if images.chunks and tuple(images.chunks[1:]) == images.shape[1:] else 0
        if not step:
            return None
        firsts = np.arange(0, len(images), step)
        zeros = (0,) * (images.ndim - 1)
        offsets = [images.id.get_chunk_info_by_coord((int(f), *zeros)).byte_offset for f in firsts]
        return None if None in offsets else (firsts, np.array(offsets), step)
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):  # an old h5py or HDF5
        return None


def take_rows(images, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of a numpy array or an h5py dataset (which wants increasing indices)."""
    if isinstance(images, np.ndarray):
        return images[idx]
    uniq, inverse = np.unique(idx, return_inverse=True)
    return images[uniq][inverse]
