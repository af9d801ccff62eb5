"""Training throughput: hpcjobs' compiled loop vs Keras model.fit, side by side.

Same model (the seed convnet), same batch size, same optimizer, same in-memory data
(Fashion-MNIST from Debian's dataset-fashion-mnist if installed, else digits), one
process.  Each contender first runs warm-up steps (tracing), then timed rounds of
``--steps`` steps, alternating, so machine noise hits both alike.  Prints images/s
and the ratio ours / fit.

    python benchmarks/loop_vs_fit.py [--steps 150] [--rounds 3] [--batch 128]
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()

    import keras
    import tensorflow as tf

    from hpcjobs import config
    from hpcjobs.data import load_data
    from hpcjobs.train import Trainer, make_optimizer
    from hpcjobs.models.build import build

    source = "fashion-mnist" if os.path.isdir("/usr/share/datasets/fashion-mnist") else "digits"
    cfg = config.from_dict({"name": "bench", "data": {"source": source, "feed": "memory"},
                            "training": {"batch_size": args.batch}})
    data = load_data(cfg)
    train = data.splits["train"]
    print(f"data: {source}, {len(train)} training images {data.image_shape}, batch {args.batch}")

    # --- model.fit on from_tensor_slices -------------------------------------------------
    keras.utils.set_random_seed(0)
    fit_model = build(cfg.model, data.image_shape, data.num_classes, data.mean, data.std)
    fit_model.compile(optimizer=make_optimizer(cfg.optimizer, cfg.optimizer.learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = train.images.astype("float32")
    ds = (tf.data.Dataset.from_tensor_slices((x, train.labels)).shuffle(len(x), seed=0)
          .batch(args.batch, drop_remainder=True).repeat().prefetch(tf.data.AUTOTUNE))
    fit_model.fit(ds, epochs=1, steps_per_epoch=20, verbose=0)

    def fit_round():
        t = time.perf_counter()
        fit_model.fit(ds, epochs=1, steps_per_epoch=args.steps, verbose=0)
        return args.steps * args.batch / (time.perf_counter() - t)

    # --- our loop: the Trainer's compiled multi-step call over the memory feeder ---------
    ours = {}
    for spc in (1, 10):
        c = config.from_dict({"name": "bench", "data": {"source": source, "feed": "memory"},
                              "training": {"batch_size": args.batch, "steps_per_call": spc}})
        t = Trainer(c, f"/tmp/hpcjobs-bench-{os.getpid()}", data=data, verbose=False)
        it = t.train_iterator()
        for _ in range(1 + 20 // spc):
            t.steps(it, spc)

        def our_round(t=t, it=it, spc=spc):
            start = time.perf_counter()
            for _ in range(args.steps // spc):
                t.steps(it, spc)
            return (args.steps // spc) * spc * args.batch / (time.perf_counter() - start)

        ours[spc] = our_round

    results = {"fit": [], "ours, 1 step/call": [], "ours, 10 steps/call": []}
    for _ in range(args.rounds):
        results["fit"].append(fit_round())
        results["ours, 1 step/call"].append(ours[1]())
        results["ours, 10 steps/call"].append(ours[10]())
    med = {k: statistics.median(v) for k, v in results.items()}
    for k, v in med.items():
        print(f"{k:>22}: {v:8.0f} img/s   (rounds: {', '.join(f'{r:.0f}' for r in results[k])})")
    for k in ("ours, 1 step/call", "ours, 10 steps/call"):
        print(f"ratio {k} / fit: {med[k] / med['fit']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
