"""The search space: checked against the whole config, sampled through Optuna, applied to a trial.

A key of ``search.space`` is any value's key path in the config (``optimizer.learning_rate``,
``model.dropout``, ``optimizer.schedule.kind`` ...), except the search's own section,
``name`` and ``training.epochs`` (the trial budget is ``search.epochs``).  Every end of
a range and every choice must make a valid config, which is checked before any trial
starts, so a bad space is one line naming ``search.space.<key>``.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os

from ..config import Config, ConfigError, from_dict, to_dict
from ..config import ParamSpec, SearchConfig

_NOT_SEARCHED = ("search", "name", "training.epochs")


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return out


def _sections(d: dict, prefix: str = "") -> set[str]:
    return {f"{prefix}{k}" for k, v in d.items() if isinstance(v, dict)} | {
        s for k, v in d.items() if isinstance(v, dict) for s in _sections(v, f"{prefix}{k}.")}


def grid_points(spec: ParamSpec) -> list:
    """The values a grid search tries on one axis."""
    kind = spec.kind
    if kind == "choice":
        return list(spec.choice)
    lo, hi = getattr(spec, kind)
    n = spec.points
    if kind == "int":
        return sorted({int(round(lo + (hi - lo) * i / (n - 1))) for i in range(n)})
    if kind == "log_uniform":
        return [float(f"{math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (n - 1)):.6g}") for i in range(n)]
    return [float(f"{lo + (hi - lo) * i / (n - 1):.6g}") for i in range(n)]


def grid(search: SearchConfig) -> dict[str, list]:
    return {key: grid_points(spec) for key, spec in search.space.items()}


def grid_size(search: SearchConfig) -> int:
    return math.prod(len(v) for v in grid(search).values())


def total_trials(search: SearchConfig) -> int:
    """``search.trials``; with a grid at most (and by default) the grid's size."""
    if search.method == "grid":
        return min(search.trials or grid_size(search), grid_size(search))
    return search.trials


def _ends(spec: ParamSpec) -> list:
    return list(spec.choice) if spec.kind == "choice" else list(getattr(spec, spec.kind))


def check_space(cfg: Config, where: str):
    """Refuse (ConfigError on ``search.space.<key>``) a key that is not a config value, or a
    choice or range end that would make an invalid config."""
    if not cfg.search.space:
        raise ConfigError(where, "search.space", "empty: give at least one key to search, e.g. "
                                                 "optimizer.learning_rate: {log_uniform: [1.0e-4, 1.0e-1]}")
    base = to_dict(cfg)
    leaves, sections = _leaves(base), _sections(base)
    for key, spec in cfg.search.space.items():
        at = f"search.space.{key}"
        if any(key == s or key.startswith(s + ".") for s in _NOT_SEARCHED):
            raise ConfigError(where, at, "cannot be searched (the search's own settings; the trial budget "
                                         "is search.epochs)")
        if key in sections:
            raise ConfigError(where, at, "a section, not a value: search one of its keys")
        if key not in leaves:
            import difflib

            close = difflib.get_close_matches(key, sorted(leaves), 1)
            raise ConfigError(where, at, "not a key of the config" + (f"; did you mean '{close[0]}'?" if close else ""))
        for value in _ends(spec):
            try:
                trial_config(cfg, {key: value}, 0)
            except ConfigError as e:
                raise ConfigError(where, at, f"{value!r} makes an invalid config: {e.key}: {e.message}") from None


def centre_lr(cfg: Config, run: str, where: str) -> Config:
    """``search.lr_center``: optimizer.learning_rate log-uniform around RUN/lr_find.json's suggestion."""
    s = cfg.search
    path = os.path.join(run, "lr_find.json")
    try:
        with open(path, encoding="utf-8") as f:
            lr = float(json.load(f)[s.lr_center])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(where, "search.lr_center", f"no {s.lr_center} in {path}: run `hpcjobs lr-find "
                                                     f"CONFIG --run-dir {run}` first") from None
    space = dict(s.space, **{"optimizer.learning_rate": ParamSpec(log_uniform=(lr / s.lr_span, lr * s.lr_span))})
    return dataclasses.replace(cfg, search=dataclasses.replace(s, space=space))


def _set(values: dict, key: str, value):
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = list(value) if isinstance(value, tuple) else value


def trial_config(cfg: Config, params: dict, number: int) -> Config:
    """The config trial ``number`` trains: ``cfg`` with ``params`` set, the budget as its epochs,
    and no search section (so its config.yaml is a plain training config)."""
    values = copy.deepcopy(to_dict(cfg))
    values.pop("search", None)
    values["name"] = f"{cfg.name}-trial-{number:03d}"
    if cfg.search.epochs:
        values["training"]["epochs"] = cfg.search.epochs
    for key, value in params.items():
        _set(values, key, value)
    return from_dict(values, f"trial {number} of {cfg.name}")


def suggest(trial, search: SearchConfig) -> dict:
    """Sample (or take the grid's) values of every axis through an Optuna trial."""
    params = {}
    for key, spec in search.space.items():
        kind = spec.kind
        if search.method == "grid" or kind == "choice":
            params[key] = trial.suggest_categorical(key, grid_points(spec) if search.method == "grid"
                                                    else list(spec.choice))
        elif kind == "int":
            params[key] = trial.suggest_int(key, *spec.int)
        else:
            params[key] = trial.suggest_float(key, *getattr(spec, kind), log=kind == "log_uniform")
    return params


def combos(search: SearchConfig) -> list[dict]:
    """Every point of the grid (for a dry run's listing)."""
    g = grid(search)
    return [dict(zip(g, values)) for values in itertools.product(*g.values())]
