"""The command line: parse, load the config, call one function, map errors to exit codes.

Exit codes: 0 finished; 75 stopped cleanly with a checkpoint, more to do; 2 user
error (one line, no traceback); 1 anything else.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time

from .errors import EX_FAILURE, EX_INTERRUPTED, EX_USAGE, RunFailure, UserError, first_line

def _config(args):
    from . import config

    return config.load(args.config, args.set)


def _run_dir(args, cfg) -> str:
    return args.run_dir or os.path.join("runs", cfg.name)


def cmd_train(args) -> int:
    cfg = _config(args)
    from .config import dump
    from .rundir import RunDir, refuse_overwriting
    from .train import train

    RunDir(_run_dir(args, cfg)).check_usable()  # the rule first: a folder of the user's files is no run
    refuse_overwriting(args.config, os.path.join(_run_dir(args, cfg), "config.yaml"), dump(cfg))

    kwargs = dict(from_checkpoint=args.from_checkpoint, init_weights=args.init_weights, time_budget=args.time_budget,
                  restart=args.restart)
    if cfg.data.folds and cfg.data.fold is None:  # every fold in turn
        from .train.folds import train_folds

        return train_folds(cfg, _run_dir(args, cfg), train, **kwargs)
    rc = train(cfg, _run_dir(args, cfg), **kwargs)
    if cfg.data.folds:  # one fold of a K-fold run (a task of submit --folds): the parent's summary
        from .cluster.info import detect
        from .train.folds import parent_of_fold, record_folds

        parent = parent_of_fold(_run_dir(args, cfg), cfg)
        if parent is not None and detect().is_chief:
            record_folds(parent, cfg)
    return rc


def cmd_prepare(args) -> int:
    cfg = _config(args)
    out = args.output or cfg.data.store or os.path.join("stores", f"{cfg.name}.h5")
    from .data import prepare_store

    data = prepare_store(cfg, out, strict=args.strict, progress=True, force=args.force)
    print(data.class_table())
    if data.skipped:
        print(f"skipped {len(data.skipped)} unreadable image(s):")
        for path, reason in data.skipped[:50]:
            print(f"  {path}: {reason}")
        if len(data.skipped) > 50:
            print(f"  ... and {len(data.skipped) - 50} more (listed in the store's metadata)")
    print(f"store: {out} ({data.image_shape}, {data.num_classes} classes)")
    if not cfg.data.store:
        print(f"train from it with: --set data.store={out}")
    data.close()
    return 0


def cmd_status(args) -> int:
    from .rundir import RunDir, RunDirError

    if os.path.isfile(os.path.join(args.run, "search", "results.csv")):  # a search: its table
        from .search.command import status_lines

        print("\n".join(status_lines(args.run)))
        return 0
    rd = RunDir(args.run)
    st = rd.read_status(strict=True)
    if not st:
        raise RunDirError(f"{args.run}: no run.json (not a run directory, or not started)")
    try:
        head, tail = _status_lines(st)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
        raise RunDirError(f"{rd.run_json}: unreadable run.json (unexpected content: {first_line(e)})") from None
    from .slurm import job_states

    for line in head + [f"  {job}" for job in job_states(args.run)] + tail:
        print(line)
    return 0


def _status_lines(st: dict) -> tuple[list[str], list[str]]:
    """run.json in words: the header and one line per session; then the last epoch and
    the test accuracy, which come after the run's Slurm jobs."""
    lines = [f"run {st.get('name')}: {st.get('status')}, step {st.get('step', 0)}/{st.get('total_steps')}, "
             f"{len(st.get('sessions', []))} session(s)"]
    for s in st.get("sessions", []):
        lines.append(f"  session {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['start']))} "
                     f"steps {s.get('start_step')}->{s.get('end_step')} stopped by {s.get('stopped_by')}"
                     + (f" job {s['job_id']}" if s.get("job_id") else ""))
    tail = []
    if "last" in st:
        tail.append("  last epoch: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in st["last"].items()))
    if "test_accuracy" in st:
        tail.append(f"  test accuracy {st['test_accuracy']:.4f}"
                    + (f", macro-F1 {st['test_f1']:.4f}" if isinstance(st.get("test_f1"), float) else ""))
    if "folds" in st:
        from .train.folds import fold_table

        tail += fold_table(st)
    return lines, tail


def _delegate(sub, name: str, help: str, module: str, func: str, common, config: bool = True):
    """A command whose arguments (``add_arguments``) and function live in ``hpcjobs.<module>``."""
    import importlib

    mod = importlib.import_module(f".{module}", __package__)
    sp = sub.add_parser(name, help=help)
    mod.add_arguments(sp)
    common(sp, config=config)
    sp.set_defaults(func=lambda a: getattr(mod, func)(a))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcjobs", description="Train Keras image classifiers on Slurm clusters.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, config=True):
        if config:
            sp.add_argument("config", help="YAML config file")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. training.epochs=3 (repeatable)")
        sp.add_argument("--run-dir", help="run directory (default runs/<config name>)")

    t = sub.add_parser("train", help="train (resumes from the run directory's checkpoint)")
    common(t)
    t.add_argument("--from", dest="from_checkpoint", metavar="CHECKPOINT",
                   help="start from another run's checkpoint (if this run has none)")
    t.add_argument("--init-weights", metavar="RUN_OR_MODEL",
                   help="the same as --set model.init_from=...: copy matching layers from another run's model")
    t.add_argument("--time-budget", metavar="DURATION", help="stop with a checkpoint before this (90s, 15m, 1h)")
    t.add_argument("--restart", action="store_true", help="move the old run aside and start over")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("prepare", help="write the HDF5 sample store with stratified splits")
    common(pr)
    pr.add_argument("--output", help="store path (default data.store, else stores/<name>.h5)")
    pr.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping")
    pr.add_argument("--force", action="store_true",
                    help="write the store even over its source or over a file that is not an hpcjobs store")
    pr.set_defaults(func=cmd_prepare)

    _delegate(sub, "infer", "batch inference with an exported model", "infer.command", "cmd_infer", common, config=False)
    _delegate(sub, "submit", "submit training (or inference) to Slurm", "slurm.command", "cmd_submit", common)
    _delegate(sub, "evaluate", "per-class metrics of an exported model on labelled images", "evaluation.command",
              "cmd_evaluate", common, config=False)
    _delegate(sub, "export", "write a run's export bundle (formats, model card, parity checks)", "export.command",
              "cmd_export", common, config=False)

    from .search import command as search  # hpcjobs search and lr-find (imports neither Optuna nor TensorFlow)

    se = sub.add_parser("search", help="hyperparameter search here, no Slurm (the config's search: section)")
    common(se)
    search.add_arguments(se)
    se.set_defaults(func=lambda a: search.cmd_search(a))
    lf = sub.add_parser("lr-find", help="learning-rate range test: lr_find.json, lr_find.csv, plots/lr_find.png")
    common(lf)
    lf.set_defaults(func=lambda a: search.cmd_lr_find(a))

    wt = sub.add_parser("weights", help="pretrained backbone weights (on a login node)")
    from .models import weights

    weights.add_arguments(wt)
    wt.set_defaults(func=lambda a: weights.cmd_weights(a))

    st = sub.add_parser("status", help="progress of a run (or the table of a search)")
    st.add_argument("run", help="run directory")
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"hpcjobs: error: {e}", file=sys.stderr)
        return EX_USAGE
    except RunFailure as e:
        what = "training" if args.command == "train" else args.command
        print(f"hpcjobs: {what} failed: {e}", file=sys.stderr)
        return EX_FAILURE
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        what = "training" if args.command == "train" else args.command
        where = f"{e.filename}: " if e.filename else ""
        print(f"hpcjobs: {what} failed: {where}{os.strerror(e.errno)} ({first_line(e)})", file=sys.stderr)
        return EX_FAILURE
    except KeyboardInterrupt:
        print("hpcjobs: interrupted", file=sys.stderr)
        return EX_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
