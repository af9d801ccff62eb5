"""Render the job templates: ``slurm/<template>.sbatch`` filled by one function, :func:`render`.

A template is plain bash with ``{{placeholder}}`` marks and ``{{> partial}}`` marks; a
partial is ``slurm/_<partial>.sh`` (the job body every template shares: signal
forwarding and requeue), pasted in before the placeholders are filled.  Every value is
validated (by :class:`hpcjobs.config.SlurmConfig`, which refuses line breaks and other
control characters) and shell-quoted with ``shlex.quote``.  sbatch does not read
``#SBATCH`` lines as bash does (a backslash escapes even inside single quotes), so each
one is read back the way Slurm's own parser reads it (:func:`slurm_arguments`) and must
come out as exactly the one option that was meant; anything else is a ConfigError
naming the key.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from typing import Any, Optional

from ..config import Config, ConfigError, SlurmConfig
from ..units import format_slurm_mem, format_slurm_time, slurm_seconds

# A source checkout (or editable install) reads the repository's slurm/ folder; a wheel
# installs the same templates as data files under <prefix>/share/hpcjobs/slurm.
_CHECKOUT_TEMPLATES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "slurm")
TEMPLATE_DIR = _CHECKOUT_TEMPLATES if os.path.isfile(os.path.join(_CHECKOUT_TEMPLATES, "train.sbatch")) \
    else os.path.join(sys.prefix, "share", "hpcjobs", "slurm")
TEMPLATES = ("train", "infer", "search", "trials", "prepare")  # trials: workers of hpcjobs search
PARTIALS = ("job_body",)  # slurm/_<name>.sh, included by {{> name}}
SRUN_WAIT = 120  # seconds the other tasks of a step may outlive the first one to end

# Parameters of render(): the SlurmConfig fields that shape a script, plus those of _REQUIRED/_ALLOWED.
_SLURM_PARAMS = ("partition", "account", "qos", "nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task",
                 "mem", "time", "job_name", "modules", "activate", "extra_sbatch", "max_requeues",
                 "signal_margin", "srun_args", "launcher", "mpirun_args", "array_parallel")
_REQUIRED = {"train": ("python", "run_dir", "config"), "infer": ("python", "run_dir", "config"),
             "search": ("python", "run_dir", "array"), "trials": ("python", "run_dir", "config", "array"),
             "prepare": ("python", "run_dir", "config", "store")}
_ALLOWED = {
    "train": set(_SLURM_PARAMS) - {"array_parallel"} | {"python", "run_dir", "config", "on_stop"},
    "infer": set(_SLURM_PARAMS) - {"signal_margin"} | {"python", "run_dir", "config", "array", "merge"},
    "search": set(_SLURM_PARAMS) | {"python", "run_dir", "array", "tasks"},
    "trials": set(_SLURM_PARAMS) | {"python", "run_dir", "config", "array", "workers"},
    "prepare": set(_SLURM_PARAMS) - {"array_parallel"} | {"python", "run_dir", "config", "store"},
}
# search: what each array task trains, as a printf pattern of its task id under RUN_DIR
TASK_DIRS = {"trials": "trial-%03d", "folds": "folds/fold-%d"}
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_PARTIAL = re.compile(r"\{\{>\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _error(key: str, message: str) -> ConfigError:
    return ConfigError("hpcjobs submit", key, message)


def _package():
    """``hpcjobs.slurm`` itself.  ``read_template`` and ``_sbatch`` are looked up there when
    called, so replacing ``hpcjobs.slurm.read_template`` (or ``_sbatch``) still takes effect
    now that they live in submodules (the tests do, to feed in a broken template or fake sbatch)."""
    return sys.modules[__package__]


# --------------------------------------------------------------------------- Slurm's #SBATCH parser
_C_SPACE = " \t\n\v\f\r"  # C isspace() in the C locale
_SEPARATORS = ("hetjob", "packjob")  # words that split a script into heterogeneous job components


def slurm_arguments(text: str) -> list[str]:
    """The arguments sbatch reads from the text after ``#SBATCH``, by the rules of its own
    parser (``_get_argument`` in src/sbatch/opt.c; checked against sbatch 22.05), which are
    not bash's: ``'`` and ``"`` group, a backslash escapes the next character even inside
    quotes, an unquoted ``#`` ends the line, whitespace separates outside quotes.

    Raises ValueError where sbatch would refuse the script (an unmatched quote, an argument
    that starts with ``:``) or where a bare ``hetjob``/``packjob`` would split the job.
    """
    args: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _C_SPACE:
            i += 1
        if i == n:
            return args
        if text[i] == ":":
            raise ValueError("an argument starting with ':' (sbatch: Unexpected `:`)")
        word = re.match(rf"[^{re.escape(_C_SPACE)}]*", text[i:]).group(0)
        if word.lower() in _SEPARATORS:
            raise ValueError(f"a bare {word!r}, which starts a heterogeneous job component")
        arg, quote, escaped = [], None, False
        while i < n and (quote or text[i] not in _C_SPACE):
            c = text[i]
            i += 1
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
                continue
            elif quote:
                if c == quote:
                    quote = None
                    continue
            elif c in "'\"":
                quote = c
                continue
            elif c == "#":  # the rest of the line is a comment
                return args + (["".join(arg)] if arg else [])
            arg.append(c)
        if quote:
            raise ValueError(f"an unmatched {quote} (sbatch refuses the script)")
        if arg:
            args.append("".join(arg))


def _sbatch_line(key: str, opt: str, value: Any = None) -> str:
    """``#SBATCH opt=value`` (``#SBATCH -o value`` for a short option), shell-quoted, that
    Slurm's parser reads back as exactly that one option; else a ConfigError naming ``key``."""
    if value is None:
        line, meant = opt, [opt]
    elif opt.startswith("--"):
        line, meant = f"{opt}={shlex.quote(str(value))}", [f"{opt}={value}"]
    else:
        line, meant = f"{opt} {shlex.quote(str(value))}", [opt, str(value)]
    problem = _slurm_problem(line, meant)
    if problem:
        raise _error(key, f"{str(value if value is not None else opt)!r}: {problem}")
    return f"#SBATCH {line}"


def _slurm_problem(line: str, meant: list[str]) -> Optional[str]:
    """Why sbatch would not read ``#SBATCH <line>`` as the arguments ``meant``, or None."""
    if "\\" in line:
        return ("a backslash, which Slurm's #SBATCH parser reads as an escape even inside quotes "
                "(so the rest could become options of its own): leave it out")
    if any(word in line.lower() for word in _SEPARATORS):
        return (f"{' or '.join(_SEPARATORS)} in an #SBATCH line splits the job into heterogeneous components "
                "with some Slurm versions: choose another word")
    try:
        got = slurm_arguments(line)
    except ValueError as e:
        return f"Slurm's #SBATCH parser would find {e}"
    return None if got == meant else f"Slurm's #SBATCH parser would read {got!r}, not this one option"


# --------------------------------------------------------------------------- values
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


def _slurm_config(template: str, params: dict) -> SlurmConfig:
    """Check the parameter names and build the SlurmConfig their values describe."""
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
    for k in ("modules", "extra_sbatch", "srun_args", "mpirun_args"):
        if k in slurm_values:
            slurm_values[k] = tuple(slurm_values[k])
    if template == "infer":
        slurm_values["signal_margin"] = 1  # inference asks for no warning signal
    try:
        return SlurmConfig(**slurm_values)
    except (ValueError, TypeError) as e:
        raise _error("slurm", str(e)) from None


def _sbatch_block(template: str, s: SlurmConfig, run_dir: str, array: Optional[int], on_stop: str) -> str:
    sb = [_sbatch_line("slurm.job_name", "--job-name", s.job_name or "hpcjobs")]
    for name in ("partition", "account", "qos"):
        if getattr(s, name):
            sb.append(_sbatch_line(f"slurm.{name}", f"--{name}", getattr(s, name)))
    sb.append(_sbatch_line("slurm.nodes", "--nodes", s.nodes))
    sb.append(_sbatch_line("slurm.ntasks_per_node", "--ntasks-per-node", s.ntasks_per_node or 1))
    if s.gpus_per_node:
        sb.append(_sbatch_line("slurm.gpus_per_node", "--gpus-per-node", s.gpus_per_node))
    if s.cpus_per_task:
        sb.append(_sbatch_line("slurm.cpus_per_task", "--cpus-per-task", s.cpus_per_task))
    if s.mem:
        sb.append(_sbatch_line("slurm.mem", "--mem", format_slurm_mem(s.mem)))
    sb.append(_sbatch_line("slurm.time", "--time", format_slurm_time(s.time)))
    if array is not None:
        spec = f"0-{array - 1}" + (f"%{s.array_parallel}" if s.array_parallel else "")
        sb.append(_sbatch_line("slurm.array", "--array", spec))
        sb.append(_sbatch_line("run_dir", "--output", _log_path(run_dir, "%x-%A_%a.out")))
    else:
        sb.append(_sbatch_line("run_dir", "--output", _log_path(run_dir, "%x-%j.out")))
    sb.append(_sbatch_line("open_mode", "--open-mode", "append"))  # a requeued job adds to its log
    if template != "infer":
        sb.append(_sbatch_line("slurm.signal_margin", "--signal", f"B:USR1@{s.signal_margin}"))
        sb.append(_sbatch_line("on_stop", "--requeue" if on_stop == "requeue" else "--no-requeue"))
    for extra in s.extra_sbatch:
        opt, value = _option(extra)
        sb.append(_sbatch_line("slurm.extra_sbatch", opt, value))
    return "\n".join(sb)


def render(template: str, **params) -> str:
    """Fill ``slurm/<template>.sbatch`` (train, infer or search).

    Parameters: the SlurmConfig fields that shape a script (partition ... srun_args), and
    ``python`` (absolute path of the job's interpreter), ``run_dir`` (absolute), ``config``
    (train, infer: the resolved config the job reads), ``array`` (search, infer: number of
    tasks), ``on_stop`` (train: ``requeue``, or ``next-slot`` in a chain of time slots,
    ``renew`` in a chain that submits its own next slot), ``merge`` (infer: join the shards' part files),
    ``store`` (prepare: the store's absolute path).  An unknown parameter is an error that
    lists the valid ones; every value is validated and shell-quoted.
    """
    s = _slurm_config(template, params)
    python = _path("python", params["python"])
    run_dir = _path("run_dir", params["run_dir"]).rstrip("/") or "/"
    array = params.get("array")
    if array is not None and (isinstance(array, bool) or not isinstance(array, int) or array < 1):
        raise _error("array", f"{array!r}: must be a positive number of tasks")
    if params.get("merge") not in (None, False, True) or (params.get("merge") and array is not None):
        raise _error("merge", "true or false, and not for an array")
    on_stop = params.get("on_stop") or "requeue"
    if on_stop not in ("requeue", "next-slot", "renew"):
        raise _error("on_stop", f"{on_stop!r}: must be requeue, next-slot or renew")
    if s.launcher == "mpirun":  # one rank per Slurm task; TensorFlow's threads want every core of the task
        launch = ["mpirun", "--bind-to", "none"] + [w for a in s.mpirun_args for w in a.split()]  # --mca btl tcp
    else:
        launch = ["srun", f"--wait={SRUN_WAIT}"] + [w for a in s.srun_args for w in _option_words(a)]
    values = {
        "sbatch": _sbatch_block(template, s, run_dir, array, on_stop),
        "python": shlex.quote(python),
        "run_dir": shlex.quote(run_dir),
        "launch": " ".join(shlex.quote(w) for w in launch),
        "setup": _setup_lines(s),
        "max_requeues": str(int(s.max_requeues)),
        "on_stop": shlex.quote(on_stop),
        "infer_args": "--merge" if params.get("merge") else "",
        "workers": str(_workers(params.get("workers"))),
        "task_dir": shlex.quote(_task_dir(params.get("tasks"))),
    }
    if "config" in params and params["config"] is not None:
        values["config"] = shlex.quote(_path("config", params["config"]))
    if params.get("store") is not None:  # prepare: the store it writes
        values["store"] = shlex.quote(_path("store", params["store"]))
    return _fill(template, values)


def _task_dir(tasks) -> str:
    """search: the array tasks' run directories: trials (trial-NNN) or folds (folds/fold-I)."""
    if tasks is None:
        tasks = "trials"
    if tasks not in TASK_DIRS:
        raise _error("tasks", f"{tasks!r}: must be {' or '.join(TASK_DIRS)}")
    return TASK_DIRS[tasks]


def _workers(value) -> int:
    """trials: search workers per array task (--trials-per-node)."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise _error("workers", f"{value!r}: must be a number of workers from 1 to 64")
    return value


def _fill(template: str, values: dict) -> str:
    """The template with its partials pasted in and every placeholder replaced."""
    def include(m):
        name = m.group(1)
        if name not in PARTIALS:
            raise _error("template", f"slurm/{template}.sbatch includes unknown partial {{{{> {name}}}}}; "
                                     f"valid: {', '.join(PARTIALS)}")
        text = read_partial(name)
        if _PARTIAL.search(text):
            raise _error("template", f"slurm/_{name}.sh: a partial cannot include another")
        return text[:-1] if text.endswith("\n") else text  # the mark's own line ends it

    def fill(m):
        name = m.group(1)
        if name not in values:
            raise _error("template", f"slurm/{template}.sbatch uses unknown placeholder {{{{{name}}}}}; "
                                     f"valid: {', '.join(sorted(values))}")
        return values[name]

    text = _PARTIAL.sub(include, _package().read_template(template))
    return _PLACEHOLDER.sub(fill, text)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        raise _error("template", f"{path}: missing (reinstall hpcjobs: its wheel installs the templates there)") \
            from None


def read_template(name: str) -> str:
    return _read(os.path.join(TEMPLATE_DIR, f"{name}.sbatch"))


def read_partial(name: str) -> str:
    return _read(os.path.join(TEMPLATE_DIR, f"_{name}.sh"))


# --------------------------------------------------------------------------- from a config
def signal_margin(s: SlurmConfig, run_dir: str) -> int:
    """``slurm.signal_margin`` in seconds; ``auto``: what the run's measured sessions need
    (``hpcjobs.cluster.costs``), else an estimate from its checkpoint, else the default;
    never as long as the time limit."""
    if s.signal_margin != "auto":
        return s.signal_margin
    from ..cluster import costs
    from ..rundir import RunDir

    margin = costs.auto_margin(costs.for_run(run_dir, RunDir(run_dir).read_record().to_dict()))
    limit = slurm_seconds(s.slot or s.time)
    if margin >= limit:
        raise _error("slurm.signal_margin", f"auto: a stop needs {margin} s (measured sessions of {run_dir}), "
                                            f"not below the time limit ({int(limit)} s): raise slurm.time")
    return margin


def template_params(cfg: Config, s: SlurmConfig, kind: str, run_dir: str, config_path: str | None) -> dict:
    """render() parameters for one job of ``kind`` from a config and its (overridden) slurm section."""
    horovod = cfg.distribute.strategy == "horovod"
    ntasks = s.ntasks_per_node or (max(1, s.gpus_per_node) if horovod else 1)
    params = dict(partition=s.partition, account=s.account, qos=s.qos, nodes=s.nodes, ntasks_per_node=ntasks,
                  gpus_per_node=s.gpus_per_node, cpus_per_task=s.cpus_per_task, mem=s.mem, time=s.time,
                  job_name=s.job_name or cfg.name, modules=s.modules, activate=s.activate,
                  extra_sbatch=s.extra_sbatch, srun_args=s.srun_args, launcher=s.launcher,
                  mpirun_args=s.mpirun_args, python=s.python or sys.executable,
                  run_dir=run_dir)
    if kind == "infer":
        params.update(partition=s.infer_partition or s.partition, time=s.infer_time or s.time,
                      job_name=f"{s.job_name or cfg.name}-infer", config=config_path, max_requeues=s.max_requeues)
        if s.array:
            params.update(array=s.array, array_parallel=s.array_parallel)
    elif kind == "prepare":  # one CPU task: the processes are its --cpus-per-task
        params.update(partition=s.prepare_partition or s.partition, time=s.prepare_time or s.time,
                      job_name=f"{s.job_name or cfg.name}-prepare", config=config_path, nodes=1, ntasks_per_node=1,
                      gpus_per_node=0, max_requeues=s.max_requeues, signal_margin=signal_margin(s, run_dir),
                      store=store_path(cfg))
    elif kind == "search":
        params.update(max_requeues=s.max_requeues, signal_margin=signal_margin(s, run_dir), array=len(trials(cfg, s)),
                      array_parallel=s.array_parallel)
    else:
        params.update(max_requeues=s.max_requeues, signal_margin=signal_margin(s, run_dir), config=config_path,
                      on_stop=("next-slot" if s.slot_count else "renew") if s.slot else "requeue")
    return params


def store_path(cfg: Config) -> str:
    """The store a prepare job writes and a training job after it reads: data.store, else
    stores/<name>.h5, absolute (against the directory ``submit`` runs in)."""
    return os.path.abspath(cfg.data.store or os.path.join("stores", f"{cfg.name}.h5"))


def trials(cfg: Config, s: SlurmConfig) -> list[list[str]]:
    """The ``--set`` overrides of each task of an ``--array N`` of repeats: consecutive seeds."""
    return [[f"training.seed={cfg.training.seed + i}"] for i in range(max(s.array, 1))]
