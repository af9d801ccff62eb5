"""Feeders: the training stream, sharding, augmentation and evaluation batches.

The order in which training samples are seen is a pure function of the seed and
the global sample position, so a feeder's position is just the step it is at:

* The training split is cut into segments (one segment for ``memory`` and ``disk``;
  for ``hybrid`` as many as it takes to fit the memory budget).  Every segment has the
  class mix of the whole split and, in the stratified store, spans a narrow row range.
* The stream visits segment 0 for ``epochs_per_segment`` passes, each a fresh
  permutation, then segment 1, and so on, cycling.
* Global batch k is stream positions [k*B, (k+1)*B); worker w of W takes the
  contiguous slice [k*B + w*B/W, k*B + (w+1)*B/W).  Over a pass every sample is
  seen once, by exactly one worker.
* Augmentation parameters come from a counter-based generator (Philox) keyed by the
  seed and advanced to the sample's stream position: the same sample at the same
  position gets the same augmentation, however the stream is sharded or resumed.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..config import AugmentConfig, parse_bytes
from .store import Prepared, Split

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
    """The sample stream over ``n`` training samples cut into ``segments``."""

    def __init__(self, n: int, seed: int, segments: list[np.ndarray] | None = None, epochs_per_segment: int = 1):
        if n < 1:
            raise ValueError("a plan needs at least one sample")
        self.n, self.seed, self.epochs_per_segment = n, seed, epochs_per_segment
        self.segments = segments if segments is not None else [np.arange(n)]
        self._sizes = [len(s) for s in self.segments]
        self._cycle = n * epochs_per_segment

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
        seg = self.segments[self.segment_of_pass(pass_number)]
        return seg[np.random.default_rng([self.seed, pass_number]).permutation(len(seg))]

    def indices(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices at stream positions [start, stop), and the segment of each."""
        idx, segs = [], []
        pos = start
        while pos < stop:
            p, seg, off = self.locate(pos)
            perm = self.permutation(p)
            take = min(stop - pos, len(perm) - off)
            idx.append(perm[off:off + take])
            segs.append(np.full(take, seg))
            pos += take
        if not idx:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(idx), np.concatenate(segs)

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


def augment_params(seed: int, start: int, count: int) -> np.ndarray:
    """Uniform [0,1) numbers, AUG_PARAMS per sample, for stream positions [start, start+count)."""
    bitgen = np.random.Philox(key=seed).advance(start * AUG_PARAMS // 4)
    return np.random.Generator(bitgen).random((count, AUG_PARAMS), dtype=np.float64).astype(np.float32)


# --------------------------------------------------------------------------- batch sources
class _Rows:
    """Reads rows of a split by index, from RAM, from disk per batch, or by segments."""

    def __init__(self, split: Split, feed: str, plan: Plan):
        self.split, self.feed, self.plan = split, feed, plan
        self.labels = np.asarray(split.labels)
        if feed == "memory":
            images = split.images
            self.images = images if isinstance(images, np.ndarray) else images[...]
        else:
            self.images = split.images
        self._cache: dict[int, tuple[int, np.ndarray]] = {}
        self._pending: dict[int, object] = {}
        self._pool = ThreadPoolExecutor(1) if feed == "hybrid" else None
        self._lock = threading.Lock()

    def _read_segment(self, seg: int) -> tuple[int, np.ndarray]:
        rows = self.plan.segments[seg]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        return lo, np.asarray(self.split.images[lo:hi])  # one sequential read

    def _segment(self, seg: int) -> tuple[int, np.ndarray]:
        with self._lock:
            if seg in self._cache:
                return self._cache[seg]
            fut = self._pending.pop(seg, None)
        arr = fut.result() if fut is not None else self._read_segment(seg)
        with self._lock:
            self._cache[seg] = arr
        return arr

    def _prefetch(self, seg: int):
        with self._lock:
            if seg in self._cache or seg in self._pending:
                return
            self._pending[seg] = self._pool.submit(self._read_segment, seg)

    def get(self, idx: np.ndarray, segs: np.ndarray) -> np.ndarray:
        if self.feed == "memory":
            return self.images[idx]
        if self.feed == "disk":
            uniq, inverse = np.unique(idx, return_inverse=True)  # h5py wants increasing indices
            return self.images[uniq][inverse]
        # hybrid: segments in memory, the next one read in the background
        needed = np.unique(segs)
        with self._lock:
            for s in list(self._cache):
                if s not in needed:
                    del self._cache[s]
        out = None
        for s in needed:
            lo, arr = self._segment(int(s))
            mask = segs == s
            if out is None:
                out = np.empty((len(idx), *arr.shape[1:]), arr.dtype)
            out[mask] = arr[idx[mask] - lo]
        nxt = (int(needed[-1]) + 1) % len(self.plan.segments)
        if nxt not in needed:
            self._prefetch(nxt)
        return out


def segment_size(split: Split, budget_bytes: int) -> int:
    """Samples per hybrid segment: two segments (current and next) fit the budget, with
    some room for the few extra rows a segment's read range spans."""
    per_sample = max(1, split.nbytes // max(len(split), 1))
    return max(1, int(budget_bytes / (2.2 * per_sample)))


def choose_feed(feed: str, split: Split, budget_bytes: int) -> str:
    if feed != "auto":
        return feed
    return "memory" if split.nbytes <= budget_bytes else "hybrid"


# --------------------------------------------------------------------------- tf.data
class Feeder:
    """Builds tf.data pipelines for one worker (an input pipeline) of a run."""

    def __init__(self, data: Prepared, *, feed: str = "auto", memory_budget: str | int = "4GiB",
                 epochs_per_segment: int = 1, seed: int = 0, augment: AugmentConfig | None = None,
                 global_batch: int = 128, worker: int = 0, workers: int = 1, local_replicas: int = 1):
        if global_batch % (workers * local_replicas):
            raise ValueError(f"training.batch_size {global_batch} must be divisible by the "
                             f"{workers * local_replicas} replicas")
        self.data = data
        train = data.splits["train"]
        budget = parse_bytes(memory_budget)
        self.feed = choose_feed(feed, train, budget)
        if self.feed == "hybrid":
            count = math.ceil(len(train) / segment_size(train, budget))
            self.plan = Plan(len(train), seed, stratified_segments(train.labels, count), epochs_per_segment)
        else:
            self.plan = Plan(len(train), seed)
        self.seed = seed
        self.augment = augment or AugmentConfig()
        self.global_batch, self.worker, self.workers = global_batch, worker, workers
        self.local_replicas = local_replicas
        self.rows = _Rows(train, self.feed, self.plan)

    @property
    def steps_per_pass(self) -> int:
        return max(1, len(self.data.splits["train"]) // self.global_batch)

    # -- training -----------------------------------------------------------------------
    def batches(self, start_step: int = 0):
        """numpy (images, labels, aug_params) per replica of this worker, from start_step on."""
        per_replica = self.global_batch // (self.workers * self.local_replicas)
        step = start_step
        while True:
            a, b = self.plan.worker_slice(step, self.global_batch, self.worker, self.workers)
            idx, segs = self.plan.indices(a, b)
            images = self.rows.get(idx, segs)
            labels = self.rows.labels[idx]
            params = augment_params(self.seed, a, b - a) if self.augment.enabled else None
            for r in range(self.local_replicas):
                sl = slice(r * per_replica, (r + 1) * per_replica)
                yield images[sl], labels[sl], (params[sl] if params is not None else
                                                np.zeros((per_replica, AUG_PARAMS), np.float32))
            step += 1

    def train_dataset(self, start_step: int = 0):
        import tensorflow as tf

        h, w, c = self.data.image_shape
        sig = (tf.TensorSpec((None, h, w, c), tf.uint8), tf.TensorSpec((None,), tf.int32),
               tf.TensorSpec((None, AUG_PARAMS), tf.float32))
        ds = tf.data.Dataset.from_generator(lambda: self.batches(start_step), output_signature=sig)
        aug = self.augment

        def prep(x, y, p):
            x = tf.cast(x, tf.float32)
            if aug.enabled:
                x = apply_augment(x, p, aug)
            return x, y

        ds = ds.map(prep, num_parallel_calls=2, deterministic=True)
        return ds.prefetch(4).with_options(_options())

    # -- evaluation ---------------------------------------------------------------------
    def eval_dataset(self, split: str, batch_size: int | None = None):
        """This worker's share of a split, padded so every worker runs the same number of
        batches; yields (images, labels, weights) with weight 0 on padding."""
        import tensorflow as tf

        s = self.data.splits[split]
        per_replica = (batch_size or self.global_batch) // (self.workers * self.local_replicas)
        per_replica = max(per_replica, 1)
        n = len(s)
        total_replicas = self.workers * self.local_replicas
        steps = math.ceil(n / (per_replica * total_replicas)) if n else 0
        h, w, c = self.data.image_shape

        def gen():
            for k in range(steps):
                for r in range(self.local_replicas):
                    replica = self.worker * self.local_replicas + r
                    a = (k * total_replicas + replica) * per_replica
                    lo, hi = min(a, n), min(a + per_replica, n)
                    x = np.zeros((per_replica, h, w, c), np.uint8)
                    y = np.zeros(per_replica, np.int32)
                    wt = np.zeros(per_replica, np.float32)
                    if hi > lo:
                        x[:hi - lo] = s.images[lo:hi]
                        y[:hi - lo] = s.labels[lo:hi]
                        wt[:hi - lo] = 1.0
                    yield x, y, wt

        sig = (tf.TensorSpec((per_replica, h, w, c), tf.uint8), tf.TensorSpec((per_replica,), tf.int32),
               tf.TensorSpec((per_replica,), tf.float32))
        ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
        ds = ds.map(lambda x, y, wt: (tf.cast(x, tf.float32), y, wt))
        return ds.prefetch(2).with_options(_options())


def _options():
    import tensorflow as tf

    opts = tf.data.Options()
    # The autotuner can stall iterator teardown by ~20 s on this TF (see DESIGN.md);
    # the pipelines above use fixed parallelism.
    opts.autotune.enabled = False
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return opts


def apply_augment(x, params, aug: AugmentConfig):
    """Augment a float batch (N, H, W, C) in 0..255 with per-sample params in [0,1).

    Deterministic given ``params``: flips, rotation, shift and zoom as one projective
    transform (reflect fill), then brightness and contrast.
    """
    import tensorflow as tf

    u = params * 2.0 - 1.0  # [-1, 1)
    if aug.flip_horizontal:
        x = tf.where(params[:, 0, None, None, None] < 0.5, tf.reverse(x, axis=[2]), x)
    if aug.flip_vertical:
        x = tf.where(params[:, 1, None, None, None] < 0.5, tf.reverse(x, axis=[1]), x)
    if aug.rotation or aug.shift or aug.zoom:
        shape = tf.shape(x)
        h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        angle = u[:, 2] * (aug.rotation * math.pi / 180.0)
        scale = 1.0 + u[:, 3] * aug.zoom
        tx, ty = u[:, 4] * aug.shift * w, u[:, 5] * aug.shift * h
        cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        # output -> input mapping: rotate and scale about the centre, then shift
        a0, a1 = cos, -sin
        b0, b1 = sin, cos
        a2 = cx - a0 * cx - a1 * cy - tx
        b2 = cy - b0 * cx - b1 * cy - ty
        zeros = tf.zeros_like(a0)
        transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        x = tf.raw_ops.ImageProjectiveTransformV3(
            images=x, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
            interpolation="BILINEAR", fill_mode="REFLECT")
    if aug.brightness:
        x = x + (u[:, 6] * aug.brightness * 255.0)[:, None, None, None]
    if aug.contrast:
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = (x - mean) * (1.0 + u[:, 7] * aug.contrast)[:, None, None, None] + mean
    return tf.clip_by_value(x, 0.0, 255.0)
