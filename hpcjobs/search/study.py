"""The study (Optuna's samplers and pruners over :mod:`.journal`) and how a worker claims a trial.

Layout of a search run ``RUN``::

    RUN/search/journal.log     the Optuna journal: every trial, its params, reports, state
    RUN/search/config.yaml     the search's resolved config (a second invocation must match)
    RUN/search/.ask.lock       held while a worker counts the trials and asks for one
    RUN/trials/NNN/            trial NNN: an ordinary run directory (config.yaml, run.json ...)
    RUN/trials/NNN/.claim      flock held by the worker working on the trial, for as long as it does

There is no chief: any worker may create the study, ask for the next trial (while the
trials are fewer than the budget) or adopt a trial whose worker died.  A trial that
Optuna calls RUNNING but whose ``.claim`` nobody holds has lost its worker (killed,
preempted, its node gone: the kernel, or the NFS server at the end of the client's
lease, dropped the lock); the next worker that looks takes it over and resumes it from
its own checkpoint, or ends it as its run.json says (finished, failed, or killed
``search.max_attempts`` times).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from .. import compat
from ..config import Config
from ..record import RunRecord
from ..rundir import RunDir
from . import journal
from .space import grid, suggest, total_trials


@dataclasses.dataclass
class Paths:
    run: str

    search = property(lambda self: os.path.join(self.run, "search"))
    journal = property(lambda self: os.path.join(self.search, "journal.log"))
    ask_lock = property(lambda self: os.path.join(self.search, ".ask.lock"))
    config = property(lambda self: os.path.join(self.search, "config.yaml"))

    def trial(self, number: int) -> str:
        return os.path.join(self.run, "trials", f"{number:03d}")


def make_sampler(s, seed: int):
    """The sampler of the next ask, seeded by the number of trials so far: every worker
    (each with its own sampler object) draws the same trial for the same position."""
    import optuna

    if s.method == "grid":  # one order of the grid for every worker (trial n takes point n of it)
        return optuna.samplers.GridSampler(grid(s), seed=s.seed)
    if s.method == "tpe":
        n = total_trials(s)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n // 3)), constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(p):
    import optuna

    if p.kind == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.min_resource)
    return optuna.pruners.NopPruner()


OLD_STUDY_NAME = "search"  # the study's name in journals written before it took the run's name


def study_name(storage, cfg: Config) -> str:
    """The run's name (``cfg.name``), which optuna-dashboard shows; a journal begun before
    that, whose one study is named ``search``, keeps its name and goes on."""
    names = [s.study_name for s in storage.get_all_studies()]
    return OLD_STUDY_NAME if names == [OLD_STUDY_NAME] else cfg.name


def open_study(paths: Paths, cfg: Config):
    """Create or load the study (under the ask lock, so two first workers make one study),
    named after the run, with the metric's name (``set_metric_names``) for optuna-dashboard."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.makedirs(paths.search, exist_ok=True)
    with journal.exclusive(paths.ask_lock):
        storage = journal.storage(paths.journal)
        study = optuna.create_study(study_name=study_name(storage, cfg), storage=storage,
                                    direction="maximize" if cfg.search.maximize else "minimize",
                                    sampler=make_sampler(cfg.search, cfg.search.seed),
                                    pruner=make_pruner(cfg.search.pruning), load_if_exists=True)
        if study.metric_names != [cfg.search.metric]:  # a new study, or one from before metric names
            import warnings

            with warnings.catch_warnings():  # Optuna calls set_metric_names experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([cfg.search.metric])
        return study


def trial_attrs(run_dir: str) -> dict:
    """A trial's user attributes for optuna-dashboard: its run directory, steps and epochs."""
    rd = RunDir(run_dir)
    history = rd.read_metrics()
    return {"run_dir": os.path.abspath(run_dir), "steps": rd.read_record().step or 0,
            "epochs": history[-1]["epoch"] if history else 0}


def tell(study, trial_id: int, value=None, state=None, error: str | None = None, run_dir: str | None = None):
    """End a trial (skipped if it has ended already), with its user attributes (the error,
    and from ``run_dir`` its steps and epochs).  The sampler is swapped for a plain
    one first: GridSampler's after_trial calls study.stop() once the grid is used up,
    which raises outside study.optimize(); each ask makes its own sampler anyway."""
    import optuna

    if compat.optuna_trial_finished(study, trial_id):  # told already (by a worker that then died)
        return
    trial = optuna.trial.Trial(study, trial_id)
    attrs = dict(trial_attrs(run_dir) if run_dir else {}, **({"error": error} if error else {}))
    for key, v in attrs.items():  # before the tell: a finished trial takes no more attributes
        trial.set_user_attr(key, v)
    study.sampler = optuna.samplers.RandomSampler()
    study.tell(trial_id, value, state=state, skip_if_finished=True)


@dataclasses.dataclass
class Claim:
    number: int
    trial_id: int
    params: dict
    run_dir: str
    fd: int  # the .claim flock
    adopted: bool


def _lost_sessions(record: RunRecord) -> int:
    """Sessions that never ended: their process died without a clean stop."""
    return sum(1 for s in record.sessions if s.end is None)


def _take(study, cfg: Config, paths: Paths, trial, adopted: bool) -> Optional[Claim]:
    import optuna

    run_dir = paths.trial(trial.number)
    RunDir(run_dir).claim()
    fd = journal.try_flock(os.path.join(run_dir, ".claim"))
    if fd is None:
        return None
    live = optuna.trial.Trial(study, compat.optuna_trial_id(trial))
    params = suggest(live, cfg.search)  # already-suggested values come back as they were
    if trial.user_attrs.get("run_dir") != os.path.abspath(run_dir):
        live.set_user_attr("run_dir", os.path.abspath(run_dir))
    return Claim(trial.number, compat.optuna_trial_id(trial), params, run_dir, fd, adopted)


def claim(study, cfg: Config, paths: Paths, settle) -> tuple[Optional[Claim], int]:
    """The next trial for this worker: an orphan first, else a new one while the budget
    lasts.  Returns (claim or None, number of trials still running elsewhere).
    ``settle(study, trial, record) -> bool`` ends an orphan that needs no training
    (finished, failed, killed too often); it is called with the claim held."""
    import optuna

    running = optuna.trial.TrialState.RUNNING
    with journal.exclusive(paths.ask_lock):
        trials = study.get_trials(deepcopy=False)
        busy = 0
        for t in trials:
            if t.state != running:
                continue
            c = _take(study, cfg, paths, t, adopted=True)
            if c is None:
                busy += 1
                continue
            if settle(study, c, RunDir(c.run_dir).read_record()):
                journal.release(c.fd)
                continue
            return c, busy
        if len(trials) < total_trials(cfg.search):
            study.sampler = make_sampler(cfg.search, cfg.search.seed + len(trials))
            c = _take(study, cfg, paths, study.ask(), adopted=False)
            if c is not None:
                return c, busy
            busy += 1
        return None, busy


__all__ = ["Claim", "Paths", "claim", "make_pruner", "make_sampler", "open_study", "study_name", "tell", "trial_attrs"]
