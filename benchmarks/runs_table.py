"""``hpcjobs runs`` on a folder of many runs: wall time of a fresh process (interpreter start
included) printing the table, and whether TensorFlow was imported.

The folder: one real quickstart run (trained here, 1 epoch) and N-1 copies of its run.json
with the status, steps and sessions altered, plus a K-fold parent every sixth run.

    python benchmarks/runs_table.py [--runs 50] [--rounds 5]
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
CODE = ("import sys, time; t = time.perf_counter(); from hpcjobs import cli; rc = cli.main(['runs', sys.argv[1]]); "
        "print('tensorflow imported' if 'tensorflow' in sys.modules else 'no tensorflow', "
        "f'{time.perf_counter() - t:.3f}', file=sys.stderr); sys.exit(rc)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "runs")
        real = os.path.join(root, "run-000")
        subprocess.run([sys.executable, "-m", "hpcjobs", "train", QUICKSTART, "--run-dir", real,
                        "--set", "training.epochs=1"], env=env, check=True, capture_output=True)
        base = json.load(open(os.path.join(real, "run.json")))
        for i in range(1, a.runs):
            r = copy.deepcopy(base)
            r["status"] = ["finished", "stopped", "failed"][i % 3]
            r["step"] = i
            if i % 6 == 0:
                r.update(folds=3, fold_status=["finished"] * 3,
                         fold_summary={"test_accuracy": {"mean": 0.9, "std": 0.01, "n": 3}})
            os.makedirs(os.path.join(root, f"run-{i:03d}"))
            json.dump(r, open(os.path.join(root, f"run-{i:03d}", "run.json"), "w"))
        walls, inner = [], []
        for _ in range(a.rounds):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", CODE, root], env=env, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - t)
            what, seconds = p.stderr.strip().splitlines()[-1].rsplit(" ", 1)
            inner.append(float(seconds))
        print(f"hpcjobs runs on {a.runs} runs: process wall {statistics.median(walls):.3f} s (median of {a.rounds}), "
              f"import + table {statistics.median(inner):.3f} s; {what}; {len(p.stdout.splitlines()) - 1} rows")


if __name__ == "__main__":
    main()
