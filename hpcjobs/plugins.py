"""The user's own code named by the config: a model (``model.arch``), a data source
(``data.source``), hooks (``training.hooks``) and a loss (``training.loss``).

A spec is ``path/to/file.py:name`` (a path relative to the config file; ``config.load``
makes it absolute) or ``package.module:name`` (an importable module).  The prefix
``kerashub:`` is reserved and is no spec.

The code travels with the run (:class:`RunCode`): when a run starts, every file named
is copied into ``RUN/code/`` with its sha256 (``RUN/code/code.json``), and every later
session imports the copy.  A source file changed since is refused, as a changed config
is (``--restart`` starts over); one that has gone is a warning (the copy is used).  A
module is recorded by its name, its package's version and its file's sha256; a change
is reported.  An export bundle carries the model's file in ``EXPORT/code/``
(:func:`bundle_code`), and importing it is running it: :func:`import_bundle_code` does
so only when the caller was given consent (``--trust-code``).

Nothing here imports TensorFlow.  Every error is a :class:`PluginError` (exit 2), one
line naming the config key and the file.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import types
from dataclasses import dataclass

from .digest import file_digest
from .errors import UserError, first_line
from .rundir import atomic_path, atomic_write

CODE_DIR = "code"
MANIFEST = "code.json"
FORMAT = "hpcjobs-code/1"
RESERVED = ("kerashub:",)
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE = re.compile(rf"{_IDENT}(\.{_IDENT})*")
_NAME = re.compile(_IDENT)
KINDS = {"model": "a function build(input_shape, num_classes, **options) -> keras.Model",
         "data": "a function load() -> (images, labels, class_names) or (paths, labels, class_names)",
         "hook": "a hook class (hpcjobs.train.Hook), built with its options",
         "loss": "a function (y_true, y_pred) -> per-example loss"}


class PluginError(UserError, ValueError):
    """User code named by the config that cannot be found, imported or used (exit code 2)."""


@dataclass(frozen=True)
class Spec:
    text: str  # as the config says it
    name: str  # the function or class
    path: str | None = None  # a file (absolute once the config is loaded)
    module: str | None = None  # or an importable module

    @property
    def where(self) -> str:
        return self.path or self.module


def parse(text) -> Spec | None:
    """The spec in ``text``, or None when it is none (a built-in name, a data path, ``kerashub:...``)."""
    if not isinstance(text, str) or text.startswith(RESERVED) or ":" not in text:
        return None
    left, _, name = text.rpartition(":")
    if not _NAME.fullmatch(name):
        return None
    if left.endswith(".py"):
        return Spec(text, name, path=left)
    if _MODULE.fullmatch(left):
        return Spec(text, name, module=left)
    return None


def is_spec(text) -> bool:
    return parse(text) is not None


def absolute(text, base_dir: str):
    """``text`` with a relative file spec made absolute against ``base_dir`` (else as it is)."""
    spec = parse(text)
    if spec is None or spec.path is None or os.path.isabs(spec.path):
        return text
    return f"{os.path.abspath(os.path.join(base_dir, spec.path))}:{spec.name}"


def config_specs(cfg) -> list[tuple[str, Spec]]:
    """(config key, spec) of every piece of user code a config names."""
    found = [("model.arch", parse(cfg.model.arch)), ("data.source", parse(cfg.data.source)),
             ("training.loss", parse(cfg.training.loss.name))]
    for i, h in enumerate(getattr(cfg.training, "hooks", ())):
        found.append((f"training.hooks[{i}]", parse(h.hook)))
    return [(k, s) for k, s in found if s is not None]


# --------------------------------------------------------------------------- importing
_COPIES: dict[str, str] = {}  # a source file (absolute) -> the run's copy this process imports instead


def _module_name(path: str, digest: str) -> str:
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    return f"hpcjobs_code.{stem}_{digest[:16]}"


def import_file(path: str, key: str, digest: str | None = None):
    """The module of file ``path``, imported once per content (its sha256 names it)."""
    if not os.path.isfile(path):
        raise PluginError(f"{key}: {path}: no such file")
    digest = digest or file_digest(path)
    name = _module_name(path, digest)
    if name in sys.modules:
        return sys.modules[name]
    if "hpcjobs_code" not in sys.modules:
        package = types.ModuleType("hpcjobs_code", "the user's code files, each named by its stem and sha256")
        package.__path__ = []
        sys.modules["hpcjobs_code"] = package
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if isinstance(e, UserError):
            raise
        if not isinstance(e, Exception):
            raise
        raise PluginError(f"{key}: {path}: importing it raised {first_line(e)}") from None
    return module


def _import_module(module: str, key: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise PluginError(f"{key}: no module named {module!r} (a file is written path/to/file.py:name)") from None
        raise PluginError(f"{key}: {module}: importing it raised {first_line(e)}") from None
    except Exception as e:
        raise PluginError(f"{key}: {module}: importing it raised {first_line(e)}") from None


def resolve(text: str, kind: str, key: str):
    """The function or class that spec ``text`` names, imported (a file from the run's copy
    when :meth:`RunCode.prepare` or :func:`use_run_code` made one).  ``kind`` is one of
    :data:`KINDS`; a hook is a class, anything else a function."""
    spec = parse(text)
    if spec is None:
        raise PluginError(f"{key}: {text!r}: expected path/to/file.py:name or package.module:name")
    if spec.path is not None:
        where = spec.path
        copy = _COPIES.get(os.path.abspath(spec.path))
        module = import_file(copy or spec.path, key)
    else:
        where = spec.module
        module = _import_module(spec.module, key)
    if not hasattr(module, spec.name):
        raise PluginError(f"{key}: {where}: has no {spec.name!r} (expected {KINDS[kind]})")
    obj = getattr(module, spec.name)
    if kind == "hook" and not isinstance(obj, type) or kind != "hook" and not callable(obj):
        raise PluginError(f"{key}: {where}: {spec.name} is a {type(obj).__name__}, not {KINDS[kind]}")
    return obj


def load_plugin(text: str, kind: str, key: str):
    """The one call for a plugin point (``kind``: model, data, hook, loss): the object
    ``text`` names, or a PluginError naming ``key`` and the file.  For a loss::

        fn = load_plugin(cfg.training.loss, "loss", "training.loss")  # (y_true, y_pred) -> per-example loss
    """
    return resolve(text, kind, key)


def call(fn, key: str, where: str, *args, **kwargs):
    """``fn(*args, **kwargs)``; an exception from the user's code is a PluginError naming ``key``."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:
        raise PluginError(f"{key}: {where}: {getattr(fn, '__name__', 'it')} raised {first_line(e)}") from None


def where(text: str) -> str:
    spec = parse(text)
    return spec.where if spec else str(text)


# --------------------------------------------------------------------------- the run's copy
def _package_version(module: str) -> str | None:
    import importlib.metadata as md

    top = module.split(".")[0]
    try:
        for dist in md.packages_distributions().get(top, []):
            return f"{dist} {md.version(dist)}"
    except Exception:  # a broken distribution's metadata is no reason to stop
        return None
    return None


def module_record(module: str) -> dict:
    """What names an importable module's code: its name, its package's version, its file's sha256."""
    entry = {"module": module}
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    origin = getattr(found, "origin", None)
    if origin and os.path.isfile(origin):
        entry["file"] = origin
        entry["sha256"] = file_digest(origin)
    version = _package_version(module)
    if version:
        entry["version"] = version
    return entry


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise PluginError(f"{path}: unreadable ({first_line(e)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PluginError(f"{path}: not an hpcjobs code manifest (format {FORMAT})")
    return data


class RunCode:
    """A run's ``RUN/code/``: the copies of the config's files and the record of its modules."""

    def __init__(self, run_dir: str, files: list[dict], modules: list[dict]):
        self.folder = os.path.join(run_dir, CODE_DIR)
        self.files, self.modules = files, modules

    @property
    def entries(self) -> list[dict]:
        """run.json's ``code``."""
        return [dict(e, copy=f"{CODE_DIR}/{e['copy']}") for e in self.files] + list(self.modules)

    def copy_of(self, source: str) -> str | None:
        for e in self.files:
            if e["source"] == os.path.abspath(source):
                return os.path.join(self.folder, e["copy"])
        return None

    @classmethod
    def prepare(cls, cfg, run_dir: str, *, resuming: bool, writer: bool = True, say=print) -> "RunCode":
        """Copy the config's files into RUN/code/ (the first session), or check them against
        the copies (later ones: a changed source is refused while the run has checkpoints,
        ``resuming``; a vanished one is a warning); record its modules.  Then this process
        imports the copies.  A worker that does not write (``writer=False``) only reads."""
        folder = os.path.join(run_dir, CODE_DIR)
        before = read_manifest(folder)
        known = {e["source"]: e for e in before.get("files", []) if isinstance(e, dict) and "source" in e}
        old_modules = {e["module"]: e for e in before.get("modules", []) if isinstance(e, dict) and "module" in e}
        files, modules, names = [], [], set()
        for key, spec in config_specs(cfg):
            if spec.module is not None:
                if any(m["module"] == spec.module for m in modules):
                    continue
                entry = dict(module_record(spec.module), key=key)
                old = old_modules.get(spec.module)
                if old and resuming and (old.get("version"), old.get("sha256")) != (entry.get("version"),
                                                                                     entry.get("sha256")):
                    say(f"warning: {key}: module {spec.module} changed since this run started "
                        f"({old.get('version') or old.get('sha256', '?')[:12]} -> "
                        f"{entry.get('version') or entry.get('sha256', '?')[:12]})")
                modules.append(entry)
                continue
            source = os.path.abspath(spec.path)
            if any(e["source"] == source for e in files):
                continue
            old = known.get(source)
            if old is not None and isinstance(old.get("copy"), str) and isinstance(old.get("sha256"), str):
                copy_path = os.path.join(folder, os.path.basename(old["copy"]))
                copy_ok = os.path.isfile(copy_path) and file_digest(copy_path) == old["sha256"]
                digest = file_digest(source) if os.path.isfile(source) else None
                if resuming and digest is not None and digest != old["sha256"]:
                    raise PluginError(f"{key}: {source}: changed since this run started (sha256 "
                                      f"{old['sha256'][:12]} -> {digest[:12]}); the run's copy is "
                                      f"{copy_path}: put it back, start a new run (--run-dir) or pass "
                                      "--restart to move this one aside")
                if copy_ok and (digest is None or digest == old["sha256"] or not writer):
                    if digest is None:
                        say(f"warning: {key}: {source} has gone; using the run's copy {copy_path}")
                    files.append(old)
                    names.add(old["copy"])
                    continue
                if resuming and digest is None:
                    raise PluginError(f"{key}: {source}: no such file, and the run's copy {copy_path} is "
                                      "missing or damaged (its sha256 is not the one code.json lists)")
            if not os.path.isfile(source):
                raise PluginError(f"{key}: {source}: no such file")
            if not writer:  # the chief copies; a worker imports the source meanwhile
                continue
            name = os.path.basename(source)
            stem, ext = os.path.splitext(name)
            i = 1
            while name in names:
                i += 1
                name = f"{stem}_{i}{ext}"
            names.add(name)
            os.makedirs(folder, exist_ok=True)
            with atomic_path(os.path.join(folder, name)) as tmp:
                shutil.copyfile(source, tmp)
            digest = file_digest(os.path.join(folder, name))
            files.append({"key": key, "source": source, "copy": name, "sha256": digest})
        code = cls(run_dir, files, modules)
        if writer and (files or modules or before):
            atomic_write(os.path.join(folder, MANIFEST),
                         json.dumps({"format": FORMAT, "files": files, "modules": modules}, indent=2) + "\n")
        code.activate()
        return code

    def activate(self):
        """From now on this process imports the run's copies instead of their sources."""
        for e in self.files:
            _COPIES[e["source"]] = os.path.join(self.folder, e["copy"])


def use_run_code(run_dir: str) -> RunCode:
    """Import a finished run's copies (``hpcjobs export RUN``), whatever its sources became."""
    data = read_manifest(os.path.join(run_dir, CODE_DIR))
    code = RunCode(run_dir, list(data.get("files", [])), list(data.get("modules", [])))
    code.activate()
    return code


# --------------------------------------------------------------------------- the bundle
def bundle_code(cfg, folder: str) -> list[dict]:
    """Copy the model's code (``model.arch`` as a file: the copy this process imported)
    into ``folder``/code/ with its manifest; a module is recorded, not copied.  Returns
    the manifest's entries (for the card); [] for a model with no code of the user's."""
    out_dir = os.path.join(folder, CODE_DIR)
    spec = parse(cfg.model.arch)
    if spec is None:
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # an earlier export's code: this model holds none
        return []
    files, modules = [], []
    if spec.path is not None:
        source = _COPIES.get(os.path.abspath(spec.path), spec.path)
        if not os.path.isfile(source):
            raise PluginError(f"model.arch: {spec.path}: no such file")
        name = os.path.basename(spec.path)
        os.makedirs(out_dir, exist_ok=True)
        with atomic_path(os.path.join(out_dir, name)) as tmp:
            shutil.copyfile(source, tmp)
        for stale in os.listdir(out_dir):
            if stale not in (name, MANIFEST) and not stale.startswith("."):
                os.remove(os.path.join(out_dir, stale))
        files.append({"key": "model.arch", "copy": name, "sha256": file_digest(os.path.join(out_dir, name)),
                      "name": spec.name})
    else:
        modules.append(dict(module_record(spec.module), key="model.arch", name=spec.name))
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.makedirs(out_dir)
    atomic_write(os.path.join(out_dir, MANIFEST),
                 json.dumps({"format": FORMAT, "files": files, "modules": modules}, indent=2) + "\n")
    return files + modules


def bundle_files(folder: str) -> list[str]:
    """The code files an export folder carries (``code/NAME``), [] for none."""
    data = read_manifest(os.path.join(folder, CODE_DIR))
    return [f"{CODE_DIR}/{e['copy']}" for e in data.get("files", []) if isinstance(e, dict) and "copy" in e]


def import_bundle_code(folder: str, trust_code: bool, hint: str, imported_ok: bool = False) -> list[str]:
    """Import an export folder's code so its layers are registered (its modules too, which
    are installed already and need no consent).  A bundle that carries files is refused
    unless ``trust_code``: importing code is running it.  ``imported_ok``: files whose very
    content this process imported already (a run's own model.arch, for ``model.init_from``)
    need no consent either.  Each file is checked against its sha256 first.  Returns what
    was imported."""
    code_dir = os.path.join(folder, CODE_DIR)
    data = read_manifest(code_dir)
    files = [e for e in data.get("files", []) if isinstance(e, dict) and "copy" in e]
    if imported_ok and files and all(isinstance(e.get("sha256"), str) and _module_name(e["copy"], e["sha256"])
                                     in sys.modules for e in files):
        trust_code = True  # nothing new runs: each file's module is this content, imported already
    if files and not trust_code:
        shown = ", ".join(f"{CODE_DIR}/{e['copy']}" for e in files)
        raise PluginError(f"{folder}: carries Python code ({shown}) that must be imported to load the model, "
                          f"and importing code runs it; refused. {hint}")
    done = []
    for e in files:
        path = os.path.join(code_dir, os.path.basename(e["copy"]))
        if not os.path.isfile(path):
            raise PluginError(f"{path}: missing (listed in {os.path.join(code_dir, MANIFEST)})")
        digest = file_digest(path)
        if digest != e.get("sha256"):
            raise PluginError(f"{path}: its sha256 {digest[:12]} is not the one {MANIFEST} lists; refused")
        import_file(path, "export code", digest)
        done.append(path)
    for e in data.get("modules", []):
        if isinstance(e, dict) and isinstance(e.get("module"), str) and _MODULE.fullmatch(e["module"]):
            _import_module(e["module"], "export code")
            done.append(e["module"])
    return done
