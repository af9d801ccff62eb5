"""The exported model, loaded once, and the images decoded for it.

Every image goes through ``hpcjobs.data.images.model_image`` (size and channels from
preprocessing.json's ``input_shape``, the image path from its ``image_path``, ``tf/1`` for
an export made before it was recorded): the very function ``hpcjobs prepare`` stores
training images with.  Decoding runs on a pool of ``infer.workers`` threads, rows
kept in order, about two batches ahead of the model, feeding a ``tf.data`` pipeline
(``from_generator``, prefetched, distributed over the replicas).  (Plain threads rather
than a ``tf.numpy_function`` map: the eager resize inside ``to_model_image`` ran about
1.5x slower on tf.data's own threads.)  The model holds its own normalisation; batches go
in as pixels 0..255.  The devices come from ``hpcjobs.distribute.inference_strategy``.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterator, Optional

import numpy as np

from ..data.images import LEGACY_PATH, ImageError, model_image
from ..digest import file_digest
from .inputs import Inputs


class Predictor:
    """The exported model, loaded once, and the preprocessing it was trained with."""

    def __init__(self, model_path: str, info=None, devices: Optional[list[str]] = None, unsafe: bool = False,
                 trust_code: bool = False):
        import tensorflow as tf

        from ..cluster import distribute
        from ..export.formats import locate, open_runner

        self.tf = tf
        # model.keras runs on every replica; a SavedModel, TFLite or ONNX file (``--model
        # EXPORT/model.tflite``) runs as it is, on the default device
        keras = locate(model_path)[0] == "keras"
        self.strategy = distribute.inference_strategy(info, devices) if keras else tf.distribute.get_strategy()
        with self.strategy.scope():
            self.runner = open_runner(model_path, unsafe=unsafe, trust_code=trust_code)  # ExportError before any work
        self.model, self.info, self.folder = self.runner.model, self.runner.info, self.runner.folder
        self.shape = tuple(int(d) for d in self.info["input_shape"])
        self.class_names = [str(c) for c in self.info["class_names"]]
        self.image_path = str(self.info.get("image_path", LEGACY_PATH))
        self.fingerprint = file_digest(self.runner.files)[:20]  # preprocessing.json, then the model's file(s)
        self._steps: dict[int, Callable] = {}

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def preprocess(self, raw) -> np.ndarray:
        """A raw image (a file or an array) as the model's input: the training
        preprocessing (uint8 H, W, C)."""
        h, w, c = self.shape
        img = model_image(raw, (h, w), c, self.image_path)
        if img.shape != self.shape:
            raise ValueError(f"preprocessed to shape {img.shape}, expected {self.shape}")
        return img

    def step(self, k: int) -> Callable:
        """The compiled call: a batch of uint8 images (distributed over the replicas) to
        per-replica (probabilities, top-k probabilities, top-k indices)."""
        if k not in self._steps:
            tf, call, strategy = self.tf, self.runner.tf_call, self.strategy

            def replica(x):
                p = call(x)
                top = tf.math.top_k(p, k=k)
                return p, top.values, top.indices

            self._steps[k] = tf.function(lambda x: strategy.run(replica, args=(x,)), reduce_retracing=True)
        return self._steps[k]

    def to_numpy(self, value) -> np.ndarray:
        """One output of ``step`` as one array: this process's replicas' rows, in order."""
        parts = self.strategy.experimental_local_results(value)
        return np.concatenate([t.numpy() for t in parts]) if len(parts) > 1 else parts[0].numpy()

    def batches(self, inputs: Inputs, lo: int, hi: int, *, batch_size: int, top_k: int, workers: int,
                errors: dict) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(probabilities, top-k probabilities, top-k indices) of rows lo..hi in order, one
        batch at a time.  A row that cannot be read is predicted on a blank image and its
        reason put in ``errors[row]`` before its batch is yielded."""
        tf = self.tf
        shape = self.shape

        def load(i: int) -> np.ndarray:
            try:
                return self.preprocess(inputs.load(i))
            except Exception as e:  # a bad input file must not stop the job
                errors[i] = e.reason if isinstance(e, ImageError) else f"{type(e).__name__}: {e}"
                return np.zeros(shape, np.uint8)

        ds = tf.data.Dataset.from_generator(
            lambda: _decoded_batches(load, lo, hi, batch_size, workers),
            output_signature=tf.TensorSpec((None, *shape), tf.uint8))
        options = tf.data.Options()
        options.autotune.enabled = False  # a fixed pipeline; no autotuner stall at teardown
        ds = ds.prefetch(1).with_options(options)
        step = self.step(min(top_k, len(self.class_names)))
        for batch in self.strategy.experimental_distribute_dataset(ds):
            yield tuple(self.to_numpy(v) for v in step(batch))


def _decoded_batches(load: Callable[[int], np.ndarray], lo: int, hi: int, batch_size: int,
                     workers: int) -> Iterator[np.ndarray]:
    """Rows lo..hi loaded by a pool of threads, in order, stacked into batches.  About two
    batches are in flight, so decoding runs ahead while the model predicts."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="hpcjobs-decode")
    try:
        window: deque = deque()
        ahead = 2 * batch_size + workers
        nxt = lo
        batch = []
        while nxt < hi or window:
            while nxt < hi and len(window) < ahead:
                window.append(pool.submit(load, nxt))
                nxt += 1
            batch.append(window.popleft().result())
            if len(batch) == batch_size or not window:
                yield np.stack(batch)
                batch = []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
