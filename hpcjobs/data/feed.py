"""Feeders: the training pipeline, sharding, augmentation and evaluation batches.

The order of the stream, its sharding over workers and the augmentation parameters are
pure functions of the seed and the position (``order.py``): a feeder's position is just
the step it is at, so a run resumes exactly at any step and every worker sees its own
share once.

The training pipeline runs Python once per group of up to ~8,192 samples that share
resident rows, never per batch: a generator yields the rows held in memory (the whole
split for ``memory``, a segment for ``hybrid``, a window of blocks for ``disk``; as a
tensor without a copy, and only when they change) with the positions in them of the
next per-replica batches.  tf.data does the rest: gather, cast and augment in ``cpus``
parallel calls, then prefetch (onto ``device`` when one is given).

Resident rows (``rows.py``): a hybrid segment of a store written by ``prepare`` is a
read-only mapping of its rows in the file, no copy (the page cache holds it; the next
segment's pages are asked for ahead).  Other segments and disk windows are read with
one contiguous read per block into reused buffers, the next in a background thread
while the current one is used.  Either way the current set and the next are held (and
the previous one, until the run of batches that starts by straddling the change is
served), each under half the memory budget.
``batches()`` is the same stream in numpy, read one batch at a time: the reference.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..cluster.info import cpu_count
from ..config import AugmentConfig, parse_bytes
from ..errors import UserError
from .order import AUG_PARAMS, BlockPlan, Plan, augment_params, stratified_segments
from .rows import RowReader, take_rows
from .store import Prepared, Split

__all__ = ["AUG_PARAMS", "BlockPlan", "Feeder", "Plan", "apply_augment", "augment_params", "choose_feed",
           "measure_feed", "segment_size", "stratified_segments"]

BLOCK_ROWS = 1024  # the largest disk block
GROUP_SAMPLES = 8192  # global samples per run of the training generator


class BatchError(UserError, ValueError):
    """A global batch the training split cannot fill, or the replicas cannot share (exit code 2)."""


# --------------------------------------------------------------------------- resident rows
class _Set:
    """Resident rows: their images, labels, and where a split row is among them."""

    def __init__(self, split: Split, reader: RowReader, ranges: list[tuple[int, int]], mapped: bool = False,
                 ask=None):
        """``mapped``: a single range may be a view of the mapped store file, whose pages
        ``ask`` (a function of the range; ``reader.ask`` by default) has the kernel read ahead."""
        images = split.images
        if ranges == [(0, len(split))] and isinstance(images, np.ndarray) and images.flags.c_contiguous \
                and images.ctypes.data % 64 == 0:
            self.images = images  # in memory already, and TensorFlow takes it as it is
        else:
            view = reader.view(*ranges[0]) if mapped and len(ranges) == 1 else None
            if view is not None:
                (ask or reader.ask)(*ranges[0])
            self.images = view if view is not None else reader.read(ranges)
        self.labels = np.concatenate([split.labels[lo:hi] for lo, hi in ranges]).astype(np.int32)
        self.starts = np.array([lo for lo, _ in ranges])
        self.offsets = np.cumsum([0] + [hi - lo for lo, hi in ranges])[:-1]

    def local(self, rows: np.ndarray) -> np.ndarray:
        if len(self.starts) == 1:
            return (rows - self.starts[0]).astype(np.int32)
        j = np.searchsorted(self.starts, rows, side="right") - 1
        return (self.offsets[j] + rows - self.starts[j]).astype(np.int32)


class _Resident:
    """The resident rows of one training stream: the set in use and the next one, which is
    read in the background.  A plan with a single set shares it through the feeder."""

    def __init__(self, feeder: Feeder):
        self.feeder, self.plan = feeder, feeder.plan
        self.sets: dict[int, _Set | Future] = {}
        self.last: int | None = None  # key of the rows last handed out
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hpcjobs-read")

    def _load(self, key: int) -> _Set:
        if self.plan.single:
            return self.feeder.whole()
        return _Set(self.feeder.train, self.feeder.reader, self.plan.ranges(key), self.feeder.feed == "hybrid",
                    ask=self._ask)

    def _ask(self, lo: int, hi: int):
        """The read-ahead of a mapped set's pages, on the reading thread: a posix_fadvise over
        tens of MB walks the page cache (and may wait to queue reads), off the generator's path."""
        self.pool.submit(self.feeder.reader.ask, lo, hi)

    def _use(self, key: int):
        """The set of ``key`` and its arrays if they were not the last handed out; starts
        reading the next set and forgets any other."""
        got, nxt = self.sets.get(key), self.plan.next_key(key)
        s = self._load(key) if got is None else got.result() if isinstance(got, Future) else got
        self.sets = {k: v for k, v in self.sets.items() if k == nxt}
        self.sets[key] = s
        if nxt not in self.sets:  # a mapped set costs nothing to open: no thread for it
            self.sets[nxt] = self._load(nxt) if self.feeder.maps(nxt) else self.pool.submit(self._load, nxt)
        fresh, self.last = self.last != key, key
        return s, ((s.images, s.labels) if fresh else None)

    def groups(self, rows: np.ndarray, keys: np.ndarray):
        """Runs of per-replica batches (rows) that one set serves, the first of them perhaps
        straddling from the previous set: (arrays when new, keep the previous set, positions
        in [current; previous], slice of the rows)."""
        same = (keys == keys[:, :1]).all(axis=1)
        later = keys[:, -1]  # the set a run is served from: a straddling row's later one
        cuts = np.flatnonzero((later[1:] != later[:-1]) | ~same[1:]) + 1
        for lo, hi in zip([0, *cuts], [*cuts, len(rows)]):
            order = keys[lo][np.sort(np.unique(keys[lo], return_index=True)[1])]
            if len(order) > 2:  # sets smaller than a batch: its own rows, gathered
                yield self._gathered(rows[lo], keys[lo]), 0, np.arange(rows.shape[1], dtype=np.int32)[None], \
                    slice(lo, lo + 1)
                lo += 1
                if lo == hi:
                    continue
            elif len(order) == 2:
                first, arrays = self._use(int(order[0]))
                if arrays is not None:  # the earlier set goes in ahead, for no batch
                    yield arrays, 0, np.zeros((0, rows.shape[1]), np.int32), slice(lo, lo)
            s, arrays = self._use(int(later[lo]))
            local = s.local(rows[lo:hi])
            if len(order) == 2:
                early = keys[lo] != order[1]
                local[0, early] = len(s.images) + first.local(rows[lo, early])
            yield arrays, int(len(order) == 2), local, slice(lo, hi)

    def _gathered(self, rows: np.ndarray, keys: np.ndarray):
        out, labels = np.empty((len(rows), *self.feeder.data.image_shape), np.uint8), np.empty(len(rows), np.int32)
        for key in np.unique(keys):
            s, m = self._use(int(key))[0], keys == key
            loc = s.local(rows[m])
            out[m], labels[m] = s.images[loc], s.labels[loc]
        self.last = None
        return out, labels

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.sets = {}


def segment_size(split: Split, budget_bytes: int) -> int:
    """Samples per hybrid segment (or disk window): two of them (current and next) fit the
    budget, with some room for the few extra rows a segment's read range spans."""
    per_sample = max(1, split.nbytes // max(len(split), 1))
    return max(1, int(budget_bytes / (2.2 * per_sample)))


def choose_feed(feed: str, split: Split, budget_bytes: int) -> str:
    if feed != "auto":
        return feed
    return "memory" if split.nbytes <= budget_bytes else "hybrid"


# --------------------------------------------------------------------------- tf.data
class Feeder:
    """Builds tf.data pipelines for one worker (an input pipeline) of a run.  ``cpus`` sets
    the parallel calls (``ClusterInfo.cpus``; this process's CPUs by default); ``device``
    is where training batches are prefetched to: a device name, ``"gpu"`` for the first
    visible GPU if there is one, or None for host memory.  Only a run whose dataset
    tf.distribute does not distribute needs it: tf.distribute prefetches to its replicas'
    devices itself."""

    def __init__(self, data: Prepared, *, feed: str = "auto", memory_budget: str | int = "4GiB",
                 epochs_per_segment: int = 1, seed: int = 0, augment: AugmentConfig | None = None,
                 global_batch: int = 128, worker: int = 0, workers: int = 1, local_replicas: int = 1,
                 cpus: int | None = None, device: str | None = None):
        if global_batch % (workers * local_replicas):
            raise BatchError(f"training.batch_size {global_batch} must be divisible by the "
                             f"{workers * local_replicas} replicas")
        self.data = data
        self.train = train = data.splits["train"]
        if global_batch > len(train):  # every batch would repeat the split, and memory grows with it
            raise BatchError(f"training.batch_size: {global_batch:,} is larger than the training split "
                             f"({len(train):,} samples); use at most {len(train):,}")
        budget = parse_bytes(memory_budget)
        self.feed = choose_feed(feed, train, budget)
        rows = segment_size(train, budget)
        if self.feed == "hybrid":
            count = math.ceil(len(train) / rows)
            self.plan = Plan(len(train), seed, stratified_segments(train.labels, count), epochs_per_segment)
        elif self.feed == "disk":
            block = max(1, min(BLOCK_ROWS, rows // 8))
            self.plan = BlockPlan(len(train), seed, block, max(1, rows // block))
        else:
            self.plan = Plan(len(train), seed)
        self.seed = seed
        self.augment = augment or AugmentConfig()
        self.global_batch, self.worker, self.workers = global_batch, worker, workers
        self.local_replicas = local_replicas
        self.per_replica = global_batch // (workers * local_replicas)
        self.cpus, self.device = cpus or cpu_count(), device
        self.reader = RowReader(train.images, data.path)
        self._whole: _Set | None = None
        self._ahead: bool | None = None

    @property
    def steps_per_pass(self) -> int:
        return max(1, len(self.train) // self.global_batch)

    @property
    def ahead(self) -> bool:
        """Whether the generator may run a group ahead: the resident rows it holds then stay
        the whole split, or views of the mapped file (a read set would be one more buffer)."""
        if self._ahead is None:
            self._ahead = self.feed == "memory" or self.plan.single or (self.feed == "hybrid" and self.maps(0))
        return self._ahead

    def maps(self, key: int) -> bool:
        """Whether the resident rows of ``key`` are a view of the mapped store file."""
        ranges = self.plan.ranges(key)
        return self.feed == "hybrid" and not self.plan.single and len(ranges) == 1 and \
            self.reader.view(*ranges[0]) is not None

    def whole(self) -> _Set:
        """The whole training split in memory (read once, shared by every stream)."""
        if self._whole is None:
            self._whole = _Set(self.train, self.reader, [(0, len(self.train))])
        return self._whole

    # -- training -----------------------------------------------------------------------
    def batches(self, start_step: int = 0):
        """numpy (images, labels, aug_params) per replica of this worker, from start_step on,
        read one batch at a time: the reference ``train_dataset`` is tested against."""
        r, step = self.per_replica, start_step
        while True:
            a, b = self.plan.worker_slice(step, self.global_batch, self.worker, self.workers)
            idx, _ = self.plan.indices(a, b)
            images, labels = take_rows(self.train.images, idx), self.train.labels[idx]
            params = augment_params(self.seed, a, b - a) if self.augment.enabled else \
                np.zeros((b - a, AUG_PARAMS), np.float32)
            for k in range(self.local_replicas):
                sl = slice(k * r, (k + 1) * r)
                yield images[sl], labels[sl], params[sl]
            step += 1

    def _rows(self, step: int, steps: int):
        """This worker's (per-replica batch, sample) rows, keys and augmentation parameters
        for ``steps`` steps from ``step``: computed for all workers at once, then sliced."""
        B, W = self.global_batch, self.workers
        a, b = step * B, (step + steps) * B
        idx, keys = self.plan.indices(a, b)
        params = augment_params(self.seed, a, b - a) if self.augment.enabled else np.zeros((b - a, 0), np.float32)

        def mine(v):
            v = v.reshape(steps, W, B // W, *v.shape[1:])[:, self.worker]
            return v.reshape(steps * self.local_replicas, self.per_replica, *v.shape[2:])

        return mine(idx), mine(keys), mine(params)

    def _groups(self, start_step: int):
        """What the training pipeline is fed: see ``_Resident.groups``; arrays of 0 rows
        stand for the current ones."""
        h, w, c = self.data.image_shape
        none = (np.zeros((0, h, w, c), np.uint8), np.zeros(0, np.int32))
        steps = max(1, GROUP_SAMPLES // self.global_batch)
        resident = _Resident(self)
        try:
            for step in range(start_step, 2**62, steps):
                rows, keys, params = self._rows(step, steps)
                for arrays, keep, local, sl in resident.groups(rows, keys):
                    yield (*(none if arrays is None else arrays), np.int32(keep), local, params[sl])
        finally:
            resident.close()

    def train_dataset(self, start_step: int = 0, to_device: bool = True):
        """This worker's per-replica training batches (float images, labels) from start_step;
        ``to_device`` False leaves out the prefetch onto the device (so more may follow)."""
        import tensorflow as tf

        h, w, c = self.data.image_shape
        r, k = self.per_replica, AUG_PARAMS if self.augment.enabled else 0
        sig = (tf.TensorSpec((None, h, w, c), tf.uint8), tf.TensorSpec((None,), tf.int32),
               tf.TensorSpec((), tf.int32), tf.TensorSpec((None, r), tf.int32), tf.TensorSpec((None, r, k), tf.float32))
        ds = tf.data.Dataset.from_generator(lambda: self._groups(start_step), output_signature=sig)
        empty = (tf.zeros((0, h, w, c), tf.uint8), tf.zeros((0,), tf.int32))

        def hold(held, group):  # (current, previous) resident rows, until new ones come
            images, labels, keep, rows, params = group
            new = tf.shape(images)[0] > 0
            cur = tf.cond(new, lambda: (images, labels), lambda: held[:2])
            prev = tf.cond(keep > 0, lambda: tf.cond(new, lambda: held[:2], lambda: held[2:]), lambda: empty)
            return (*cur, *prev), (*cur, *prev, rows, params)

        if self.ahead:
            # the generator runs a group ahead of the batches, so a change of resident rows (the
            # generator's numpy and the hand-over to TensorFlow) overlaps the batches before it
            # instead of stalling the parallel calls; only where that holds no more memory:
            # one set for all, or sets that are views of the mapped store
            ds = ds.prefetch(1)
        ds = ds.scan((*empty, *empty), hold)
        ds = ds.flat_map(lambda *g: tf.data.Dataset.zip(tf.data.Dataset.from_tensors(g[:4]).repeat(),
                                                        tf.data.Dataset.from_tensor_slices(g[4:])))
        ds = ds.map(self._prep, num_parallel_calls=self.cpus, deterministic=True).prefetch(2)
        device = self.device
        if device == "gpu":  # the first visible GPU, if there is one
            device = next((d.name for d in tf.config.list_logical_devices("GPU")), None)
        if device and to_device:
            ds = ds.apply(tf.data.experimental.prefetch_to_device(device, 2))
        return ds.with_options(_options(self.cpus))

    def _prep(self, held, batch):
        """One batch: rows ``i`` of [current; previous] resident rows, as floats, augmented."""
        import tensorflow as tf

        (cur, cur_labels, prev, prev_labels), (i, p) = held, batch
        n = tf.shape(cur)[0]

        def straddling():  # the batch's first samples are the previous set's, the rest the current's
            m = tf.reduce_sum(tf.cast(i >= n, tf.int32))
            a, b = i[:m] - n, i[m:]
            return (tf.concat([tf.gather(prev, a), tf.gather(cur, b)], 0),
                    tf.concat([tf.gather(prev_labels, a), tf.gather(cur_labels, b)], 0))

        x, y = tf.cond(tf.reduce_all(i < n), lambda: (tf.gather(cur, i), tf.gather(cur_labels, i)), straddling)
        x = tf.cast(x, tf.float32)
        return (apply_augment(x, p, self.augment) if self.augment.enabled else x), y

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


def measure_feed(feeder: Feeder, seconds: float = 1.0, warmup: int = 3, least: int = 5) -> float:
    """Samples/s of a fresh training pipeline of ``feeder`` (this worker's share), timed after
    ``warmup`` batches for about ``seconds`` (at least ``least`` batches).  The pipeline is
    its own, from step 0: a training iterator is not touched, and the stream is a pure
    function of the position, so nothing a run trains on changes.  The one measurement of
    a store's read rate through the feeder (the feed check at a session's start; doctor)."""
    import time

    it = iter(feeder.train_dataset(0, to_device=False))
    try:
        for _ in range(warmup):
            next(it)
        n, k, t = 0, 0, time.perf_counter()
        while k < least or time.perf_counter() - t < seconds:
            x, _ = next(it)
            n, k = n + int(x.shape[0]), k + 1
        return n / (time.perf_counter() - t)
    finally:
        del it


def _options(cpus: int | None = None):
    import tensorflow as tf

    opts = tf.data.Options()
    # The autotuner can stall iterator teardown by ~20 s on this TF (see DESIGN.md);
    # the pipelines above use fixed parallelism.
    opts.autotune.enabled = False
    if cpus:
        opts.threading.private_threadpool_size = cpus
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
