"""The feed check at a session's start (``data.feed_check``): is the input the bottleneck?

In the first seconds of a session the feeder's samples/s (``data.feed.measure_feed``: a
pipeline of its own, not the training iterator) are measured against the compiled train
step's on one batch held in memory, and the headroom (feed over step) is printed.  Below
``data.feed_headroom`` one warning line names what to change.  The figures go into
run.json as ``feed_check``.

The step's rate is measured with real train steps, so every variable they change (the
model's, the optimizers' slots and counters, the random layers' generator states, the
loop's and hooks' state) is saved first and put back after: a run with the check ends
bitwise equal to one without it.  Every worker runs the same fixed number of steps (the
steps hold collectives), so none waits for another.
"""
from __future__ import annotations

import time

import numpy as np

from .. import compat
from ..data.feed import measure_feed

WARMUP_STEPS, TIMED_STEPS = 1, 5


def wanted(setting, info) -> bool:
    """``data.feed_check``: true always, false never, auto inside a Slurm job (``info``: the
    session's ClusterInfo)."""
    return setting is True or setting == "auto" and info.job_id is not None


def advice(feed: str, staged: bool | None, cpus: int) -> str:
    """What to change when the feed is the bottleneck, by the feed in use: a disk feed reads
    every window from the store; a hybrid one a segment at a time (more of it in memory
    helps, and a staged copy on node-local disk reads faster than a shared file system);
    a memory feed is bound by the CPUs that gather, cast and augment.  ``staged``: None
    when the data is not a store (nothing to stage), else whether it was staged."""
    stage = "" if staged is None or staged else "; data.stage: auto to read a node-local copy of the store"
    if feed == "disk":
        return f"data.feed: hybrid or memory (a larger data.memory_budget){stage}"
    if feed == "hybrid":
        return f"a larger data.memory_budget (data.feed: memory if the split fits){stage}"
    return f"more CPUs per task (this worker has {cpus}; slurm.cpus_per_task), or lighter data.augment"


def verdict(feed_rate: float, step_rate: float, least: float, feed: str, staged: bool | None,
            cpus: int) -> tuple[float, str | None]:
    """(headroom, the warning line or None): plain arithmetic on the two figures."""
    headroom = feed_rate / step_rate if step_rate > 0 else float("inf")
    if headroom >= least:
        return headroom, None
    return headroom, (f"warning: the input is the bottleneck: the {feed} feed gives {feed_rate:,.0f} samples/s, "
                      f"the train step takes {step_rate:,.0f} (headroom {headroom:.2f}x, below "
                      f"data.feed_headroom {least:g}); change {advice(feed, staged, cpus)}")


def step_rate(trainer) -> float:
    """Samples/s (this worker's share) of the compiled train step on one batch held in
    memory; the state the steps change is put back bitwise."""
    tf = trainer.tf
    saved = _snapshot(trainer)
    try:
        ds = lambda: trainer.feeder.train_dataset(0, to_device=False).take(1).cache().repeat()  # noqa: E731
        it = iter(trainer._distributed(ds))  # the training pipeline's element spec: one trace serves both
        trainer.steps(it, WARMUP_STEPS)  # traces
        t = time.perf_counter()
        trainer.steps(it, TIMED_STEPS)
        seconds = time.perf_counter() - t
    finally:
        _restore(saved)
    del tf
    return TIMED_STEPS * trainer.cfg.training.batch_size / trainer.rt.workers / seconds


def feed_check(trainer, seconds: float = 1.0) -> dict:
    """Measure, print the headroom (and the warning), and return run.json's ``feed_check``."""
    feed_rate = measure_feed(trainer.feeder, seconds)
    rate = step_rate(trainer)
    d = trainer.cfg.data
    staged = None if not trainer.data.path else bool(getattr(getattr(trainer.data, "staged", None), "staged", False))
    headroom, warning = verdict(feed_rate, rate, d.feed_headroom, trainer.feeder.feed, staged, trainer.feeder.cpus)
    trainer.say(f"feed check: {trainer.feeder.feed} feed {feed_rate:,.0f} samples/s, train step {rate:,.0f} "
                f"samples/s: headroom {headroom:.1f}x")
    if warning:
        trainer.say(warning)
    return {"feed_samples_per_s": round(feed_rate, 1), "step_samples_per_s": round(rate, 1),
            "headroom": round(headroom, 3)}


def _variables(trainer) -> list:
    out, seen = [], set()
    for v in [*trainer.model.variables, *(w for o in trainer.optimizers for w in o.variables),
              *compat.seed_variables(trainer.model), *trainer.state.values()]:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _snapshot(trainer) -> list:
    return [(v, np.array(compat.to_numpy(v), copy=True)) for v in _variables(trainer)]


def _restore(saved: list):
    for v, value in saved:
        v.assign(value)
