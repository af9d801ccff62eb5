"""``hpcjobs search CONFIG [--workers N]`` and ``hpcjobs lr-find CONFIG``.

``search`` runs the config's ``search:`` section here, without Slurm: one worker in
this process, or ``--workers N`` worker processes (each ``hpcjobs search --worker``)
that pull trials from the same journal.  Running it again on the same run directory
continues the search: finished trials stay, interrupted ones resume from their
checkpoints, and new ones are asked for while the budget (``search.trials``) lasts.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from ..errors import EX_OK, EX_TEMPFAIL, RunFailure, UserError
from ..rundir import RunDir, default_run_dir


def add_arguments(p):
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes pulling trials at once (default 1: here, one after another)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one worker, no children


def _run_dir(args, cfg) -> str:
    return os.path.abspath(default_run_dir(args.run_dir, cfg.name))


def _children(args, run: str) -> int:
    sets = [a for s in args.set for a in ("--set", s)]
    argv = [sys.executable, "-m", "hpcjobs", "search", args.config, "--worker", "--run-dir", run, *sets]
    from ..cluster.info import split_gpus

    procs = [subprocess.Popen(argv, env={**os.environ, **gpus}) for gpus in split_gpus(args.workers)]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if EX_TEMPFAIL in codes:
        return EX_TEMPFAIL
    return max(codes) if any(codes) else EX_OK


def _cap_workers(asked: int, cfg, run: str) -> int:
    """At most one worker per trial left (of the budget, less those finished) and per CPU
    here: more only fork idle processes (and can exhaust the process limit)."""
    from ..cluster.info import cpu_count
    from .space import total_trials

    trials = os.path.join(run, "trials")
    done = sum(RunDir(os.path.join(trials, t)).read_record().finished
               for t in (os.listdir(trials) if os.path.isdir(trials) else ()))
    left, cpus = max(0, total_trials(cfg.search) - done), cpu_count()
    workers = max(1, min(asked, left, cpus))
    if workers < asked:
        print(f"--workers {asked}: capped at {workers} ({left} trial(s) left of search.trials "
              f"{total_trials(cfg.search)}, {cpus} CPU(s) here)", flush=True)
    return workers


def cmd_search(args) -> int:
    from .. import config

    cfg = config.load(args.config, args.set)
    if args.workers < 1:
        raise UserError("--workers: must be >= 1")
    run = _run_dir(args, cfg)
    RunDir(run).check_usable()  # marked as a run (claimed) once prepare's checks pass
    args.workers = _cap_workers(args.workers, cfg, run)
    from .worker import prepare, work

    if args.worker or args.workers == 1:
        rc = work(cfg, run, args.config)
    else:
        prepare(cfg, run, args.config)  # a bad space is one line here, not one per child
        rc = _children(args, run)
    if not args.worker and os.path.exists(os.path.join(run, "search", "results.csv")):
        from .results import status_lines

        for line in status_lines(run):
            print(line)
        if rc == EX_TEMPFAIL:
            print("stopped with the running trials checkpointed; run the same command again to continue")
    return rc


def cmd_lr_find(args) -> int:
    from .. import config
    from .lr_find import lr_find

    cfg = config.load(args.config, args.set)
    info = lr_find(cfg, _run_dir(args, cfg))
    if "suggestion" not in info:
        raise RunFailure(f"the loss diverged within {info.get('steps')} steps, too soon for a suggestion: "
                         "lower search.lr_find.min_lr or raise search.lr_find.steps")
    return EX_OK
