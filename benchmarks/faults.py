"""Fault campaign: SIGKILL `hpcjobs train` many times, then compare with an uninterrupted run.

Each session is killed in one of two ways, alternating:
  * at a random moment of training (a uniform delay after the session started);
  * while a checkpoint is written: the moment its temporary folder (data being written)
    or its index (files written, not yet named latest) appears in RUN/checkpoints.
After every kill the script notes the latest complete checkpoint (the one the state file
names); the next session must start exactly there.  When all kills are done the run is
finished and its weights sha256 and metrics.csv must equal the uninterrupted run's.

Deterministic mode, Dropout and augmentation are on.  The tests run a short version of
this (tests/test_checkpoint.py); this script is for longer campaigns:

    python benchmarks/faults.py [--kills 30] [--epochs 60] [--every-steps 5] [--async-write true]
        [--set KEY=VALUE ...]      # e.g. --set data.source=fashion-mnist

Exit code 0 when every check holds, 1 otherwise.
"""
import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def spawn(run, items):
    sets = sum((["--set", s] for s in items), [])
    return subprocess.Popen([sys.executable, "-m", "hpcjobs", "train", QUICKSTART, "--run-dir", run, *sets],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=REPO)


def latest_named(ckpts) -> int:
    state = os.path.join(ckpts, "checkpoint")
    if not os.path.exists(state):
        return 0
    with open(state) as f:
        return int(f.readline().split('"')[1].split("-")[1])  # model_checkpoint_path: "ckpt-N"


def sessions(run) -> int:
    try:
        with open(os.path.join(run, "run.json")) as f:
            return len(json.load(f)["sessions"])
    except (OSError, ValueError, KeyError):
        return 0


def kill_at_random(p, run, rng, max_delay):
    """Kill once the session has started training, after a random delay."""
    before, t0 = sessions(run), time.time()
    while p.poll() is None and sessions(run) == before and time.time() - t0 < 300:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, max_delay))
    return None


def kill_mid_write(p, ckpts, rng):
    """Kill the moment a checkpoint's temporary folder or its index appears; returns the
    step of the checkpoint being written."""
    target = rng.choice(["_temp", ".index"])
    skip = rng.randint(0, 3)
    seen = set(os.listdir(ckpts)) if os.path.isdir(ckpts) else set()
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 300:
        names = set(os.listdir(ckpts)) if os.path.isdir(ckpts) else set()
        fresh = sorted(n for n in names - seen if n.endswith(target))
        seen |= names
        if fresh and skip <= 0:
            return int(fresh[0][5:].split("_")[0].split(".")[0])
        skip -= len(fresh)
        time.sleep(0.0005)
    return None


def metrics(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--every-steps", type=int, default=5)
    ap.add_argument("--async-write", default="true", choices=["true", "false"])
    ap.add_argument("--max-delay", type=float, default=3.0, help="seconds, for the random-moment kills")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    items = ["training.deterministic=true", f"training.epochs={args.epochs}", "training.steps_per_epoch=12",
             "training.batch_size=64", "data.augment.flip_horizontal=true", "data.augment.rotation=10",
             "checkpoint.every_minutes=null", f"checkpoint.every_steps={args.every_steps}",
             f"checkpoint.async_write={args.async_write}", *args.set]
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="hpcjobs-faults-")
    try:
        whole = os.path.join(work, "whole")
        t = time.time()
        if spawn(whole, items).wait() != 0:
            print("the uninterrupted run failed")
            return 1
        print(f"uninterrupted run: {time.time() - t:.1f} s")
        run, ckpts = os.path.join(work, "killed"), os.path.join(work, "killed", "checkpoints")
        kills = []  # (kind, step being written or None, latest complete step)
        while len(kills) < args.kills:
            p = spawn(run, items)
            kind = "mid-write" if len(kills) % 2 else "random"
            writing = kill_mid_write(p, ckpts, rng) if kind == "mid-write" else kill_at_random(p, run, rng,
                                                                                               args.max_delay)
            if p.poll() is not None:  # finished (or failed) before the kill
                if p.returncode == 0:
                    print(f"the run finished after {len(kills)} kills: raise --epochs for more")
                    break
                print(f"session exited {p.returncode} before its kill")
                return 1
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills.append((kind, writing, latest_named(ckpts)))
        code = spawn(run, items).wait()
        with open(os.path.join(run, "run.json")) as f:
            st = json.load(f)
        with open(os.path.join(whole, "run.json")) as f:
            want = json.load(f)["weights_sha256"]
        starts = [s["start_step"] for s in st["sessions"]]
        resumed_right = starts[1:len(kills) + 1] == [k[2] for k in kills]
        mid = sum(1 for kind, w, latest in kills if kind == "mid-write" and w is not None and w > latest)
        same_weights = code == 0 and st.get("weights_sha256") == want
        same_metrics = metrics(run) == metrics(whole)
        print(f"kills: {len(kills)} ({sum(k[0] == 'random' for k in kills)} at random moments, "
              f"{mid} while a checkpoint was written and not yet the latest)")
        print(f"sessions: {len(st['sessions'])}; every restart resumed from the last complete checkpoint: "
              f"{resumed_right}")
        print(f"final weights equal the uninterrupted run's: {same_weights}; metrics.csv equal: {same_metrics}")
        return 0 if resumed_right and same_weights and same_metrics else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
