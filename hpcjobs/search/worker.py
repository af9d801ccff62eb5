"""A search worker: pull trials (new, or orphaned by a dead worker) and train them until the
budget is spent and no trial is left running anywhere.

Exit codes as for training: 0 the search has nothing left to do (for this worker), 75
stopped by a signal or the time limit with its trial checkpointed (the Slurm array task
requeues itself; any worker resumes the trial), 2 a user error.
"""
from __future__ import annotations

import os
import time

from ..config import Config, ConfigError, dump, to_dict
from ..errors import EX_OK, EX_TEMPFAIL, first_line
from ..record import RunRecord
from ..rundir import RunDir, RunDirError, atomic_write
from ..cluster.signals import StopFlag
from . import journal, results
from .space import centre_lr, check_space, trial_config
from .study import Claim, Paths, _lost_sessions, claim, open_study, tell

POLL_SECONDS = 3.0


def prepare(cfg: Config, run: str, where: str) -> tuple[Config, Paths]:
    """Check the space and that ``run`` is this search (or new); write RUN/search/config.yaml.
    Returns the config the search runs (its LR range centred by lr-find, if asked) and its paths."""
    if cfg.search.lr_center:
        cfg = centre_lr(cfg, os.path.abspath(run), where)
    check_space(cfg, where)
    if cfg.search.metric.startswith("val_") and cfg.data.validation_split == 0:
        raise ConfigError(where, "search.metric", f"{cfg.search.metric} needs a validation split "
                                                  "(data.validation_split > 0)")
    paths = Paths(os.path.abspath(run))
    RunDir(run).claim()  # new, empty or hpcjobs' own (a search, an lr-find)
    os.makedirs(paths.search, exist_ok=True)
    with journal.exclusive(paths.ask_lock):
        if os.path.exists(paths.config):
            from ..config import read_yaml

            before, now = read_yaml(paths.config), to_dict(cfg)
            for d in (before, now):
                d.pop("slurm", None)
                d.get("search", {}).pop("trials", None)  # a search may be given more trials
            if before != now:
                differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
                raise ConfigError(where, "", f"{run} holds a search with another config ({', '.join(differ)} "
                                             "differ): give another --run-dir")
        atomic_write(paths.config, dump(cfg))
    return cfg, paths


def _last_stop(record: RunRecord) -> str | None:
    return record.sessions[-1].stopped_by if record.sessions else None


def settle(study, search, c: Claim, record: RunRecord) -> bool:
    """End an orphaned trial that needs no more training; True if it was ended."""
    import optuna

    state = optuna.trial.TrialState
    if record.finished:
        _tell_finished(study, search, c.trial_id, c.run_dir)
        return True
    interrupted = _last_stop(record) == "error: KeyboardInterrupt"
    if (record.status == "failed" and not interrupted) or _lost_sessions(record) >= search.max_attempts:
        tell(study, c.trial_id, state=state.FAIL,
             error=record.error or f"its process died {_lost_sessions(record)} times", run_dir=c.run_dir)
        return True
    return False


def _tell_finished(study, search, trial_id: int, run_dir: str):
    import optuna

    if _last_stop(RunDir(run_dir).read_record()) == "pruned":
        tell(study, trial_id, state=optuna.trial.TrialState.PRUNED, run_dir=run_dir)
        return
    value = results.best_value(RunDir(run_dir).read_metrics(), search)
    if value is None:
        tell(study, trial_id, state=optuna.trial.TrialState.FAIL, error=f"no {search.metric} in metrics.csv",
             run_dir=run_dir)
        return
    tell(study, trial_id, value, run_dir=run_dir)


def run_trial(study, cfg: Config, c: Claim, verbose: bool, stop=None) -> int:
    """Train (or resume) one claimed trial and tell the study how it ended; 0 or 75."""
    import optuna

    from ..train import train
    from .prune import PruneHook

    if not c.adopted and os.path.exists(os.path.join(c.run_dir, "run.json")):  # a new trial, an old dir
        error = (f"{c.run_dir} was trained before, but the journal knew nothing of trial {c.number}: the journal "
                 "lost records (cut or damaged?); move the trial's folder aside to run it again")
        tell(study, c.trial_id, state=optuna.trial.TrialState.FAIL, error=error)
        print(f"search: trial {c.number} failed: {error}", flush=True)
        return EX_OK
    tcfg = trial_config(cfg, c.params, c.number)
    what = "resuming" if c.adopted else "starting"
    print(f"search: {what} trial {c.number} ({c.run_dir}): "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.params.items()), flush=True)
    hook = PruneHook(study, c.trial_id, cfg.search, stop)
    try:
        rc = train(tcfg, c.run_dir, hooks=[hook], verbose=verbose)
    except RunDirError as e:  # someone trains this run directory by hand: leave it to them
        print(f"search: skipping trial {c.number}: {e}", flush=True)
        time.sleep(POLL_SECONDS)
        return EX_OK
    except Exception as e:  # the trial failed (RunFailure, UserError or worse); the search goes on
        tell(study, c.trial_id, state=optuna.trial.TrialState.FAIL, error=first_line(e), run_dir=c.run_dir)
        print(f"search: trial {c.number} failed: {first_line(e)}", flush=True)
        return EX_OK
    if rc == EX_TEMPFAIL:
        return rc
    _tell_finished(study, cfg.search, c.trial_id, c.run_dir)
    if hook.stop_signal:  # it came as the trial ended anyway: stop before the next one
        print(f"search: stopping after trial {c.number} ({hook.stop_signal})", flush=True)
        return EX_TEMPFAIL
    return EX_OK


def work(cfg: Config, run: str, where: str = "search", verbose: bool = False) -> int:
    """One worker's loop (see the module); called by ``hpcjobs search`` and by each array task."""
    stop = StopFlag().install()  # between trials; train() installs its own meanwhile
    try:
        cfg, paths = prepare(cfg, run, where)
        study = open_study(paths, cfg)
        results.write_all(study, cfg, paths)  # status RUN has a table from the start
        while True:
            if stop.signal:
                return EX_TEMPFAIL
            c, busy = claim(study, cfg, paths, lambda st, cl, status: settle(st, cfg.search, cl, status))
            if c is None:
                if busy == 0:
                    results.write_all(study, cfg, paths)
                    return EX_OK
                time.sleep(POLL_SECONDS)  # trials still running elsewhere: adopt one if its worker dies
                continue
            if stop.signal:  # came while claiming: the trial stays for the next worker
                journal.release(c.fd)
                return EX_TEMPFAIL
            try:
                rc = run_trial(study, cfg, c, verbose, stop)
            finally:
                journal.release(c.fd)
            results.write_all(study, cfg, paths)
            if rc == EX_TEMPFAIL:
                return rc
    finally:
        stop.uninstall()
