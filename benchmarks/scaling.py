"""Scaling: training images/s with 1 worker process and with 2 (MultiWorkerMirrored over
TF_CONFIG on localhost), same global batch, read from metrics.csv (epochs after the first,
so tracing is excluded).

On this 2-core machine the two workers share the same two cores, so the ratio shows the
cost of the collective communication rather than a speed-up: about 1.0 or below is the
expected result here.  On a cluster, run the same config with `hpcjobs submit --nodes 1`
and `--nodes 2` and compare the `seconds` column of the two runs' metrics.csv.

    python benchmarks/scaling.py [--epochs 3] [--steps 40] [--batch 128]
"""
import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    out = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return out


def run(workers, run_dir, sets):
    procs = []
    addrs = [f"127.0.0.1:{p}" for p in ports(workers)]
    for i in range(workers):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addrs}, "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen([sys.executable, "-m", "hpcjobs", "train",
                                       os.path.join(REPO, "configs", "quickstart.yaml"), "--run-dir", run_dir,
                                       *sum((["--set", s] for s in sets), []),
                                       "--set", f"distribute.strategy={'multiworker' if workers > 1 else 'none'}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(out[-2000:])
    rows = list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))[1:]
    steps = int(sets_value(sets, "training.steps_per_epoch"))
    batch = int(sets_value(sets, "training.batch_size"))
    seconds = sum(float(r["seconds"]) for r in rows)
    return len(rows) * steps * batch / seconds


def sets_value(sets, key):
    return next(s.split("=", 1)[1] for s in sets if s.startswith(key + "="))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    source = "fashion-mnist" if os.path.isdir("/usr/share/datasets/fashion-mnist") else "digits"
    sets = [f"data.source={source}", f"training.epochs={args.epochs}", f"training.steps_per_epoch={args.steps}",
            f"training.batch_size={args.batch}", "training.steps_per_call=10", "checkpoint.every_minutes=null"]
    work = tempfile.mkdtemp(prefix="hpcjobs-scaling-")
    try:
        one = run(1, os.path.join(work, "one"), sets)
        two = run(2, os.path.join(work, "two"), sets)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"data {source}, global batch {args.batch}, {args.steps} steps/epoch, epochs 2..{args.epochs} timed")
    print(f"1 worker : {one:8.0f} img/s")
    print(f"2 workers: {two:8.0f} img/s")
    print(f"ratio 2 / 1 workers: {two / one:.3f}  (2 cores shared by both workers here; see the docstring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
