"""``hpcjobs lr-find CONFIG``: the learning-rate range test (Smith 2015; the U curve).

The learning rate grows exponentially from ``search.lr_find.min_lr`` to ``max_lr`` over
``steps`` training steps, one compiled step each, on the run's own model, data, optimizer
and strategy (a constant schedule, no reduce-on-plateau).  The loss is smoothed by a
bias-corrected moving average, and the sweep stops once the smoothed loss passes
``diverge`` times its best (or is not finite).  Written to the run directory:

* ``lr_find.csv``: step, lr, loss, smoothed loss;
* ``plots/lr_find.png``: smoothed loss against the learning rate (log x), with the suggestions;
* ``lr_find.json``: ``suggestion`` (the valley), ``valley``, ``steepest`` (the steepest
  fall of the smoothed loss over log lr), ``min_div10`` (a tenth of the minimum's lr).

The model is built and trained in a temporary run directory that is removed
afterwards: no weights, checkpoints or run.json are left behind, and an existing run in
the same directory is not touched.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile

import numpy as np

from ..config import Config, PlateauConfig, ScheduleConfig
from ..errors import UserError
from ..rundir import RunDir, atomic_path, atomic_write


def sweep_config(cfg: Config) -> Config:
    lf = cfg.search.lr_find
    opt = dataclasses.replace(cfg.optimizer, learning_rate=lf.min_lr, schedule=ScheduleConfig(),
                              reduce_on_plateau=PlateauConfig())
    training = dataclasses.replace(cfg.training, epochs=max(cfg.training.epochs, lf.steps), time_budget=None)
    checkpoint = dataclasses.replace(cfg.checkpoint, every_minutes=None, every_steps=None, async_write=False)
    return dataclasses.replace(cfg, optimizer=opt, training=training, checkpoint=checkpoint)


def sweep(trainer, lf) -> list[dict]:
    """Run the sweep on a built Trainer; one row per step."""
    it = trainer.train_iterator(0)
    ratio = (lf.max_lr / lf.min_lr) ** (1.0 / (lf.steps - 1))
    rows, avg, best = [], 0.0, math.inf
    for i in range(lf.steps):
        lr = lf.min_lr * ratio ** i
        trainer.optimizer.learning_rate = lr
        sums = trainer.steps(it, 1)
        loss = float(sums[0] / max(sums[2], 1))
        avg = lf.smoothing * avg + (1 - lf.smoothing) * loss
        smoothed = avg / (1 - lf.smoothing ** (i + 1))
        rows.append(dict(step=i + 1, lr=lr, loss=loss, smoothed=smoothed))
        if not math.isfinite(smoothed) or smoothed > lf.diverge * best:
            break
        best = min(best, smoothed)
    return rows


def valley(losses: list[float]) -> int:
    """fastai's valley: the longest stretch of falling loss; a point two thirds down it."""
    n = len(losses)
    lengths, start, end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lengths[i] < lengths[j] + 1:
                lengths[i] = lengths[j] + 1
        if lengths[end] < lengths[i]:
            end, start = i, i - lengths[i]
    third = (end - start) / 3
    return min(n - 1, start + int(third) + int(third / 2))


def suggestions(rows: list[dict]) -> dict:
    good = [r for r in rows if math.isfinite(r["smoothed"])]
    if len(good) < 5:
        return {}
    lrs = np.array([r["lr"] for r in good])
    sm = np.array([r["smoothed"] for r in good])
    i_min = int(np.argmin(sm))
    skip = max(1, len(good) // 10)  # the moving average has not settled at the start
    grad = np.gradient(sm, np.log(lrs))
    lo, hi = skip, max(skip + 1, i_min + 1)
    i_steep = lo + int(np.argmin(grad[lo:hi]))
    i_valley = valley(list(sm))
    out = dict(valley=float(lrs[i_valley]), steepest=float(lrs[i_steep]), min_div10=float(lrs[i_min] / 10),
               minimum=float(lrs[i_min]))
    out["suggestion"] = out["valley"]
    return out


def plot(rows: list[dict], sugg: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["lr"] for r in rows], [r["loss"] for r in rows], color="0.75", lw=1, label="loss")
    ax.plot([r["lr"] for r in rows], [r["smoothed"] for r in rows], color="tab:blue", label="smoothed loss")
    for name, colour in (("valley", "tab:green"), ("steepest", "tab:orange"), ("min_div10", "tab:red")):
        if name in sugg:
            ax.axvline(sugg[name], color=colour, ls="--", label=f"{name} {sugg[name]:.2g}")
    ax.set_xscale("log")
    finite = [r["smoothed"] for r in rows if math.isfinite(r["smoothed"])]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write(run_dir: str, rows: list[dict], sugg: dict, lf):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "lr", "loss", "smoothed"], lineterminator="\n")
    w.writeheader()
    w.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    atomic_write(os.path.join(run_dir, "lr_find.csv"), buf.getvalue(), fsync=False)
    stopped = "diverged" if len(rows) < lf.steps else "max_lr"
    info = dict(sugg, steps=len(rows), stopped=stopped, min_lr=lf.min_lr, max_lr=lf.max_lr)
    atomic_write(os.path.join(run_dir, "lr_find.json"), json.dumps(info, indent=2) + "\n", fsync=False)
    plot(rows, sugg, os.path.join(run_dir, "plots", "lr_find.png"))
    return info


def lr_find(cfg: Config, run_dir: str, verbose: bool = True) -> dict:
    """Run the range test; write its files into ``run_dir``; return lr_find.json's content."""
    from ..train.trainer import Trainer

    run_dir = os.path.abspath(run_dir)
    rd = RunDir(run_dir)
    created = rd.claim()
    scratch = tempfile.mkdtemp(prefix=".lr-find-", dir=run_dir)
    try:
        try:
            trainer = Trainer(sweep_config(cfg), scratch, verbose=False)
        except UserError:
            shutil.rmtree(scratch, ignore_errors=True)
            if created:
                rd.discard()  # a refused lr-find leaves no run directory behind
            raise
        rows = sweep(trainer, cfg.search.lr_find)
        trainer.checkpoints.close()
        chief = trainer.rt.is_chief
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sugg = suggestions(rows)
    info = write(run_dir, rows, sugg, cfg.search.lr_find) if chief else dict(sugg)
    if verbose and chief:
        print(f"lr-find: {len(rows)} steps from {cfg.search.lr_find.min_lr:g} ({info.get('stopped')}); "
              + ", ".join(f"{k} {sugg[k]:.3g}" for k in ("valley", "steepest", "min_div10") if k in sugg)
              + f"\n  {run_dir}/lr_find.json, lr_find.csv, plots/lr_find.png", flush=True)
    return info
