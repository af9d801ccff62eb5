"""``hpcjobs train CONFIG``: one run, or every fold of a K-fold run in turn."""
from __future__ import annotations

import os
import sys


def add_arguments(p):
    p.add_argument("--from", dest="from_checkpoint", metavar="CHECKPOINT",
                   help="start from another run's checkpoint (if this run has none)")
    p.add_argument("--init-weights", metavar="RUN_OR_MODEL",
                   help="the same as --set model.init_from=...: copy matching layers from another run's model")
    p.add_argument("--time-budget", metavar="DURATION", help="stop with a checkpoint before this (90s, 15m, 1h)")
    p.add_argument("--restart", action="store_true", help="move the old run aside and start over")


def cmd_train(args) -> int:
    from .. import config
    from ..rundir import RunDir, clear_cancelled, default_run_dir, refuse_overwriting
    from .folds import parent_of_fold, record_folds, train_folds
    from .job import train

    cfg = config.load(args.config, args.set)
    run_dir = default_run_dir(args.run_dir, cfg.name)
    RunDir(run_dir).check_usable()  # the rule first: a folder of the user's files is no run
    refuse_overwriting(args.config, os.path.join(run_dir, "config.yaml"), config.dump(cfg))
    if not os.environ.get("HPCJOBS_JOB_SCRIPT") and clear_cancelled(run_dir):  # trained again by hand
        print(f"{run_dir}: the cancel is cleared; training resumes from its checkpoint", file=sys.stderr)
    kwargs = dict(from_checkpoint=args.from_checkpoint, init_weights=args.init_weights, time_budget=args.time_budget,
                  restart=args.restart)
    if cfg.data.folds and cfg.data.fold is None:  # every fold in turn
        return train_folds(cfg, run_dir, train, **kwargs)
    rc = train(cfg, run_dir, **kwargs)
    if cfg.data.folds:  # one fold of a K-fold run (a task of submit --folds): the parent's summary
        from ..cluster.info import detect

        parent = parent_of_fold(run_dir, cfg)
        if parent is not None and detect().is_chief:
            record_folds(parent, cfg)
    return rc


def add_clean_arguments(p):
    p.add_argument("target", nargs="?", default="runs", help="a run directory, or a folder of runs (default runs/)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed and the space; remove nothing")


def cmd_clean(args) -> int:
    """Free the space of finished runs: keep the export, the best epoch and the last checkpoint."""
    from .clean import clean

    print("\n".join(clean(args.target, args.dry_run)))
    return 0
