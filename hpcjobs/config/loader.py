"""Reading configs: strict YAML, typed conversion into the dataclasses, ``base:``, ``--set``.

The schema (the dataclasses) lives in :mod:`hpcjobs.config`; this module knows
nothing about it.  YAML is read with a ``yaml.SafeLoader`` subclass that keeps
``safe_load``'s semantics but refuses, as one ConfigError line naming the file:

* a key given twice in one mapping (both lines named);
* nesting deeper than :data:`MAX_DEPTH` (before Python's recursion limit is hit);
* more than :data:`MAX_NODES` values once aliases are expanded (an alias bomb), or
  an alias inside its own anchor;
* a file over :data:`MAX_BYTES` (counted while reading), or one that is not a regular
  file (a FIFO, a device: :func:`hpcjobs.rundir.read_capped`).

The same limits hold for every file a config reads through ``base:`` and for every
``--set`` value, so nothing is merged or converted before a file has passed them.
"""
from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import os
import re
import types
import typing
import unicodedata
from typing import Any, Literal

import yaml

from ..errors import UserError
from ..rundir import FileRefused, read_capped

MAX_DEPTH = 64  # a config is 4 levels deep; lists inside it add one or two
MAX_NODES = 100_000  # values once aliases are expanded
MAX_BYTES = 1 << 20
_INT64 = 2**63


def section(cls):
    """A config section: a frozen, keyword-only, slotted dataclass, which :func:`build` fills."""
    return dataclasses.dataclass(frozen=True, kw_only=True, slots=True)(cls)


class ConfigError(UserError, ValueError):
    """A user error in a config file or override: one line, exit code 2."""

    def __init__(self, where: str, key: str, message: str):
        self.where, self.key, self.message = where, key, message
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# --------------------------------------------------------------------------- strict YAML
class YAMLRefused(yaml.YAMLError):
    """Well-formed YAML that a config may not be: ``key`` ('' for the document) and why."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with duplicate keys, depth and alias expansion refused."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise YAMLRefused("", f"line {line}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        check_nodes(node)
        return self.construct_document(node)


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_keys(node: yaml.MappingNode, path: str):
    first: dict = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        ident = (key_node.tag, key_node.value)
        line = key_node.start_mark.line + 1
        if ident in first:
            key = f"{path}.{key_node.value}" if path else key_node.value
            raise YAMLRefused(key, f"duplicate key (line {first[ident]} and again line {line}); "
                                   "YAML would keep only the last")
        first[ident] = line


def check_nodes(root):
    """Refuse duplicate keys, alias cycles and more than MAX_NODES expanded values.

    One walk over the composed node graph (iterative; shared alias targets are sized
    once), so a billion-laughs document is refused before anything is constructed."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, "", False)]
    while stack:
        node, path, done = stack.pop()
        key = id(node)
        if done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_NODES:
                raise YAMLRefused("", f"more than {MAX_NODES:,} values once aliases are expanded "
                                      "(an alias bomb?)")
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise YAMLRefused(path, f"line {node.start_mark.line + 1}: an alias refers to its own anchor")
        open_nodes.add(key)
        stack.append((node, path, True))
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, path)
            for k, v in node.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                stack += [(k, path, False), (v, f"{path}.{name}" if path else name, False)]
        else:
            stack += [(c, path, False) for c in _children(node)]


def parse_yaml(text: str):
    """``yaml.safe_load`` semantics with the limits above (YAMLRefused, or yaml.YAMLError)."""
    return yaml.load(text, Loader=StrictLoader)


def read_yaml(path: str) -> dict:
    """Read a YAML mapping strictly; every error becomes a ConfigError naming the file."""
    if not os.path.exists(path):
        raise ConfigError(path, "", "no such file")
    try:
        values = parse_yaml(read_capped(path, MAX_BYTES, "config").decode("utf-8"))
    except FileRefused as e:
        raise ConfigError(path, "", str(e).removeprefix(f"{path}: ")) from None
    except YAMLRefused as e:
        raise ConfigError(path, e.key, e.message) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(path, "", f"malformed YAML: {line}{problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, "", f"cannot read: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(path, "", "the top level must be a mapping of sections")
    return values


def read_with_base(path: str, seen: set | None = None) -> dict:
    """A config file's values, over those of its ``base:`` (relative to the file), recursively."""
    seen = set() if seen is None else seen
    values = read_yaml(path)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(path, "base", "expected a file name")
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.exists(base_path):
        raise ConfigError(path, "base", f"{base_path}: no such file")
    if os.path.abspath(base_path) in seen:
        raise ConfigError(path, "base", "circular base")
    seen.add(os.path.abspath(base_path))
    merged = read_with_base(base_path, seen)
    merged.pop("name", None)  # the name belongs to the file that was asked for
    return _merge(merged, values)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------- conversion
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):  # the form a user writes, not the class's name
        return "{" + ", ".join(f"{yaml_key(f.name)}: ..." for f in dataclasses.fields(tp)) + "}"
    return getattr(tp, "__name__", str(tp))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


class _BadNumber(ConfigError):
    """A number of the right type but unusable (not finite, out of range): said as it is."""


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _scalar(value: Any, tp, where: str, key: str):
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, key, f"expected an integer, got {value!r}")
        if not -_INT64 <= value < _INT64:
            raise _BadNumber(where, key, f"{_short(value)} is out of range (a 64-bit integer)")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.match(value):  # YAML 1.1 reads 1e-3 as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, key, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise _BadNumber(where, key, f"must be a finite number, got {_short(value)}")
        return number
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(where, key, f"expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp}")  # a bug in the schema, not user input


def _convert(value: Any, tp, where: str, key: str):
    origin = typing.get_origin(tp)
    if tp is Any:  # a free value (model.options): what safe YAML makes, as it is
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(where, key, f"expected a mapping, got {type(value).__name__}")
        return build(tp, value, where, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            if isinstance(value, dict) and dataclasses.is_dataclass(a):
                return _convert(value, a, where, key)  # a mapping is that form: its own error names the rule
            try:
                return _convert(value, a, where, key)
            except _BadNumber:
                raise
            except ConfigError:
                pass
        raise ConfigError(where, key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(where, key, f"must be one of {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin is dict:  # a mapping of names to values, e.g. training.class_weight
        if not isinstance(value, dict):
            raise ConfigError(where, key, f"expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, where, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(where, key, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(where, key, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, where, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return _scalar(value, tp, where, key)


def yaml_key(name: str) -> str:
    """A field's key in YAML: its name, without the ``_`` that a Python keyword needs (``from_``)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _unknown_key(k, prefix: str, names: list[str], where: str):
    """An unknown key; what is no key name (a password file's line) is not echoed, a look-alike letter is named."""
    text = str(k)
    key = f"{prefix}.{text}" if prefix else text
    if not re.fullmatch(r"\w{1,64}", text):
        raise ConfigError(where, prefix, "a key that is no config key name (not shown; is this file a config?)")
    odd = next(((i, c) for i, c in enumerate(text) if not c.isascii()), None)
    if odd is not None:
        i, c = odd
        raise ConfigError(where, key.encode("ascii", "backslashreplace").decode(),
                          f"unknown key: character {i + 1} is {unicodedata.name(c, 'a non-ASCII character')} "
                          f"(U+{ord(c):04X}), not ASCII; config keys are plain ASCII")
    close = difflib.get_close_matches(text, names, 1, 0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    raise ConfigError(where, key, f"unknown key{hint}")


def build(cls, values: dict, where: str, prefix: str):
    """``cls(**values)`` with every value converted to its field's type; errors name the key.

    A ``ValueError("field: message")`` from ``__post_init__`` names the field; one whose
    key is a dotted path into the sections (a check across sections) names that path."""
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f.name): f.name for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            _unknown_key(k, prefix, names, where)
        kwargs[fields[k]] = _convert(v, hints[fields[k]], where, key)
    try:
        return cls(**kwargs)
    except ValueError as e:
        field_name, _, msg = str(e).partition(": ")
        if field_name.split(".")[0] in names and msg:
            raise ConfigError(where, f"{prefix}.{field_name}" if prefix else field_name, msg) from None
        raise ConfigError(where, prefix, str(e)) from None


# --------------------------------------------------------------------------- writing
def to_dict(cfg) -> dict:
    """Plain dict (tuples as lists) for writing YAML/JSON."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {yaml_key(f.name): plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):  # e.g. search.space: key path -> ParamSpec
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
