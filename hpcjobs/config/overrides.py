"""``--set key.path=value``: each value read as a YAML scalar with the loader's strict rules,
applied to a config's raw values before they are built."""
from __future__ import annotations

import re
from typing import Any

import yaml

from .loader import ConfigError, YAMLRefused, parse_yaml


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError("--set", text, "expected key.path=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError("--set", key, "not a key path like training.epochs")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except YAMLRefused as e:
        raise ConfigError("--set", key, e.message) from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


SHORT_FORMS = {("training", "loss")}  # sections that a config may give as their name alone


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` strings (values parsed as YAML scalars) to a raw dict."""
    for text in overrides or []:
        path, value = parse_override(text)
        node = values
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if isinstance(nxt, str) and tuple(path[:i + 1]) in SHORT_FORMS:  # loss: focal, then loss.gamma=3
                nxt = node[part] = {"name": nxt}
            if not isinstance(nxt, dict):
                raise ConfigError("--set", ".".join(path), f"'{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return values
