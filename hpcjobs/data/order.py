"""The training stream's order: a pure function of the seed and the stream position.

A feeder's position is therefore just the step it is at, whoever reads the stream:

* ``memory`` and ``hybrid`` (``Plan``): the training split is cut into segments (one for
  ``memory``; for ``hybrid`` as many as it takes to fit the memory budget).  Every
  segment has the class mix of the whole split and, in the stratified store, spans a
  narrow row range.  The stream visits segment 0 for ``epochs_per_segment`` passes,
  each a fresh permutation (``default_rng([seed, pass])``), then segment 1, and so on,
  cycling.
* ``disk`` (``BlockPlan``): a pass is the whole split, read in blocks of contiguous rows
  (the feeder sizes them: at most 1,024 rows, at least 8 blocks to a window, two windows
  within the memory budget, like hybrid segments).  The pass's generator
  ``default_rng([seed, pass])`` first permutes the blocks; consecutive runs of them make
  windows, and the same generator then permutes the rows of each window (taken in row
  order) in turn.  When one window holds the whole split
  there is no block order to draw: the pass is a full permutation, the same as
  ``memory``'s.
* Global batch k is stream positions [k*B, (k+1)*B); worker w of W takes the
  contiguous slice [k*B + w*B/W, k*B + (w+1)*B/W).  Over a pass every sample is
  seen once, by exactly one worker.
* Augmentation parameters come from a counter-based generator (Philox) keyed by the
  seed and advanced to the sample's stream position: the same sample at the same
  position gets the same augmentation, however the stream is sharded or resumed.

Every position also has a *key*: which rows a feeder holds in memory (a segment, a
window) to serve it.
"""
from __future__ import annotations

import math

import numpy as np

AUG_PARAMS = 8  # random numbers per sample; Philox yields 4 per counter step


def stratified_segments(labels: np.ndarray, count: int) -> list[np.ndarray]:
    """Cut a split into ``count`` segments, each holding floor or ceil of n_c / count samples
    of every class c (the whole split's class distribution within one sample per class).

    A class's share of a segment is a contiguous run of that class's rows, so in a store
    written in stratified order every segment lies in one narrow row range: it is read with
    one sequential read.  Leftover samples are dealt round-robin across classes, so segment
    sizes differ by at most one.
    """
    labels = np.asarray(labels)
    pieces: list[list[np.ndarray]] = [[] for _ in range(count)]
    offset = 0
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        base, extra = divmod(len(rows), count)
        sizes = np.full(count, base)
        sizes[(offset + np.arange(extra)) % count] += 1
        offset = (offset + extra) % count
        for k, part in enumerate(np.split(rows, np.cumsum(sizes)[:-1])):
            pieces[k].append(part)
    return [np.sort(np.concatenate(p)) for p in pieces]


class Plan:
    """The sample stream over ``n`` training samples cut into ``segments``.

    Every stream position also has a *key*: which resident rows (here the segment) hold
    its sample; ``ranges(key)`` are those rows, ``next_key`` the rows needed after them."""

    def __init__(self, n: int, seed: int, segments: list[np.ndarray] | None = None, epochs_per_segment: int = 1):
        if n < 1:
            raise ValueError("a plan needs at least one sample")
        self.n, self.seed, self.epochs_per_segment = n, seed, epochs_per_segment
        self.segments = segments if segments is not None else [np.arange(n)]
        self._sizes = [len(s) for s in self.segments]
        self._cycle = n * epochs_per_segment
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.single = len(self.segments) == 1  # one set of resident rows, for good

    def locate(self, position: int) -> tuple[int, int, int]:
        """(pass number, segment, offset within the pass) of a stream position."""
        cycle, rest = divmod(position, self._cycle)
        passes = cycle * len(self.segments) * self.epochs_per_segment
        for s, size in enumerate(self._sizes):
            span = size * self.epochs_per_segment
            if rest < span:
                e, off = divmod(rest, size)
                return passes + s * self.epochs_per_segment + e, s, off
            rest -= span
        raise AssertionError("unreachable")

    def segment_of_pass(self, pass_number: int) -> int:
        return (pass_number // self.epochs_per_segment) % len(self.segments)

    def permutation(self, pass_number: int) -> np.ndarray:
        return self._order(pass_number)[0]

    def _order(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample of each position of pass p, key of each), the last few cached."""
        got = self._orders.get(p)
        if got is None:
            got = self._make_order(p)
            self._orders = {**dict(list(self._orders.items())[-2:]), p: got}
        return got

    def _make_order(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.segment_of_pass(p)
        seg = self.segments[s]
        return seg[np.random.default_rng([self.seed, p]).permutation(len(seg))], np.full(len(seg), s)

    def ranges(self, key: int) -> list[tuple[int, int]]:
        seg = self.segments[key]
        return [(int(seg[0]), int(seg[-1]) + 1)]

    def next_key(self, key: int) -> int:
        return (key + 1) % len(self.segments)

    def indices(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices at stream positions [start, stop), and the key of each."""
        idx, keys = [], []
        pos = start
        while pos < stop:
            p, _, off = self.locate(pos)
            perm, key = self._order(p)
            take = min(stop - pos, len(perm) - off)
            idx.append(perm[off:off + take])
            keys.append(key[off:off + take])
            pos += take
        if not idx:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(idx), np.concatenate(keys)

    def position(self, step: int, global_batch: int) -> dict:
        """Human-readable position of the stream before ``step``."""
        p, seg, off = self.locate(step * global_batch)
        return dict(step=step, pass_number=p, segment=seg,
                    epoch_in_segment=p % self.epochs_per_segment, offset_in_pass=off)

    @staticmethod
    def worker_slice(step: int, global_batch: int, worker: int, workers: int) -> tuple[int, int]:
        per = global_batch // workers
        start = step * global_batch + worker * per
        return start, start + per


class BlockPlan(Plan):
    """The disk stream: blocks of ``block`` rows, shuffled; windows of ``window`` blocks,
    each shuffled inside (see the module docstring).  Keys are pass * windows + window."""

    def __init__(self, n: int, seed: int, block: int, window: int):
        super().__init__(n, seed)
        self.block, self.window = block, window
        self.blocks = math.ceil(n / block)
        self.windows = math.ceil(self.blocks / window)
        self.single = self.windows == 1

    def _window_blocks(self, order: np.ndarray, j: int) -> np.ndarray:
        return np.sort(order[j * self.window:(j + 1) * self.window])

    def _make_order(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, p])
        if self.single:
            return rng.permutation(self.n), np.zeros(self.n, np.int64)
        order = rng.permutation(self.blocks)
        perms, keys = [], []
        for j in range(self.windows):
            rows = (self._window_blocks(order, j)[:, None] * self.block + np.arange(self.block)).ravel()
            rows = rows[rows < self.n]
            perms.append(rows[rng.permutation(len(rows))])
            keys.append(np.full(len(rows), p * self.windows + j))
        return np.concatenate(perms), np.concatenate(keys)

    def ranges(self, key: int) -> list[tuple[int, int]]:
        if self.single:
            return [(0, self.n)]
        p, j = divmod(key, self.windows)
        out: list[tuple[int, int]] = []
        for b in self._window_blocks(np.random.default_rng([self.seed, p]).permutation(self.blocks), j).tolist():
            lo, hi = b * self.block, min((b + 1) * self.block, self.n)
            if out and out[-1][1] == lo:  # adjacent blocks: one read
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    def next_key(self, key: int) -> int:
        return 0 if self.single else key + 1

    def position(self, step: int, global_batch: int) -> dict:
        key = int(self.indices(step * global_batch, step * global_batch + 1)[1][0])
        return dict(super().position(step, global_batch), window=key % self.windows)


def augment_params(seed: int, start: int, count: int) -> np.ndarray:
    """Uniform [0,1) numbers, AUG_PARAMS per sample, for stream positions [start, start+count)."""
    bitgen = np.random.Philox(key=seed).advance(start * AUG_PARAMS // 4)
    return np.random.Generator(bitgen).random((count, AUG_PARAMS), dtype=np.float64).astype(np.float32)
