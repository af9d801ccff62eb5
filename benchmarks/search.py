"""Does pruning pay?  The same 12-trial random search with and without ASHA.

Fashion-MNIST (Debian's dataset-fashion-mnist), a random search over the learning rate
and dropout, ``--epochs`` short epochs per trial (``--steps`` steps of batch 128 each).
Both searches draw the same 12 configurations (the sampler is seeded by the trial's
number), so the only difference is the pruner: none, or ASHA with reduction factor 3
and a first rung after one epoch.  Printed: the total training steps and the best
validation accuracy of both, and their ratios; the issue's bar is at most 0.5x the
steps and at most 1 point of best validation accuracy lost.

    python benchmarks/search.py [--epochs 9] [--steps 30] [--trials 12] [--workers 1]
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"

CONFIG = """
base: {quickstart}
data:
  source: fashion-mnist
  validation_split: 0.05
  test_split: 0.02
training:
  batch_size: 128
  steps_per_epoch: {steps}
  log_every_steps: 100000
checkpoint:
  every_minutes: null
search:
  method: random
  trials: {trials}
  epochs: {epochs}
  seed: 1
  space:
    optimizer.learning_rate: {{log_uniform: [1.0e-4, 3.0e-2]}}
    model.dropout: {{uniform: [0.0, 0.6]}}
  pruning: {{kind: none, min_resource: 1, reduction_factor: 3}}
"""


def search(cfg: str, run: str, pruning: str, workers: int) -> tuple[int, float, float, list[dict]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "hpcjobs", "search", cfg, "--run-dir", run, "--workers", str(workers),
                        "--set", f"search.pruning.kind={pruning}"], env=env, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"search with pruning {pruning} failed:\n{p.stderr[-3000:]}")
    with open(os.path.join(run, "search", "results.csv")) as f:
        rows = list(csv.DictReader(f))
    steps = sum(int(r["steps"]) for r in rows)
    best = max(float(r["value"]) for r in rows if r["status"] == "complete")
    return steps, best, seconds, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=9, help="epochs per trial (ASHA's rungs at 1, 3, 9 ...)")
    ap.add_argument("--steps", type=int, default=30, help="steps per epoch")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if not os.path.isdir(FASHION):
        sys.exit(f"{FASHION} missing: apt-get install dataset-fashion-mnist")
    with tempfile.TemporaryDirectory() as work:
        cfg = os.path.join(work, "fmnist-search.yaml")
        with open(cfg, "w") as f:
            f.write(textwrap.dedent(CONFIG.format(quickstart=os.path.join(REPO, "configs", "quickstart.yaml"),
                                                  steps=args.steps, trials=args.trials, epochs=args.epochs)))
        full = search(cfg, os.path.join(work, "none"), "none", args.workers)
        asha = search(cfg, os.path.join(work, "asha"), "asha", args.workers)
    print(f"{args.trials}-trial random search on Fashion-MNIST, {args.epochs} epochs of {args.steps} steps per trial")
    print(f"{'pruning':<10}{'steps':>8}{'best val_accuracy':>20}{'seconds':>10}  trials complete/pruned")
    for name, (steps, best, seconds, rows) in (("none", full), ("asha", asha)):
        done = sum(r["status"] == "complete" for r in rows)
        print(f"{name:<10}{steps:>8}{best:>20.4f}{seconds:>10.0f}  {done}/{len(rows) - done}")
    ratio, lost = asha[0] / full[0], (full[1] - asha[1]) * 100
    ok = ratio <= 0.5 and lost <= 1.0
    print(f"asha / none: {ratio:.2f}x the steps, {lost:+.2f} points of best val accuracy lost "
          f"(bar: <= 0.5x, <= 1 point): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
