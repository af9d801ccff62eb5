"""Slurm: render the job templates, submit them, requeue, and report job states.

The templates in ``slurm/*.sbatch`` are data: plain bash with ``{{placeholder}}``
marks, filled by one function, :func:`render`.  Every value that reaches a script
is validated (by :class:`hpcjobs.config.SlurmConfig`, which refuses line breaks and
other control characters) and shell-quoted with ``shlex.quote``; sbatch reads
``#SBATCH`` lines with the same quoting rules.

``hpcjobs submit CONFIG`` writes the rendered script and the resolved config into
``RUN/`` and ``RUN/slurm/``, calls sbatch and records the job in
``RUN/slurm/jobs.json``; :func:`job_states` reads that record back.  :func:`submit`
is the Python API, built on submitit.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Optional

import submitit.helpers

from . import compat
from .config import Config, ConfigError, SlurmConfig, dump, to_dict
from .errors import EX_TEMPFAIL
from .rundir import atomic_write
from .units import format_slurm_mem, format_slurm_time, slurm_seconds

# A source checkout (or editable install) reads the repository's slurm/ folder; a wheel
# installs the same templates as data files under <prefix>/share/hpcjobs/slurm.
_CHECKOUT_TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slurm")
TEMPLATE_DIR = _CHECKOUT_TEMPLATES if os.path.isfile(os.path.join(_CHECKOUT_TEMPLATES, "train.sbatch")) \
    else os.path.join(sys.prefix, "share", "hpcjobs", "slurm")
TEMPLATES = ("train", "infer", "search")
SRUN_WAIT = 120  # seconds the other tasks of a step may outlive the first one to end

# Parameters of render(): the SlurmConfig fields that shape a script, plus those of _REQUIRED/_ALLOWED.
_SLURM_PARAMS = ("partition", "account", "qos", "nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task",
                 "mem", "time", "job_name", "modules", "activate", "extra_sbatch", "max_requeues",
                 "signal_margin", "srun_args", "array_parallel")
_REQUIRED = {"train": ("python", "run_dir", "config"), "infer": ("python", "run_dir", "config"),
             "search": ("python", "run_dir", "array")}
_ALLOWED = {
    "train": set(_SLURM_PARAMS) - {"array_parallel"} | {"python", "run_dir", "config", "on_stop"},
    "infer": set(_SLURM_PARAMS) - {"signal_margin"} | {"python", "run_dir", "config", "array", "merge"},
    "search": set(_SLURM_PARAMS) | {"python", "run_dir", "array"},
}
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _error(key: str, message: str) -> ConfigError:
    return ConfigError("hpcjobs submit", key, message)


# --------------------------------------------------------------------------- rendering
def _path(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _error(name, f"{value!r}: not a usable path (empty, or a line break or control character)")
    if not os.path.isabs(value):
        raise _error(name, f"{value!r}: must be an absolute path")
    return value


def _option(text: str) -> tuple[str, Optional[str]]:
    """``--opt=value``, ``--opt value``, ``-C value`` or ``#SBATCH --opt=value`` -> (option, value)."""
    text = re.sub(r"^#SBATCH\s+", "", text.strip())
    m = re.fullmatch(r"(--?[A-Za-z][A-Za-z0-9-]*)(?:[=\s]\s*(.*))?", text, re.S)
    if not m:
        raise _error("option", f"{text!r}: expected an option like --constraint=v100")
    return m.group(1), m.group(2)


def _option_words(text: str) -> list[str]:
    opt, value = _option(text)
    if value is None:
        return [opt]
    return [f"{opt}={value}"] if opt.startswith("--") else [opt, value]


def _sbatch_line(opt: str, value: Any = None) -> str:
    if value is None:
        return f"#SBATCH {opt}"
    sep = "=" if opt.startswith("--") else " "
    return f"#SBATCH {opt}{sep}{shlex.quote(str(value))}"


def _log_path(run_dir: str, pattern: str) -> str:
    """A log path for #SBATCH --output: the run directory's own '%' escaped as '%%'."""
    if "\\" in run_dir:
        raise _error("run_dir", f"{run_dir!r}: a backslash would switch off Slurm's %j in log names")
    return os.path.join(run_dir.replace("%", "%%"), "slurm", pattern)


def _setup_lines(s: SlurmConfig) -> str:
    lines = [f"module load {shlex.quote(m)}" for m in s.modules]
    if s.activate:
        a = s.activate
        if "/" in a or a.endswith("activate"):
            lines.append(f"source {shlex.quote(a)}")
        else:  # a conda environment's name
            lines.append('eval "$(conda shell.bash hook)"')
            lines.append(f"conda activate {shlex.quote(a)}")
    return "\n".join(lines) if lines else "# (no modules or environment to load)"


def render(template: str, **params) -> str:
    """Fill ``slurm/<template>.sbatch`` (train, infer or search).

    Parameters: the SlurmConfig fields that shape a script (partition ... srun_args), and
    ``python`` (absolute path of the job's interpreter), ``run_dir`` (absolute), ``config``
    (train, infer: the resolved config the job reads), ``array`` (search, infer: number of
    tasks), ``on_stop`` (train: ``requeue``, or ``next-slot`` in a chain of time slots),
    ``merge`` (infer: join the shards' part files).  An unknown parameter is an error that
    lists the valid ones; every value is validated and shell-quoted.
    """
    if template not in TEMPLATES:
        raise _error("template", f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
    allowed = _ALLOWED[template]
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise _error(unknown[0], f"unknown parameter for the {template} template; valid: {', '.join(sorted(allowed))}")
    missing = [p for p in _REQUIRED[template] if params.get(p) is None]
    if missing:
        raise _error(missing[0], f"required by the {template} template")
    slurm_values = {k: v for k, v in params.items() if k in _SLURM_PARAMS and v is not None}
    for k in ("modules", "extra_sbatch", "srun_args"):
        if k in slurm_values:
            slurm_values[k] = tuple(slurm_values[k])
    if template == "infer":
        slurm_values["signal_margin"] = 1  # inference asks for no warning signal
    try:
        s = SlurmConfig(**slurm_values)
    except (ValueError, TypeError) as e:
        raise _error("slurm", str(e)) from None
    python = _path("python", params["python"])
    run_dir = _path("run_dir", params["run_dir"]).rstrip("/") or "/"
    array = params.get("array")
    if array is not None and (isinstance(array, bool) or not isinstance(array, int) or array < 1):
        raise _error("array", f"{array!r}: must be a positive number of tasks")
    if params.get("merge") not in (None, False, True) or (params.get("merge") and array is not None):
        raise _error("merge", "true or false, and not for an array")
    on_stop = params.get("on_stop") or "requeue"
    if on_stop not in ("requeue", "next-slot"):
        raise _error("on_stop", f"{on_stop!r}: must be requeue or next-slot")

    sb = [_sbatch_line("--job-name", s.job_name or "hpcjobs")]
    for name in ("partition", "account", "qos"):
        if getattr(s, name):
            sb.append(_sbatch_line(f"--{name}", getattr(s, name)))
    sb.append(_sbatch_line("--nodes", s.nodes))
    sb.append(_sbatch_line("--ntasks-per-node", s.ntasks_per_node or 1))
    if s.gpus_per_node:
        sb.append(_sbatch_line("--gpus-per-node", s.gpus_per_node))
    if s.cpus_per_task:
        sb.append(_sbatch_line("--cpus-per-task", s.cpus_per_task))
    if s.mem:
        sb.append(_sbatch_line("--mem", format_slurm_mem(s.mem)))
    sb.append(_sbatch_line("--time", format_slurm_time(s.time)))
    if array is not None:
        spec = f"0-{array - 1}" + (f"%{s.array_parallel}" if s.array_parallel else "")
        sb.append(_sbatch_line("--array", spec))
        sb.append(_sbatch_line("--output", _log_path(run_dir, "%x-%A_%a.out")))
    else:
        sb.append(_sbatch_line("--output", _log_path(run_dir, "%x-%j.out")))
    sb.append(_sbatch_line("--open-mode", "append"))  # a requeued job adds to its log
    if template != "infer":
        sb.append(_sbatch_line("--signal", f"B:USR1@{s.signal_margin}"))
        sb.append(_sbatch_line("--requeue" if on_stop == "requeue" else "--no-requeue"))
    for extra in s.extra_sbatch:
        opt, value = _option(extra)
        sb.append(_sbatch_line(opt, value))

    srun = [f"--wait={SRUN_WAIT}"] + [w for a in s.srun_args for w in _option_words(a)]
    values = {
        "sbatch": "\n".join(sb),
        "python": shlex.quote(python),
        "run_dir": shlex.quote(run_dir),
        "srun_args": " ".join(shlex.quote(w) for w in srun),
        "setup": _setup_lines(s),
        "max_requeues": str(int(s.max_requeues)),
        "on_stop": shlex.quote(on_stop),
        "infer_args": "--merge" if params.get("merge") else "",
    }
    if "config" in params and params["config"] is not None:
        values["config"] = shlex.quote(_path("config", params["config"]))
    text = read_template(template)

    def fill(m):
        name = m.group(1)
        if name not in values:
            raise _error("template", f"slurm/{template}.sbatch uses unknown placeholder {{{{{name}}}}}; "
                                     f"valid: {', '.join(sorted(values))}")
        return values[name]

    return _PLACEHOLDER.sub(fill, text)


def read_template(name: str) -> str:
    path = os.path.join(TEMPLATE_DIR, f"{name}.sbatch")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        raise _error("template", f"{path}: missing (reinstall hpcjobs: its wheel installs the templates there)") \
            from None


# --------------------------------------------------------------------------- from a config
def slurm_section(cfg: Config, overrides: dict) -> SlurmConfig:
    """The config's slurm section with command-line values (not None) on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    for k in ("modules", "extra_sbatch", "srun_args", "search"):
        if k in given:
            given[k] = tuple(given[k])
    if given.get("slot") is not None:
        given["time"] = given["slot"]
    try:
        s = dataclasses.replace(cfg.slurm, **given)
    except ValueError as e:
        name, _, msg = str(e).partition(": ")
        flag = next((f for f, field_name, _ in _FLAGS if field_name == name), None) if name in given else None
        flag = flag or f"slurm.{name}"
        raise _error(flag, msg or str(e)) from None
    if s.slot is not None and s.time != s.slot:
        s = dataclasses.replace(s, time=s.slot)
    return s


def template_params(cfg: Config, s: SlurmConfig, kind: str, run_dir: str, config_path: str | None) -> dict:
    """render() parameters for one job of ``kind`` from a config and its (overridden) slurm section."""
    horovod = cfg.distribute.strategy == "horovod"
    ntasks = s.ntasks_per_node or (max(1, s.gpus_per_node) if horovod else 1)
    params = dict(partition=s.partition, account=s.account, qos=s.qos, nodes=s.nodes, ntasks_per_node=ntasks,
                  gpus_per_node=s.gpus_per_node, cpus_per_task=s.cpus_per_task, mem=s.mem, time=s.time,
                  job_name=s.job_name or cfg.name, modules=s.modules, activate=s.activate,
                  extra_sbatch=s.extra_sbatch, srun_args=s.srun_args, python=s.python or sys.executable,
                  run_dir=run_dir)
    if kind == "infer":
        params.update(partition=s.infer_partition or s.partition, time=s.infer_time or s.time,
                      job_name=f"{s.job_name or cfg.name}-infer", config=config_path, max_requeues=s.max_requeues)
        if s.array:
            params.update(array=s.array, array_parallel=s.array_parallel)
    elif kind == "search":
        params.update(max_requeues=s.max_requeues, signal_margin=s.signal_margin, array=len(trials(cfg, s)),
                      array_parallel=s.array_parallel)
    else:
        params.update(max_requeues=s.max_requeues, signal_margin=s.signal_margin, config=config_path,
                      on_stop="next-slot" if s.slot else "requeue")
    return params


def trials(cfg: Config, s: SlurmConfig) -> list[list[str]]:
    """The ``--set`` overrides of each array task: repeats with seeds, or the search grid."""
    if s.search:
        axes = []
        for entry in s.search:
            key, _, values = entry.partition("=")
            axes.append([f"{key}={v.strip()}" for v in values.split(",") if v.strip()])
        return [list(combo) for combo in itertools.product(*axes)]
    return [[f"training.seed={cfg.training.seed + i}"] for i in range(max(s.array, 1))]


# --------------------------------------------------------------------------- the command
_FLAGS = [  # (flag, SlurmConfig field, argparse keywords)
    ("--partition", "partition", dict(metavar="NAME")),
    ("--account", "account", dict(metavar="NAME")),
    ("--qos", "qos", dict(metavar="NAME")),
    ("--nodes", "nodes", dict(type=int, metavar="N")),
    ("--ntasks-per-node", "ntasks_per_node", dict(type=int, metavar="N")),
    ("--gpus-per-node", "gpus_per_node", dict(type=int, metavar="N")),
    ("--cpus-per-task", "cpus_per_task", dict(type=int, metavar="N")),
    ("--mem", "mem", dict(metavar="SIZE", help="memory per node, e.g. 64G")),
    ("--time", "time", dict(metavar="TIME", help="time limit, e.g. 04:00:00 or 2-00:00:00")),
    ("--job-name", "job_name", dict(metavar="NAME")),
    ("--module", "modules", dict(action="append", metavar="MODULE", help="module to load (repeatable)")),
    ("--activate", "activate", dict(metavar="PATH", help="environment to activate: venv activate script or conda env")),
    ("--sbatch", "extra_sbatch", dict(action="append", metavar="OPTION",
                                      help="extra #SBATCH option, e.g. --constraint=v100 (repeatable)")),
    ("--srun-arg", "srun_args", dict(action="append", metavar="OPTION", help="extra srun option (repeatable)")),
    ("--max-requeues", "max_requeues", dict(type=int, metavar="N")),
    ("--signal-margin", "signal_margin", dict(type=int, metavar="SECONDS",
                                              help="USR1 this long before the time limit")),
    ("--python", "python", dict(metavar="PATH", help="interpreter for the job (default: this one)")),
    ("--array", "array", dict(type=int, metavar="N", help="job array of N tasks (training: N seeds)")),
    ("--parallel", "array_parallel", dict(type=int, metavar="N", help="at most N array tasks at once")),
    ("--search", "search", dict(action="append", metavar="KEY=V1,V2",
                                help="grid search over a config key, as a job array (repeatable)")),
    ("--slot", "slot", dict(metavar="TIME", help="submit a chain of jobs, each with this --time")),
    ("--every", "slot_every", dict(metavar="PERIOD", help="slot period: day, week or a duration (default day)")),
    ("--at", "slot_at", dict(metavar="HH:MM", help="time of day of the first slot")),
    ("--count", "slot_count", dict(type=int, metavar="N", help="number of slots (default 7)")),
]


def add_arguments(parser):
    g = parser.add_argument_group("Slurm (each overrides the config's slurm section)")
    for flag, field_name, kw in _FLAGS:
        g.add_argument(flag, dest=f"slurm_{field_name}", default=None, **kw)
    parser.add_argument("--infer", action="store_true", help="submit batch inference (slurm/infer.sbatch)")
    parser.add_argument("--dry-run", action="store_true", help="print the script(s); write and submit nothing")


def _overrides(args) -> dict:
    return {field_name: getattr(args, f"slurm_{field_name}", None) for _, field_name, _ in _FLAGS}


def slot_begins(s: SlurmConfig, now: _dt.datetime | None = None) -> list[_dt.datetime]:
    """Start times of a chain of slots: the next ``slot_at``, then every ``slot_every``."""
    if not s.slot_at:
        raise _error("--at", "a chain of slots needs the first slot's time of day, e.g. --at 22:00")
    now = now or _dt.datetime.now().replace(microsecond=0)
    parts = [int(p) for p in s.slot_at.strip().split(":")]
    first = now.replace(hour=parts[0], minute=parts[1], second=parts[2] if len(parts) > 2 else 0)
    if first <= now:
        first += _dt.timedelta(days=1)
    step = {"day": 86400, "week": 7 * 86400}.get(s.slot_every) or slurm_seconds(s.slot_every)
    return [first + _dt.timedelta(seconds=step * i) for i in range(s.slot_count)]


def _sbatch_binary() -> str:
    path = shutil.which("sbatch")
    if not path:
        raise _error("sbatch", "not found on PATH: run this on a Slurm login node (or load its module), or for "
                               "tests start slurm/local-cluster.sh start and export SLURM_CONF as it says")
    return path


def _sbatch(script: str, extra: list[str] = ()) -> str:
    cmd = [_sbatch_binary(), "--parsable", *extra, script]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise _error("sbatch", "did not answer within 120 s (is slurmctld reachable?)") from None
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        raise _error("sbatch", msg)
    return p.stdout.strip().splitlines()[-1].split(";")[0]


def _record(run_dir: str, entry: dict):
    path = os.path.join(run_dir, "slurm", "jobs.json")
    jobs = read_jobs(run_dir)
    jobs.append(entry)
    atomic_write(path, json.dumps(jobs, indent=2) + "\n", fsync=False)


def read_jobs(run_dir: str) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "slurm", "jobs.json"), encoding="utf-8") as f:
            jobs = json.load(f)
        return jobs if isinstance(jobs, list) else []
    except (OSError, json.JSONDecodeError):
        return []


def cmd_submit(args) -> int:
    from . import config as config_mod

    cfg = config_mod.load(args.config, args.set)
    s = slurm_section(cfg, _overrides(args))
    cfg = dataclasses.replace(cfg, slurm=s)
    run_dir = os.path.abspath(args.run_dir or os.path.join("runs", cfg.name))
    kind = "infer" if args.infer else ("search" if (s.array or s.search) else "train")
    if s.slot and kind != "train":
        raise _error("--slot", "a chain of time slots runs one training, not --infer, --array or --search")
    if kind == "search":
        trial_sets = trials(cfg, s)
        trial_cfgs = [config_mod.from_dict(config_mod.apply_overrides(to_dict(cfg), sets), f"{args.config} (trial {i})")
                      for i, sets in enumerate(trial_sets)]
    config_path = os.path.join(run_dir, "infer-config.yaml" if kind == "infer" else "config.yaml")
    params = template_params(cfg, s, kind, run_dir, None if kind == "search" else config_path)
    script = render(kind, **params)
    script_path = os.path.join(run_dir, "slurm", f"{kind}.sbatch")
    merge_script = None
    if kind == "infer" and s.array:
        merge_params = {k: v for k, v in params.items() if k not in ("array", "array_parallel")}
        merge_params.update(nodes=1, ntasks_per_node=1, gpus_per_node=0, merge=True,
                            job_name=f"{params['job_name']}-merge")
        merge_script = render("infer", **merge_params)
    begins = slot_begins(s) if s.slot else []
    job_name = params["job_name"]

    if args.dry_run:
        print(script, end="")
        if kind == "search":
            for i, sets in enumerate(trial_sets):
                print(f"# trial-{i:03d}: " + " ".join(f"--set {shlex.quote(x)}" for x in sets))
        for i, begin in enumerate(begins):
            dep = "" if i == 0 else f" --dependency=afterany:<job {i}>"
            print(f"# slot {i + 1}/{len(begins)}: sbatch --begin={begin.isoformat()}{dep} {shlex.quote(script_path)}")
        if merge_script:
            print("# then, after the array (sbatch --dependency=afterok:<array job>):")
            print(merge_script, end="")
        return 0

    os.makedirs(os.path.join(run_dir, "slurm"), exist_ok=True)
    atomic_write(config_path, dump(cfg), fsync=False)
    if kind == "search":
        for i, (sets, tcfg) in enumerate(zip(trial_sets, trial_cfgs)):
            atomic_write(os.path.join(run_dir, f"trial-{i:03d}", "config.yaml"), dump(tcfg), fsync=False)
        atomic_write(os.path.join(run_dir, "trials.json"),
                     json.dumps([{"trial": f"trial-{i:03d}", "set": sets} for i, sets in enumerate(trial_sets)],
                                indent=2) + "\n", fsync=False)
    atomic_write(script_path, script, fsync=False)
    os.chmod(script_path, 0o755)

    def queue(kind_: str, path: str, name: str, extra: list[str], array: bool) -> str:
        """sbatch one script, record the job in jobs.json at once, say where its log goes."""
        job_id = _sbatch(path, extra)
        log = os.path.join(run_dir, "slurm", f"{name}-{job_id}_<task>.out" if array else f"{name}-{job_id}.out")
        _record(run_dir, dict(job_id=job_id, kind=kind_, script=path, log=log, sbatch_args=extra,
                              submitted=time.time()))
        when = "".join(f" ({a.replace('--begin=', 'from ').replace('--dependency=', 'after ')})" for a in extra)
        print(f"submitted {kind_} job {job_id}{when}\n  log: {log}")
        return job_id

    is_array = kind != "train" and bool(params.get("array"))
    if begins:
        previous = None
        for begin in begins:
            extra = [f"--begin={begin.isoformat()}"] + ([f"--dependency=afterany:{previous}"] if previous else [])
            previous = queue(kind, script_path, job_name, extra, False)
    else:
        first = queue(kind, script_path, job_name, [], is_array)
    if merge_script:
        merge_path = os.path.join(run_dir, "slurm", "infer-merge.sbatch")
        atomic_write(merge_path, merge_script, fsync=False)
        os.chmod(merge_path, 0o755)
        queue("infer-merge", merge_path, f"{job_name}-merge", [f"--dependency=afterok:{first}"], False)
    print(f"  script: {script_path}\n  status: hpcjobs status {run_dir}")
    if kind == "train" and _finished(run_dir):
        print(f"note: {run_dir} is finished already, so the job will exit at once; "
              "give another --run-dir to train again")
    return 0


def _finished(run_dir: str) -> bool:
    try:
        with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
            return json.load(f).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------- job states
def _run(cmd: list[str]) -> Optional[subprocess.CompletedProcess]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None


def job_states(run_dir: str) -> list[str]:
    """One line per job recorded in RUN/slurm/jobs.json: id, kind, state (from squeue, else sacct)."""
    jobs = read_jobs(run_dir)
    lines = []
    for job in jobs:
        job_id = str(job.get("job_id", "?"))
        kind = job.get("kind", "?")
        states = _squeue_states(job_id)
        if not states:
            states = _sacct_states(job_id)
        if states:
            lines.append(f"job {job_id} ({kind}): " + ", ".join(states))
        else:
            lines.append(f"job {job_id} ({kind}): unknown (no longer in squeue; no accounting)"
                         if shutil.which("squeue") else f"job {job_id} ({kind}): unknown (no Slurm commands here)")
    return lines


def _query_rows(cmd: list[str], fields: int) -> list[list[str]]:
    """The ``|``-separated rows a Slurm query prints; none if the command is missing or fails."""
    if not shutil.which(cmd[0]):
        return []
    p = _run(cmd)
    if p is None or p.returncode != 0:
        return []
    return [(line.split("|") + [""] * fields)[:fields] for line in p.stdout.strip().splitlines()]


def _squeue_states(job_id: str) -> list[str]:
    out = []
    for jid, state, elapsed, limit, where, reason in _query_rows(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i|%T|%M|%l|%R|%r"], 6):
        detail = f"{state} {elapsed}/{limit}"
        if state == "RUNNING":
            detail += f" on {where}"
        elif reason and reason not in ("None", "(null)"):
            detail += f" ({reason})"
        out.append(detail if jid == job_id else f"{jid} {detail}")
    return out


def _sacct_states(job_id: str) -> list[str]:
    out = []
    for jid, state, elapsed, code in _query_rows(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,Elapsed,ExitCode"], 4):
        detail = f"{state} {elapsed} exit {code}"
        out.append(detail if jid == job_id else f"{jid} {detail}")
    return out


# --------------------------------------------------------------------------- submitit
class TrainCall(submitit.helpers.Checkpointable):
    """A checkpointable training callable for submitit; runs ``train`` in the job's process.

    Near the time limit submitit's signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)
    is turned into USR1 for the training loop, which finishes its compiled call, checkpoints
    and returns 75; then submitit's own handler checkpoints this callable (``checkpoint``
    returns a DelayedSubmission of the same call) and requeues the job, whose next run
    resumes from the run directory's checkpoint.
    """

    def __init__(self, config: dict, run_dir: str):
        self.config = config
        self.run_dir = run_dir

    def __call__(self) -> int:
        from .config import from_dict
        from .train import train

        cfg = from_dict(self.config, "<submitted config>")
        usr_sig, saved = compat.submitit_signal()
        if usr_sig is not None and usr_sig != signal.SIGUSR1:
            signal.signal(usr_sig, lambda signum, frame: os.kill(os.getpid(), signal.SIGUSR1))
        try:
            rc = train(cfg, self.run_dir)
        finally:
            if usr_sig is not None and usr_sig != signal.SIGUSR1:
                signal.signal(usr_sig, saved)
        if rc == EX_TEMPFAIL and getattr(saved, "__func__", None) is compat.submitit_requeue_handler():
            # submitit's own handler: checkpoint this call (see checkpoint()), requeue the job, exit
            saved(usr_sig, None)
        return rc

    def checkpoint(self, *args, **kwargs):
        """Requeue the same call: the training resumes from the run directory's checkpoint."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit(config, run_dir: str, **slurm_overrides):
    """Submit training through submitit; returns the submitit Job.

    ``config`` is a Config or a path; ``slurm_overrides`` are SlurmConfig fields.  The job
    runs ``hpcjobs.train.train`` in-process on every task (one per node, or per GPU with
    Horovod), resumes from the run directory's checkpoint, and is requeued on a timeout.
    """
    import submitit

    from . import config as config_mod

    cfg = config_mod.load(config) if isinstance(config, (str, os.PathLike)) else config
    unknown = sorted(set(slurm_overrides) - {f.name for f in dataclasses.fields(SlurmConfig)})
    if unknown:
        raise _error(unknown[0], "unknown slurm setting; valid: "
                     + ", ".join(f.name for f in dataclasses.fields(SlurmConfig)))
    s = slurm_section(cfg, slurm_overrides)
    cfg = dataclasses.replace(cfg, slurm=s)
    run_dir = os.path.abspath(run_dir)
    params = template_params(cfg, s, "train", run_dir, os.path.join(run_dir, "config.yaml"))
    render("train", **params)  # the same validation as hpcjobs submit
    _sbatch_binary()
    folder = os.path.join(run_dir, "slurm", "submitit")
    os.makedirs(folder, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=s.max_requeues,
                                     slurm_python=shlex.quote(s.python or sys.executable))
    additional = {}
    for extra in s.extra_sbatch:
        opt, value = _option(extra)
        if not opt.startswith("--"):
            raise _error("extra_sbatch", f"{extra!r}: use the long option form with submitit")
        additional[opt[2:].replace("-", "_")] = True if value is None else value
    setup = [line for line in _setup_lines(s).splitlines() if not line.startswith("#")]
    kw = dict(name=params["job_name"], nodes=s.nodes, tasks_per_node=params["ntasks_per_node"],
              timeout_min=max(1, int(-(-slurm_seconds(s.time) // 60))), slurm_signal_delay_s=s.signal_margin,
              slurm_setup=setup, slurm_additional_parameters=additional)
    for name in ("partition", "account", "qos"):
        if getattr(s, name):
            kw[f"slurm_{name}"] = getattr(s, name)
    if s.mem:
        kw["slurm_mem"] = format_slurm_mem(s.mem)
    if s.gpus_per_node:
        kw["gpus_per_node"] = s.gpus_per_node
    if s.cpus_per_task:
        kw["cpus_per_task"] = s.cpus_per_task
    executor.update_parameters(**kw)
    atomic_write(os.path.join(run_dir, "config.yaml"), dump(cfg), fsync=False)
    job = executor.submit(TrainCall(to_dict(cfg), run_dir))
    _record(run_dir, dict(job_id=str(job.job_id), kind="submitit", script=None,
                          log=str(job.paths.stdout), sbatch_args=[], submitted=time.time()))
    return job
