"""The command line: a table of commands, each in its package's ``command`` module, and
the errors mapped to exit codes, once.

Exit codes: 0 finished; 75 stopped cleanly with a checkpoint, more to do; 2 user
error (one line, no traceback); 1 anything else.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from dataclasses import dataclass

from .errors import EX_FAILURE, EX_INTERRUPTED, EX_USAGE, RunFailure, UserError, first_line


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # hpcjobs.<module> holds the command's function and its arguments
    function: str
    help: str
    config: bool = True  # a CONFIG argument first
    common: bool = True  # --set and --run-dir
    arguments: str | None = "add_arguments"  # the module's function that adds the command's own flags


COMMANDS = (
    Command("train", "train.command", "cmd_train", "train (resumes from the run directory's checkpoint)"),
    Command("prepare", "data.command", "cmd_prepare", "write the HDF5 sample store with stratified splits"),
    Command("infer", "infer.command", "cmd_infer", "batch inference with an exported model", config=False),
    Command("submit", "slurm.command", "cmd_submit", "submit training (or inference) to Slurm"),
    Command("evaluate", "evaluation.command", "cmd_evaluate",
            "per-class metrics of an exported model on labelled images", config=False),
    Command("export", "export.command", "cmd_export",
            "write a run's export bundle (formats, model card, parity checks)", config=False),
    Command("search", "search.command", "cmd_search",
            "hyperparameter search here, no Slurm (the config's search: section)"),
    Command("lr-find", "search.command", "cmd_lr_find",
            "learning-rate range test: lr_find.json, lr_find.csv, plots/lr_find.png", arguments=None),
    Command("weights", "models.command", "cmd_weights", "pretrained backbone weights (on a login node)",
            config=False, common=False),
    Command("doctor", "doctor.command", "cmd_doctor",
            "check the environment, the run directory and the time limit before a submission",
            config=False, common=False),
    Command("status", "slurm.command", "cmd_status", "progress of a run (or the table of a search)",
            config=False, common=False, arguments="add_status_arguments"),
    Command("runs", "slurm.command", "cmd_runs", "a table of every run under a folder (default runs/)",
            config=False, common=False, arguments="add_runs_arguments"),
    Command("cancel", "slurm.command", "cmd_cancel",
            "stop every Slurm job of a run with a checkpoint; no requeue, no next slot",
            config=False, common=False, arguments="add_cancel_arguments"),
    Command("clean", "train.command", "cmd_clean",
            "free the space of finished runs (keeps the export, the best epoch and the last checkpoint)",
            config=False, common=False, arguments="add_clean_arguments"),
)


def _common(sp, config: bool):
    if config:
        sp.add_argument("config", help="YAML config file")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. training.epochs=3 (repeatable)")
    sp.add_argument("--run-dir", help="run directory (default runs/<config name>)")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command of COMMANDS; importing their modules imports no TensorFlow.  ``only``: the
    command about to run, the one module imported (the others are listed by name and help), so a
    quick command such as ``runs`` or ``status`` starts in a fraction of a second."""
    p = argparse.ArgumentParser(prog="hpcjobs", description="Train Keras image classifiers on Slurm clusters.")
    sub = p.add_subparsers(dest="command", required=True)
    for c in COMMANDS:
        sp = sub.add_parser(c.name, help=c.help)
        if only is not None and c.name != only:
            continue
        module = importlib.import_module(f".{c.module}", __package__)
        if c.arguments:
            getattr(module, c.arguments)(sp)
        if c.common:
            _common(sp, c.config)
        sp.set_defaults(func=getattr(module, c.function))
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if any(c.name == chosen for c in COMMANDS) else None).parse_args(argv)
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
