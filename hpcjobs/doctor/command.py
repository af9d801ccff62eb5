"""``hpcjobs doctor [CONFIG] [--json] [--fast]``: the checks as a table (or JSON rows); exit 0
when nothing blocks, 2 when something does.  ``submission_blocker`` is what ``hpcjobs submit``
runs before it writes or queues anything (the fast checks, no TensorFlow import)."""
from __future__ import annotations

import json
import os
import sys

from ..errors import EX_OK, EX_USAGE
from ..rundir import default_run_dir
from . import checks
from .probe import probe


def add_arguments(parser):
    parser.add_argument("config", nargs="?", help="YAML config file (default: the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    parser.add_argument("--json", action="store_true", help="the checks as JSON rows")
    parser.add_argument("--fast", action="store_true",
                        help="only the checks that import no TensorFlow (those hpcjobs submit runs)")


def _config(args):
    from .. import config as config_mod

    if args.config:
        return config_mod.load(args.config, args.set)
    return config_mod.from_dict({}, "<defaults>", args.set)


def cmd_doctor(args) -> int:
    cfg = _config(args)
    run_dir = os.path.abspath(default_run_dir(args.run_dir, cfg.name))
    rows = checks.run(probe(cfg, run_dir, full=not args.fast), cfg, fast_only=args.fast)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(table(rows))
        n = len(checks.blockers(rows))
        print(f"{n} blocker(s): fix them before submitting" if n else "nothing blocks a submission")
    return EX_USAGE if checks.blockers(rows) else EX_OK


def table(rows) -> str:
    name_w = max([len(r.name) for r in rows] + [5])
    lines = [f"{'check':<{name_w}}  {'level':<7}  advice"]
    lines += [f"{r.name:<{name_w}}  {r.level:<7}  {r.message}" for r in rows]
    return "\n".join(lines)


def submission_blocker(cfg, run_dir: str) -> str | None:
    """The fast checks for ``hpcjobs submit``: warnings printed, the first blocker returned
    as one line (None when nothing blocks)."""
    p = probe(cfg, run_dir, where="submit")
    if not p.commands.get("sbatch"):
        return None  # no Slurm here: submit says so itself, in one line, when it calls sbatch
    rows = checks.run(p, cfg, fast_only=True)
    for r in rows:
        if r.level == checks.WARNING:
            print(f"hpcjobs: warning: {r.name}: {r.message}", file=sys.stderr)
    first = next(iter(checks.blockers(rows)), None)
    return f"{first.name}: {first.message} (hpcjobs doctor CONFIG shows every check; --no-check submits " \
           "anyway)" if first else None
