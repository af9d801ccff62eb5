"""``hpcjobs submit CONFIG``: the Slurm flags, and the command that renders, writes and queues; and
``hpcjobs status RUN``: a run's record (run.json) and its Slurm jobs, or the table of a search.

The command writes the rendered script and the resolved config into ``RUN/`` and
``RUN/slurm/``, calls sbatch and records each job in ``RUN/slurm/jobs.json``.

Each flag overrides one field of :class:`hpcjobs.config.SlurmConfig` (``options.FLAGS``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from typing import Optional

from ..config import Config, SlurmConfig, dump, to_dict
from ..errors import EX_USAGE, first_line
from ..rundir import RunDir, atomic_write, cancelled, clear_cancelled, default_run_dir, refuse_overwriting
from .jobs import _record, job_states
from . import search_array
from .render import TASK_DIRS, _error, _package, render, template_params, trials
from .options import FLAGS, slot_begins, slot_period, slurm_section
from .search_array import SECTION

def add_arguments(parser):
    g = parser.add_argument_group("Slurm (each overrides the config's slurm section)")
    for flag, field_name, kw in FLAGS:
        g.add_argument(flag, dest=f"slurm_{field_name}", default=None, **kw)
    parser.add_argument("--infer", action="store_true", help="submit batch inference (slurm/infer.sbatch)")
    parser.add_argument("--folds", action="store_true",
                        help="data.folds' K folds as a job array: task I trains RUN/folds/fold-I")
    parser.add_argument("--prepare", action="store_true",
                        help="submit `hpcjobs prepare` as a CPU job (slurm/prepare.sbatch; slurm.prepare_partition, "
                             "--cpus-per-task processes); it requeues on its time limit and continues")
    parser.add_argument("--after-prepare", action="store_true",
                        help="the training job starts only after the run's prepare job ended well (afterok) and "
                             "reads its store; with --prepare, both are submitted at once")
    parser.add_argument("--dry-run", action="store_true", help="print the script(s); write and submit nothing")
    parser.add_argument("--no-check", action="store_true",
                        help="submit even when hpcjobs doctor's fast checks find a blocker")


def _overrides(args) -> dict:
    given = {field_name: getattr(args, f"slurm_{field_name}", None) for _, field_name, _ in FLAGS}
    if given.get("search"):  # a bare --search is no grid
        given["search"] = [v for v in given["search"] if v != SECTION] or None
    return given


# --------------------------------------------------------------------------- the command
@dataclasses.dataclass
class _Plan:
    """Everything one ``hpcjobs submit`` writes and queues, worked out before anything is."""
    cfg: Config
    s: SlurmConfig
    kind: str  # train | search | infer
    run_dir: str
    config_path: str
    params: dict
    script: str
    script_path: str
    trial_sets: list = dataclasses.field(default_factory=list)
    trial_cfgs: list = dataclasses.field(default_factory=list)
    task_dirs: list = dataclasses.field(default_factory=list)  # the array tasks' run dirs (search kind)
    folds: bool = False  # --folds: the tasks are data.folds' folds
    merge_script: Optional[str] = None
    begins: list = dataclasses.field(default_factory=list)
    prepare: Optional["_Plan"] = None  # --prepare: the prepare job this plan queues first (or alone)
    after: Optional[dict] = None  # --after-prepare: the prepare job (recorded, or to be queued) it waits for


def _plan(args) -> _Plan:
    from .. import config as config_mod

    cfg = config_mod.load(args.config, args.set)
    s = slurm_section(cfg, _overrides(args))
    cfg = dataclasses.replace(cfg, slurm=s)
    run_dir = os.path.abspath(default_run_dir(args.run_dir, cfg.name))
    prepare = getattr(args, "prepare", False)
    after = None
    if prepare or getattr(args, "after_prepare", False):
        _check_prepare(args, s)
        prep = _prepare_plan(cfg, s, run_dir)
        if not getattr(args, "after_prepare", False):
            return prep
        after = _recorded_prepare(run_dir) if not prepare else dict(job_id=None, store=prep.params["store"])
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, store=after["store"]))
    section = SECTION in (getattr(args, "slurm_search", None) or [])
    folds = getattr(args, "folds", False)
    if folds:
        _check_folds(cfg, s, args)
    if s.search:  # --search KEY=V1,V2: a grid, run by the same workers as the search: section
        if section:
            raise _error("--search", "a bare --search (the config's search: section) or KEY=V1,V2 grids, not both")
        cfg = search_array.grid_from_flags(cfg, s, args.config)
        s, section = cfg.slurm, True
    kind = "infer" if args.infer else ("trials" if section else "search" if (s.array or folds) else "train")
    if s.slot and kind != "train":
        raise _error("--slot", "a chain of time slots runs one training, not --infer, --array, --search or --folds")
    trial_sets, trial_cfgs = [], []
    if kind == "search":
        trial_sets = [[f"data.fold={i}"] for i in range(cfg.data.folds)] if folds else trials(cfg, s)
        what = "fold" if folds else "trial"
        trial_cfgs = [config_mod.from_dict(config_mod.apply_overrides(to_dict(cfg), sets), f"{args.config} ({what} {i})")
                      for i, sets in enumerate(trial_sets)]
    config_path = os.path.join(run_dir, "infer-config.yaml" if kind == "infer" else "config.yaml")
    if kind == "trials":  # the search: section: array tasks that pull trials (search_array.py)
        search_array.check(cfg, s, args.config, run_dir)
        params, note = search_array.params(cfg, s, run_dir, config_path)
        if note:
            print(note, file=sys.stderr)
    else:
        params = template_params(cfg, s, kind, run_dir, None if kind == "search" else config_path)
    if folds:
        params.update(array=len(trial_sets), tasks="folds")
    task_dir = TASK_DIRS["folds" if folds else "trials"]
    plan = _Plan(cfg=cfg, s=s, kind=kind, run_dir=run_dir, config_path=config_path, params=params,
                 script=render(kind, **params), script_path=os.path.join(run_dir, "slurm", f"{kind}.sbatch"),
                 trial_sets=trial_sets, trial_cfgs=trial_cfgs, task_dirs=[task_dir % i for i in range(len(trial_sets))],
                 folds=folds, begins=slot_begins(s) if s.slot else [])
    if kind == "infer" and s.array:
        merge_params = {k: v for k, v in params.items() if k not in ("array", "array_parallel")}
        merge_params.update(nodes=1, ntasks_per_node=1, gpus_per_node=0, merge=True,
                            job_name=f"{params['job_name']}-merge")
        plan.merge_script = render("infer", **merge_params)
    if after is not None:
        plan.after = after
        plan.prepare = prep if prepare else None
    return plan


def _check_prepare(args, s: SlurmConfig):
    flag = "--prepare" if getattr(args, "prepare", False) else "--after-prepare"
    if args.infer or s.array or s.search or getattr(args, "folds", False) or s.slot \
            or SECTION in (getattr(args, "slurm_search", None) or []):
        raise _error(flag, "a prepare job goes with one training job: not with --infer, --array, --search, "
                           "--folds or --slot")


def _prepare_plan(cfg: Config, s: SlurmConfig, run_dir: str) -> _Plan:
    """The prepare job: one task on --cpus-per-task CPUs, writing the store training reads."""
    config_path = os.path.join(run_dir, "prepare-config.yaml")
    params = template_params(cfg, s, "prepare", run_dir, config_path)
    return _Plan(cfg=cfg, s=s, kind="prepare", run_dir=run_dir, config_path=config_path, params=params,
                 script=render("prepare", **params), script_path=os.path.join(run_dir, "slurm", "prepare.sbatch"))


def _recorded_prepare(run_dir: str) -> dict:
    """The run's last prepare job, from RUN/slurm/jobs.json (where ``submit --prepare`` records it)."""
    from .jobs import read_jobs

    jobs = [j for j in read_jobs(run_dir) if j.get("kind") == "prepare" and j.get("store")]
    if not jobs:
        raise _error("--after-prepare", f"no prepare job recorded in {os.path.join(run_dir, 'slurm', 'jobs.json')}; "
                                        "submit one first with `hpcjobs submit CONFIG --prepare` (the same --run-dir), "
                                        "or give --prepare --after-prepare together")
    return dict(job_id=str(jobs[-1]["job_id"]), store=jobs[-1]["store"])


def _check_folds(cfg: Config, s: SlurmConfig, args):
    if not cfg.data.folds:
        raise _error("--folds", "the config has no data.folds: set data.folds: K (K >= 2)")
    if cfg.data.fold is not None:
        raise _error("--folds", f"data.fold is {cfg.data.fold}: --folds trains every fold, so leave data.fold null")
    if args.infer or s.array or s.search:
        raise _error("--folds", "the folds are the array: not with --infer, --array or --search")


def _print_dry_run(plan: _Plan):
    if plan.prepare is not None:
        print(plan.prepare.script, end="")
        print("# then, after the prepare job (sbatch --dependency=afterok:<prepare job>):")
    elif plan.after is not None:
        print(f"# after the prepare job {plan.after['job_id']} (sbatch --dependency=afterok:{plan.after['job_id']}):")
    print(plan.script, end="")
    for task_dir, sets in zip(plan.task_dirs, plan.trial_sets):
        print(f"# {task_dir}: " + " ".join(f"--set {shlex.quote(x)}" for x in sets))
    for i, begin in enumerate(plan.begins):
        dep = "" if i == 0 else f" --dependency=afterany:<job {i}>"
        of = f"/{len(plan.begins)}" if plan.s.slot_count else ""
        print(f"# slot {i + 1}{of}: sbatch --begin={begin.isoformat()}{dep} "
              f"{shlex.quote(plan.script_path)}")
    if plan.begins and not plan.s.slot_count:
        print(f"# then each slot that stops with more to do submits the next one, every {plan.s.slot_every}, "
              "until the run is done")
    if plan.merge_script:
        print("# then, after the array (sbatch --dependency=afterok:<array job>):")
        print(plan.merge_script, end="")


def _write(plan: _Plan):
    run_dir = plan.run_dir
    for task_dir in ("", *plan.task_dirs):  # the run and each task's run: new, empty or hpcjobs' own
        RunDir(os.path.join(run_dir, task_dir)).claim()
    os.makedirs(os.path.join(run_dir, "slurm"), exist_ok=True)
    atomic_write(plan.config_path, dump(plan.cfg), fsync=False)
    for task_dir, tcfg in zip(plan.task_dirs, plan.trial_cfgs):
        atomic_write(os.path.join(run_dir, task_dir, "config.yaml"), dump(tcfg), fsync=False)
    if plan.folds:
        from ..train.folds import record_folds

        record_folds(run_dir, plan.cfg)  # the parent's run.json: K folds, none started
    elif plan.kind == "search":
        atomic_write(os.path.join(run_dir, "trials.json"),
                     json.dumps([{"trial": f"trial-{i:03d}", "set": sets} for i, sets in enumerate(plan.trial_sets)],
                                indent=2) + "\n", fsync=False)
    _write_script(plan.script_path, plan.script)


def _write_script(path: str, text: str):
    atomic_write(path, text, fsync=False)
    os.chmod(path, 0o755)


def _queue(run_dir: str, kind: str, path: str, name: str, extra: list[str], array: bool, **fields) -> str:
    """sbatch one script, record the job in jobs.json at once, say where its log goes."""
    job_id = _package()._sbatch(path, extra)
    log = os.path.join(run_dir, "slurm", f"{name}-{job_id}_<task>.out" if array else f"{name}-{job_id}.out")
    _record(run_dir, dict(job_id=job_id, kind=kind, script=path, log=log, sbatch_args=extra, submitted=time.time(),
                          **fields))
    when = "".join(f" ({a.replace('--begin=', 'from ').replace('--dependency=', 'after ')})" for a in extra)
    print(f"submitted {kind} job {job_id}{when}\n  log: {log}")
    return job_id


def _queue_all(plan: _Plan):
    run_dir, kind, job_name = plan.run_dir, plan.kind, plan.params["job_name"]
    if kind == "prepare":  # its store recorded with it: --after-prepare reads both
        _queue(run_dir, kind, plan.script_path, job_name, [], False, store=plan.params["store"])
        return
    if plan.after is not None:
        prepare_id = plan.after["job_id"]
        if plan.prepare is not None:
            prepare_id = _queue(run_dir, "prepare", plan.prepare.script_path, plan.prepare.params["job_name"], [],
                                False, store=plan.prepare.params["store"])
        _queue(run_dir, kind, plan.script_path, job_name, [f"--dependency=afterok:{prepare_id}"], False)
        return
    if plan.begins:
        previous = None
        for i, begin in enumerate(plan.begins):
            extra = [f"--begin={begin.isoformat()}"] + ([f"--dependency=afterany:{previous}"] if previous else [])
            previous = _queue(run_dir, kind, plan.script_path, job_name, extra, False, slot=i + 1,
                              begin=begin.isoformat(), every=slot_period(plan.s), renews=plan.s.slot_count is None)
        if plan.s.slot_count is None:
            print("  each slot that stops with more to do submits the next one (give --count N for a fixed chain)")
        return
    is_array = kind != "train" and bool(plan.params.get("array"))
    first = _queue(run_dir, kind, plan.script_path, job_name, [], is_array)
    if plan.merge_script:
        merge_path = os.path.join(run_dir, "slurm", "infer-merge.sbatch")
        _write_script(merge_path, plan.merge_script)
        _queue(run_dir, "infer-merge", merge_path, f"{job_name}-merge", [f"--dependency=afterok:{first}"], False)


def cmd_submit(args) -> int:
    plan = _plan(args)
    if args.dry_run:
        _print_dry_run(plan)
        return 0
    for task_dir in ("", *plan.task_dirs):  # the run-dir rule first: its one line, before any check speaks
        RunDir(os.path.join(plan.run_dir, task_dir)).check_usable()
    if plan.kind != "infer" and not getattr(args, "no_check", False):
        from ..doctor.command import submission_blocker

        check_cfg = plan.cfg
        if plan.kind == "prepare" or plan.after is not None:  # the store is the prepare job's to make
            check_cfg = dataclasses.replace(check_cfg, data=dataclasses.replace(check_cfg.data, store=None))
        blocker = submission_blocker(check_cfg, plan.run_dir)
        if blocker:
            print(f"hpcjobs submit: refused: {blocker}", file=sys.stderr)
            return EX_USAGE
    refuse_overwriting(args.config, plan.config_path, dump(plan.cfg))
    _write(plan)
    if plan.prepare is not None:
        _write(plan.prepare)
    if clear_cancelled(plan.run_dir):
        print(f"note: {plan.run_dir} was cancelled; submitting it again clears the cancel")
    _queue_all(plan)
    print(f"  script: {plan.script_path}\n  status: hpcjobs status {plan.run_dir}")
    if plan.kind == "prepare":
        print(f"  store: {plan.params['store']}\n  then: hpcjobs submit CONFIG --after-prepare "
              f"--run-dir {shlex.quote(plan.run_dir)}")
    if plan.s.signal_margin == "auto" and "signal_margin" in plan.params:
        print(f"  signal_margin auto: {plan.params['signal_margin']} s (--signal=B:USR1@{plan.params['signal_margin']})")
    if plan.kind == "train" and _finished(plan.run_dir):
        print(f"note: {plan.run_dir} is finished already, so the job will exit at once; "
              "give another --run-dir to train again")
    return 0


def _finished(run_dir: str) -> bool:
    return RunDir(run_dir).read_record().finished


# --------------------------------------------------------------------------- hpcjobs status
def add_status_arguments(p):
    p.add_argument("run", help="run directory")


def cmd_status(args) -> int:
    from ..rundir import RunDir, RunDirError

    if os.path.isfile(os.path.join(args.run, "search", "results.csv")):  # a search: its table
        from ..search.results import status_lines

        print("\n".join(status_lines(args.run)))
        return 0
    rd = RunDir(args.run)
    record = rd.read_record(strict=True)
    if record.is_empty():
        raise RunDirError(f"{args.run}: no run.json (not a run directory, or not started)")
    st = record.to_dict()
    try:
        head, tail = _status_lines(st)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
        raise RunDirError(f"{rd.run_json}: unreadable run.json (unexpected content: {first_line(e)})") from None
    if cancelled(args.run):
        head.append("  cancelled (hpcjobs cancel): its jobs neither requeue nor renew; hpcjobs train clears it")
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
    chain = st.get("chain")
    if isinstance(chain, dict):
        lines.append(f"  chain of slots: {chain['ended']}" if chain.get("ended") else
                     f"  chain of slots: slot {chain.get('slots')} is job {chain.get('next_job')}, from "
                     f"{chain.get('next_begin')}")
    tail = []
    if "last" in st:
        tail.append("  last epoch: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in st["last"].items()))
    if "test_accuracy" in st:
        tail.append(f"  test accuracy {st['test_accuracy']:.4f}"
                    + (f", macro-F1 {st['test_f1']:.4f}" if isinstance(st.get("test_f1"), float) else ""))
    if "folds" in st:
        from ..train.folds import fold_table

        tail += fold_table(st)
    return lines, tail


# --------------------------------------------------------------------------- hpcjobs runs, hpcjobs cancel
def add_runs_arguments(p):
    p.add_argument("dir", nargs="?", default="runs", help="folder of runs (default runs/)")
    p.add_argument("--json", action="store_true", help="machine-readable rows")


def cmd_runs(args) -> int:
    from ..rundir import RunDirError
    from .runs import rows, rows_json, table_lines

    if not os.path.isdir(args.dir):
        raise RunDirError(f"{args.dir}: no such folder of runs")
    table = rows(args.dir)
    if args.json:
        print(rows_json(table))
    elif not table:
        print(f"no runs under {args.dir}")
    else:
        print("\n".join(table_lines(table)))
    return 0


def add_cancel_arguments(p):
    p.add_argument("run", help="run directory")


def cmd_cancel(args) -> int:
    from .runs import cancel

    print("\n".join(cancel(args.run)))
    return 0
