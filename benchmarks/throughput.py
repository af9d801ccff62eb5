"""Training throughput of hpcjobs' compiled loop: precision, XLA, replicas, the feeder.

Runs unchanged on a CPU machine and on a GPU node.  Each contender is one child
process (a precision policy and logical devices are process-wide), which builds the
Trainer from the same config plus its overrides, runs warm-up steps (tracing and XLA
compilation), then ``--rounds`` timed rounds of ``--steps`` steps through the real
compiled call.  Rounds of all contenders alternate, so machine noise hits them alike.

    python benchmarks/throughput.py [--steps 100] [--rounds 3] [--batch 128] [--model seed|resnet50]

It prints img/s (median round) and the ratios:
    mixed precision / float32 (mixed_float16 on GPUs, mixed_bfloat16 on CPUs)
    XLA on / off
    all local replicas / one replica (every GPU mirrored; on a CPU, 2 logical devices)
    the feeder alone (its img/s and its headroom over the float32 train step)
On a CPU it then trains the quickstart with mixed_bfloat16 and prints its test
accuracy (the issue's check: at least 0.95).

``--model resnet50`` is the reference setup of the README (ResNet-50 at 224x224 on
synthetic data, batch 256 per GPU with mixed_float16 on a V100 node).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def base_config(model: str, batch: int) -> dict:
    if model == "resnet50":  # synthetic ImageNet-sized data: the input pipeline is not the subject
        return {"name": "bench", "data": {"source": "synthetic-224", "feed": "memory", "channels": 3},
                "model": {"arch": "ResNet50"}, "training": {"batch_size": batch}}
    source = "fashion-mnist" if os.path.isdir("/usr/share/datasets/fashion-mnist") else "digits"
    return {"name": "bench", "data": {"source": source, "feed": "memory"}, "training": {"batch_size": batch}}


def synthetic_data(cfg):
    """Random 224x224x3 images in 1000 classes (a ResNet-50 reference run needs no data)."""
    import numpy as np

    from hpcjobs.data.store import Prepared, Split

    rng = np.random.default_rng(0)
    n = 2048
    images = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, n).astype(np.int32)
    split = Split(images, labels, np.arange(n))
    empty = Split(images[:0], labels[:0], np.arange(0))
    return Prepared({"train": split, "val": empty, "test": empty}, [str(i) for i in range(1000)],
                    np.full(3, 127.0, np.float32), np.full(3, 64.0, np.float32), "synthetic-224")


def child(spec: dict):
    """One contender: yields img/s per round on stdout as JSON lines."""
    from hpcjobs import config
    from hpcjobs.data import load_data
    from hpcjobs.train import Trainer

    cfg = config.from_dict(spec["config"], "benchmark", spec["sets"])
    data = synthetic_data(cfg) if cfg.data.source == "synthetic-224" else load_data(cfg)
    with tempfile.TemporaryDirectory() as work:
        t = Trainer(cfg, work, data=data, verbose=False)
        batch = cfg.training.batch_size
        if spec["feeder_only"]:
            it = iter(t.feeder.train_dataset())
            next(it)

            def one_round():
                start = time.perf_counter()
                for _ in range(spec["steps"]):
                    next(it)
                return spec["steps"] * batch / (time.perf_counter() - start)
        else:
            it = t.train_iterator()
            spc = cfg.training.steps_per_call
            t.steps(it, spc)
            t.steps(it, spc)  # tracing, XLA compilation

            def one_round():
                calls = max(1, spec["steps"] // spc)
                start = time.perf_counter()
                t.steps(it, spc * calls)
                return calls * spc * batch / (time.perf_counter() - start)
        print(json.dumps({"ready": True, "replicas": t.rt.replicas, "gpus": t.rt.gpus}), flush=True)
        for line in sys.stdin:  # one round per line the parent sends
            print(json.dumps({"img_s": one_round()}), flush=True)


def contenders(gpus: int) -> dict:
    mixed = "mixed_float16" if gpus else "mixed_bfloat16"
    many = ["distribute.strategy=mirrored"] + ([] if gpus else ["distribute.logical_cpu_devices=2"])
    return {
        "float32": ["training.precision=float32", "distribute.strategy=none"],
        mixed: [f"training.precision={mixed}", "distribute.strategy=none"],
        "xla": ["training.jit_compile=true", "distribute.strategy=none"],
        "all replicas": many,
        "feeder alone": ["distribute.strategy=none"],
    }


def count_gpus() -> int:
    out = subprocess.run([sys.executable, "-c", "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"],
                         capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--model", choices=["seed", "resnet50"], default="seed")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the CPU accuracy check")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    gpus = count_gpus()
    print(f"devices: {gpus} GPU(s)" if gpus else f"devices: CPU only ({os.cpu_count()} cores); "
          "mixed means mixed_bfloat16 here", flush=True)
    procs = {}
    for name, sets in contenders(gpus).items():
        spec = {"config": base_config(args.model, args.batch), "sets": sets, "steps": args.steps,
                "feeder_only": name == "feeder alone"}
        p = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
        info = json.loads(p.stdout.readline())
        procs[name] = (p, info)
    rounds = {name: [] for name in procs}
    for _ in range(args.rounds):
        for name, (p, _) in procs.items():  # alternate: one round of each in turn
            p.stdin.write("go\n")
            p.stdin.flush()
            rounds[name].append(json.loads(p.stdout.readline())["img_s"])
    for p, _ in procs.values():
        p.stdin.close()
        p.wait()
    med = {k: statistics.median(v) for k, v in rounds.items()}
    for name, v in med.items():
        extra = f" x{procs[name][1]['replicas']} replicas" if name == "all replicas" else ""
        print(f"{name:>16}: {v:9.0f} img/s{extra}   (rounds: {', '.join(f'{r:.0f}' for r in rounds[name])})")
    mixed = next(k for k in med if k.startswith("mixed"))
    print(f"ratio {mixed} / float32: {med[mixed] / med['float32']:.3f}")
    print(f"ratio XLA on / off: {med['xla'] / med['float32']:.3f}")
    print(f"ratio all replicas / one: {med['all replicas'] / med['float32']:.3f}")
    print(f"feeder headroom (feeder img/s / float32 train img/s): {med['feeder alone'] / med['float32']:.1f}")
    if not gpus and not args.no_accuracy and args.model == "seed":
        run = tempfile.mkdtemp(prefix="hpcjobs-bf16-")
        out = subprocess.run([sys.executable, "-m", "hpcjobs", "train", os.path.join(REPO, "configs", "quickstart.yaml"),
                              "--run-dir", run, "--set", "training.precision=mixed_bfloat16"],
                             capture_output=True, text=True, cwd=REPO)
        acc = json.load(open(os.path.join(run, "run.json"))).get("test_accuracy") if out.returncode == 0 else None
        print(f"quickstart with mixed_bfloat16: test accuracy {acc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
