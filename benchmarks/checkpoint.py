"""Checkpoint cost and resume latency.

1. Cost of checkpointing at the default cadence (checkpoint.every_minutes: 10, plus the
   final save) and, for scale, at one save per epoch: seconds the training loop is
   blocked by saves (asynchronous writes, the default; on the quickstart also
   synchronous ones, side by side) as a share of the training wall time, on the
   quickstart (digits) and on Fashion-MNIST (if Debian's dataset-fashion-mnist is
   installed).
2. Resume latency: process start to the first training step done, for a fresh start and
   for a resume from a checkpoint, measured on `hpcjobs train` subprocesses, alternating.

    python benchmarks/checkpoint.py [--fashion-epochs 2] [--rounds 3]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")


def cost(name, overrides, work, modes=("async",)):
    """Blocked = time the training loop spent in saves and in waiting for them; writes =
    the saves' whole durations (with async writes, mostly in TensorFlow's writer thread)."""
    from hpcjobs import config
    from hpcjobs.train import Trainer

    # warm-up, not reported: the first run in a process pays TensorFlow's one-off setup
    Trainer(config.load(QUICKSTART, overrides + ["training.epochs=1"]), os.path.join(work, f"{name}-warm"),
            verbose=False).run()
    for mode, label, extra in [(m, c, e) for m in modes for c, e in (("default cadence", []),
                                                                        ("every epoch", ["EPOCH"]))]:
        cfg = config.load(QUICKSTART, overrides)
        if extra:
            t = Trainer(cfg, os.path.join(work, "probe"), verbose=False)
            extra = [f"checkpoint.every_steps={t.steps_per_epoch}"]
        cfg = config.load(QUICKSTART, overrides + extra + [f"checkpoint.async_write={mode == 'async'}"])
        label = f"{label}, {mode}"
        run = os.path.join(work, f"{name}-{label.replace(' ', '-').replace(',', '')}")
        t = Trainer(cfg, run, verbose=False)
        start = time.perf_counter()
        code = t.run()
        wall = time.perf_counter() - start
        c = t.checkpoints
        print(f"{name:>14}, {label:>22}: {len(c.save_seconds):3d} saves, blocked {c.blocked_seconds:6.3f} s of "
              f"{wall:7.2f} s training = {100 * c.blocked_seconds / wall:5.2f}%  "
              f"(writes {sum(c.write_seconds):6.3f} s; exit {code})")


def first_step_seconds(run, extra=()):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "hpcjobs", "train", QUICKSTART, "--run-dir", run,
                          "--set", "training.log_every_steps=1", "--set", "training.steps_per_call=1",
                          *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in p.stdout:
        if line.startswith("step "):
            elapsed = time.perf_counter() - t
            break
    else:
        raise RuntimeError("no step line")
    p.kill()
    p.wait()
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fashion-epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="hpcjobs-ckpt-bench-")
    try:
        cost("quickstart", [], work, modes=("async", "sync"))
        if os.path.isdir("/usr/share/datasets/fashion-mnist"):
            cost("fashion-mnist", ["data.source=fashion-mnist", "training.batch_size=128",
                                   f"training.epochs={args.fashion_epochs}"], work)

        resumable = os.path.join(work, "resumable")
        subprocess.run([sys.executable, "-m", "hpcjobs", "train", QUICKSTART, "--run-dir", resumable,
                        "--set", "training.epochs=1"], check=True, capture_output=True,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        fresh, resume = [], []
        for k in range(args.rounds):
            fresh.append(first_step_seconds(os.path.join(work, f"fresh-{k}")))
            # a longer run of the same config resumes from the 1-epoch checkpoint
            resume.append(first_step_seconds(resumable, ["--set", "training.epochs=50"]))
        f, r = statistics.median(fresh), statistics.median(resume)
        print(f"process start to first step: fresh {f:.2f} s, resumed {r:.2f} s "
              f"(rounds fresh {', '.join(f'{x:.2f}' for x in fresh)}; resumed {', '.join(f'{x:.2f}' for x in resume)})")
        print(f"ratio resumed / fresh: {r / f:.3f}   (target <= 1.5)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
