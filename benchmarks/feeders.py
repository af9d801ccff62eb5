"""Feeder throughput: memory vs hybrid vs disk vs a per-file decoding baseline, and
training throughput with the hybrid feeder vs data already in memory.

Builds a synthetic store 4x larger than the memory budget it sets (random uint8 images
with class-dependent means, so it is cheap to make but not constant), then, in one run:

* samples/s of each feeder's tf.data pipeline (batches of 128, many segment changes);
* samples/s of `keras.utils.image_dataset_from_directory` on PNG files (one decode per
  sample: the naive baseline);
* training images/s of the seed convnet fed by the hybrid feeder vs the memory feeder,
  alternating rounds so noise hits both alike.

    python benchmarks/feeders.py [--size 48] [--budget 64MiB] [--files 3000]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_store(path, n, size, classes=10, seed=0):
    import numpy as np

    from hpcjobs.data.sources import Samples
    from hpcjobs.data.store import prepare

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    # an array source through the real prepare (split, stratified order, statistics, store)
    images = np.empty((n, size, size, 3), np.uint8)
    for start in range(0, n, 4096):
        stop = min(start + 4096, n)
        base = (labels[start:stop, None, None, None] * 20).astype(np.int16)
        images[start:stop] = np.clip(base + rng.integers(0, 60, (stop - start, size, size, 3)), 0, 255)
    samples = Samples(labels, [str(c) for c in range(classes)], "synthetic", arrays=images)
    return prepare(samples, None, 3, 0.02, 0.02, seed, out_path=path)


def feeder_rate(feeder, batches):
    it = iter(feeder.train_dataset())
    for _ in range(5):
        next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _ = next(it)
        n += int(x.shape[0])
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--budget", default="64MiB")
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import tensorflow as tf
    from PIL import Image

    from hpcjobs import config
    from hpcjobs.config import parse_bytes
    from hpcjobs.data.feed import Feeder
    from hpcjobs.train import Trainer

    budget = parse_bytes(args.budget)
    per_image = args.size * args.size * 3
    n = int(4 * budget / per_image / 0.96)  # the training split alone is 4x the budget
    work = tempfile.mkdtemp(prefix="hpcjobs-feeders-")
    try:
        t = time.perf_counter()
        data = make_store(os.path.join(work, "store.h5"), n, args.size)
        train = data.splits["train"]
        print(f"store: {len(train)} training images {data.image_shape}, {train.nbytes / 2**20:.0f} MiB "
              f"= {train.nbytes / budget:.1f} x the {args.budget} budget (built in {time.perf_counter() - t:.1f}s)")

        feeders = {feed: Feeder(data, feed=feed, memory_budget=budget, epochs_per_segment=2,
                                global_batch=args.batch, seed=1) for feed in ("memory", "hybrid", "disk")}
        print(f"hybrid: {len(feeders['hybrid'].plan.segments)} segments of ~{len(feeders['hybrid'].plan.segments[0])}")
        batches = 2 * len(train) // args.batch  # a full cycle: every segment, twice
        rates = {feed: [] for feed in feeders}
        for _ in range(args.rounds):
            for feed, f in feeders.items():
                rates[feed].append(feeder_rate(f, batches if feed != "disk" else batches // 8))

        # naive baseline: one PNG decode per sample through image_dataset_from_directory
        folder = os.path.join(work, "png")
        for i in range(args.files):
            d = os.path.join(folder, str(int(train.labels[i])))
            os.makedirs(d, exist_ok=True)
            Image.fromarray(train.images[i]).save(os.path.join(d, f"{i}.png"))
        ds = tf.keras.utils.image_dataset_from_directory(folder, image_size=(args.size, args.size),
                                                         batch_size=args.batch, shuffle=True, seed=0,
                                                         verbose=False)
        base = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            k = sum(int(x.shape[0]) for x, _ in ds)
            base.append(k / (time.perf_counter() - t))

        med = {feed: statistics.median(v) for feed, v in rates.items()}
        med["per-file PNG (image_dataset_from_directory)"] = statistics.median(base)
        for k, v in med.items():
            print(f"{k:>45}: {v:10.0f} samples/s")
        print(f"ratio hybrid / memory: {med['hybrid'] / med['memory']:.3f}   (target >= 0.9)")
        print(f"ratio hybrid / per-file baseline: "
              f"{med['hybrid'] / med['per-file PNG (image_dataset_from_directory)']:.1f}   (target >= 5)")
        print(f"ratio disk / memory: {med['disk'] / med['memory']:.3f}")

        # training throughput: hybrid vs memory, same model and steps, alternating rounds
        trainers = {}
        for feed in ("memory", "hybrid"):
            cfg = config.from_dict({"name": "bench", "data": {"feed": feed, "memory_budget": args.budget,
                                                              "epochs_per_segment": 2},
                                    "training": {"batch_size": args.batch, "steps_per_call": 10}})
            tr = Trainer(cfg, os.path.join(work, f"run-{feed}"), data=data, verbose=False)
            it = tr.train_iterator()
            tr.steps(it, 10)
            trainers[feed] = (tr, it)
        train_rates = {feed: [] for feed in trainers}
        for _ in range(args.rounds):
            for feed, (tr, it) in trainers.items():
                t = time.perf_counter()
                for _ in range(args.train_steps // 10):
                    tr.steps(it, 10)
                train_rates[feed].append(args.train_steps * args.batch / (time.perf_counter() - t))
        tm = {feed: statistics.median(v) for feed, v in train_rates.items()}
        for feed, v in tm.items():
            print(f"training, {feed:>6} feeder: {v:8.0f} img/s  (rounds: {', '.join(f'{r:.0f}' for r in train_rates[feed])})")
        print(f"ratio training hybrid / memory: {tm['hybrid'] / tm['memory']:.3f}   (target >= 0.98)")
        data.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
