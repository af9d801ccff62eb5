"""A training job: the run directory's lock, a restart that moves the old run aside, the
check that a resumed run keeps its config, the sessions, and the negative-transfer baseline."""
from __future__ import annotations

import dataclasses
import os
import shutil
import time

from .. import export as bundle
from .. import plugins
from ..cluster import info as cluster_mod
from ..cluster import signals
from ..config import Config, ConfigError, to_dict
from ..errors import EX_OK, UserError
from ..rundir import RunDir, RunDirError, os_reason
from ..units import check_time_budget
from .session import run_session
from .trainer import Trainer


# Keys that may change from one session of a run to the next: how long and how it runs,
# not what is trained (those would not match the run's checkpoints or its metrics).
SESSION_KEYS = ("name", "training.epochs", "training.time_budget", "training.log_every_steps",
                "training.steps_per_call", "training.early_stopping", "checkpoint", "distribute", "slurm", "infer",
                "export", "transfer")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_same_config(cfg: Config, rd: RunDir):
    """Refuse to continue a run that has checkpoints with a config that differs from its
    own in what is trained (data, model, optimizer, batch size, seed ...)."""
    import yaml

    if not os.path.isdir(rd.checkpoints) or not os.path.isfile(rd.config_yaml):
        return
    try:
        with open(rd.config_yaml, encoding="utf-8") as f:
            before = _flat(yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError):
        return  # an unreadable config.yaml is rewritten; the checkpoint restore still checks shapes
    now = _flat(to_dict(cfg))
    differ = [k for k in now if k in before and before[k] != now[k]
              and not any(k == s or k.startswith(s + ".") for s in SESSION_KEYS)]
    if differ:
        shown = ", ".join(f"{k} ({before[k]!r} -> {now[k]!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ConfigError(rd.config_yaml, "", f"this run was trained with another config: {shown}{more}; "
                          "start a new run (--run-dir) or pass --restart to move this one aside")


def _move_aside(rd: RunDir) -> str:
    rd.lock()  # refuse to move a run that a process is using
    rd.unlock()
    folder, name = os.path.split(rd.path.rstrip("/"))
    suffix = f".old-{time.strftime('%Y%m%d-%H%M%S')}"
    name = name.encode()[:255 - len(suffix) - 4].decode(errors="ignore")  # a name near NAME_MAX still fits
    aside = next(p for p in (os.path.join(folder, name + suffix + (f"-{i}" if i else "")) for i in range(1000))
                 if not os.path.lexists(p))
    try:
        os.rename(rd.path, aside)
    except OSError as e:
        raise RunDirError(f"{rd.path}: cannot move the run aside to {aside} ({os_reason(e, aside)})") from None
    return aside


def _prepare_code(cfg: Config, rd: RunDir, verbose: bool):
    """RUN/code/: the user's code files copied (first session) or checked against their
    copies (later ones); None for a config that names none."""
    if not plugins.config_specs(cfg):
        return None
    from .checkpoint import checkpoint_candidates

    if rd.writer:
        rd.makedirs()
    return plugins.RunCode.prepare(cfg, rd.path, resuming=bool(checkpoint_candidates(rd.checkpoints)),
                                   writer=rd.writer, say=print if verbose else (lambda text: None))


def train(cfg: Config, run_dir: str, *, from_checkpoint=None, init_weights=None, time_budget=None,
          verbose=True, hooks=(), restart=False) -> int:
    """Train a run (resuming it if it has a checkpoint); 0 finished, 75 stopped with more to do.

    ``hooks``: more hooks (``hpcjobs.train.Hook`` objects) after the built-in ones and
    those of ``training.hooks``; their ``setup`` state is checkpointed too.  The user's
    code that the config names is copied into RUN/code/ and imported from there.

    ``init_weights`` is the same as ``model.init_from``.  The chief locks the run
    directory first, before TensorFlow is even imported, so a second process on the
    same run is refused at once.  ``restart`` moves an existing run aside; should the
    new config then fail to build (a user error), the old run is put back."""
    if init_weights:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=init_weights))
    try:
        check_time_budget(time_budget, "--time-budget")
    except ValueError as e:
        raise ConfigError("command line", "", str(e)) from None
    bundle.check_available(cfg.export.formats)  # before any training, not at its end
    with signals.held():  # until the loop's StopFlag takes them; released if building fails
        info = cluster_mod.detect()
        rd = RunDir(run_dir, writer=info.is_chief)
        aside = _move_aside(rd) if restart and rd.writer and os.path.exists(rd.path) else None
        created = rd.writer and not os.path.isdir(rd.path)
        if rd.writer:
            rd.lock()
        try:
            if not aside and rd.writer:
                check_same_config(cfg, rd)
            try:
                code = _prepare_code(cfg, rd, verbose)
                trainer = Trainer(cfg, run_dir, info=info, time_budget=time_budget, verbose=verbose, hooks=hooks,
                                  code=code)
            except UserError:
                if aside:
                    rd.unlock()
                    shutil.rmtree(rd.path)  # holds nothing but the lock file
                    os.rename(aside, rd.path)
                elif created:
                    shutil.rmtree(rd.sub(plugins.CODE_DIR), ignore_errors=True)  # copied before the refusal
                    rd.discard()
                raise
            if aside and verbose:
                print(f"moved the previous run aside to {aside}", flush=True)
            rc = run_session(trainer, from_checkpoint)
        finally:
            rd.unlock()
    if rc == EX_OK and rd.writer and (cfg.transfer.compare_scratch_epochs or cfg.transfer.baseline):
        from .baseline import check_negative_transfer

        check_negative_transfer(cfg, run_dir, train, verbose)
    return rc
