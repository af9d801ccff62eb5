"""``hpcjobs infer``'s arguments, and the command: the config's infer: section with the flags on top."""
from __future__ import annotations

import dataclasses

from ..config import ConfigError, InferConfig
from ..rundir import default_run_dir
from .errors import InferError
from .results import merge, outputs_for
from .run import infer


def add_arguments(parser):
    parser.add_argument("config", nargs="?", help="YAML config with an infer: section (optional)")
    parser.add_argument("--model", help="run directory or export directory (infer.model; default: --run-dir)")
    parser.add_argument("--input", help="image folder tree, .csv/.json listing, hpcjobs .h5 store or .npz")
    parser.add_argument("--output", help="results file, .h5 or .csv (STEM.errors.csv lists unreadable inputs)")
    parser.add_argument("--split", choices=["test", "val", "train", "all"],
                        help="split of an .h5 store input (default test)")
    parser.add_argument("--shard", metavar="I/N",
                        help="run shard I of N (default: the Slurm array task or MPI rank, else 0/1)")
    parser.add_argument("--time-budget", metavar="DURATION",
                        help="stop after the chunk that would cross this (90s, 15m, 1h); exit 75")
    parser.add_argument("--merge", action="store_true", help="join the shards' part files into --output")
    parser.add_argument("--unsafe", action="store_true",
                        help="load a model.keras that holds code (a Lambda layer); only for a source you trust")
    parser.add_argument("--trust-code", action="store_true",
                        help="import the Python code an export carries (a model of the trainer's own, in code/); "
                             "importing code runs it: only for a source you trust")


def _settings(args) -> InferConfig:
    """The infer: section of the config (if any) with the command line's flags on top.
    The model: --model, else infer.model, else --run-dir, else the config's runs/<name>
    (``hpcjobs submit --infer`` always passes the run directory; an infer.model says more)."""
    from .. import config

    if args.config:
        cfg = config.load(args.config, args.set)
    else:
        cfg = config.from_dict({}, "hpcjobs infer", args.set)
    model = args.model or cfg.infer.model or (default_run_dir(args.run_dir, cfg.name) if args.config
                                              else args.run_dir)
    flags = {"model": model, "input": args.input, "output": args.output, "split": args.split,
             "shard": args.shard, "time_budget": args.time_budget, "trust_code": args.trust_code or None}
    try:
        return dataclasses.replace(cfg.infer, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        key, _, msg = str(e).partition(": ")
        raise ConfigError("command line", f"--{key.replace('_', '-')}", msg or str(e)) from None


def cmd_infer(args) -> int:
    cfg = _settings(args)
    if args.merge:
        if not cfg.output:
            raise InferError("--merge needs --output (the results file the shards were run with)")
        return merge(outputs_for(cfg.output, cfg.format, cfg.submission))
    return infer(cfg, unsafe=args.unsafe, trust_code=cfg.trust_code)
