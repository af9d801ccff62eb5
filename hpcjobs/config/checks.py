"""Checks of a config beyond one value: the model's name, and settings of one section
that only make sense with those of another.

Each raises ``ValueError("key: what is wrong and what to change")``; the loader turns
it into a ConfigError naming the file and the key (exit 2, one line).  Nothing here
imports TensorFlow: the keras.applications names are read from Keras' files
(:func:`hpcjobs.compat.keras_application_names`), so ``hpcjobs submit`` on a login
node refuses a misspelt model before a job is queued.
"""
from __future__ import annotations

import difflib
import os
import re

BUILTIN_ARCHS = ("simple_cnn", "small_resnet")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def application_names() -> frozenset[str] | None:
    """keras.applications' model names, or None if they cannot be read here (then the
    model build, which has Keras imported, is where an unknown name is refused)."""
    from ..compat import CompatError, keras_application_names

    try:
        return keras_application_names()
    except CompatError:
        return None


def unknown_arch(arch: str, names) -> str | None:
    """The one test of a model name: None for a built-in net or one of ``names`` (the
    keras.applications models; None: not known here), else the message, with a hint."""
    if arch in BUILTIN_ARCHS or names is None or arch in names:
        return None
    known = list(BUILTIN_ARCHS) + sorted(names)
    close = [n for n in known if n.lower() == arch.lower()] or difflib.get_close_matches(arch, known, 1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (f"arch: unknown architecture {arch!r}{hint} (built-in: {', '.join(BUILTIN_ARCHS)}, "
            "or a keras.applications name such as ResNet50 or MobileNetV2)")


KERASHUB = "kerashub:"  # model.arch: kerashub:PATH, a KerasHub preset folder (the prefix is reserved)


def check_arch(arch: str):
    """A built-in net, a keras.applications model name, ``kerashub:PATH`` or the user's own
    (``file.py:build``, ``package.module:build``), else a ValueError with a hint."""
    from .. import plugins

    if arch.startswith(KERASHUB):
        if not arch[len(KERASHUB):].strip():
            raise ValueError("arch: kerashub: needs the path of a KerasHub preset folder (kerashub:PATH)")
        return
    if plugins.is_spec(arch):
        return  # found and called when the model is built (the file's path is checked there, in one line)
    names = application_names() if _NAME.fullmatch(arch) else frozenset()
    message = unknown_arch(arch, names)
    if message:
        raise ValueError(message)


def check_model(m):
    """A ModelConfig's fields against each other."""
    from .. import plugins

    check_arch(m.arch)
    builtin = m.arch in BUILTIN_ARCHS
    if m.arch.startswith(KERASHUB) and (m.weights is not None or m.head.include_top):
        raise ValueError(f"{'weights' if m.weights is not None else 'head.include_top'}: a KerasHub preset "
                         "brings its own weights and gets a new head (leave model.weights null, include_top false)")
    if plugins.is_spec(m.arch):
        if m.weights is not None:
            raise ValueError("weights: a keras.applications weights file, but model.arch is your own model "
                             "(to start from another hpcjobs model, use model.init_from)")
        if m.head.include_top or m.head.dense:
            raise ValueError("head: model.arch is your own model, which ends in its own classifier "
                             "(head.dense and head.include_top are for keras.applications backbones)")
    else:
        if m.options:
            raise ValueError(f"options: only for your own model.arch (path/to/file.py:build), not {m.arch}")
        if m.outputs != "probabilities":
            raise ValueError(f"outputs: only for your own model.arch (path/to/file.py:build); {m.arch} "
                             "outputs probabilities")
    if builtin and m.weights is not None:
        raise ValueError(f"weights: a keras.applications weights file, but {m.arch} is built in "
                         "(to start from another hpcjobs model, use model.init_from)")
    if m.freeze_backbone and m.init_from is None and (builtin or m.weights is None) \
            and not m.arch.startswith(KERASHUB):  # a preset's backbone has its weights
        what = f"{m.arch} has no pretrained backbone" if builtin else f"{m.arch}'s backbone would stay random"
        raise ValueError(f"freeze_backbone: {what}: set model.init_from"
                         f"{'' if builtin else ' or model.weights'}, or freeze_backbone: false")


def check_across(cfg):
    """Settings of one section that another section makes impossible or meaningless."""
    d, es = cfg.data, cfg.training.early_stopping
    if es.patience is not None and es.monitor.startswith("val_") and d.validation_split == 0:
        raise ValueError(f"training.early_stopping.monitor: {es.monitor} needs a validation split, but "
                         "data.validation_split is 0: monitor loss or accuracy, or set a validation_split")
    t = cfg.training
    from .. import plugins

    for i, st in enumerate(t.stages):
        if hasattr(st.trainable, "top_blocks") and plugins.is_spec(cfg.model.arch):
            raise ValueError(f"training.stages[{i}].trainable: top_blocks, but model.arch is your own model, "
                             "which has no blocks: name its layers (trainable: [names or prefixes]), or use "
                             "head or all")
    if t.jit_compile is True and cfg.distribute.strategy == "horovod":
        raise ValueError("training.jit_compile: Horovod's allreduce cannot run inside an XLA cluster; "
                         "use jit_compile: false (or auto) with horovod, or a tf.distribute strategy")
    if t.jit_compile is True and t.deterministic:
        raise ValueError("training.jit_compile: TensorFlow's deterministic mode does not cover XLA-compiled "
                         "steps; use jit_compile: false (or auto, which is off) with deterministic: true")
    if d.store is not None and os.path.normpath(d.store) == os.path.normpath(d.source):
        raise ValueError("data.store: the same path as data.source: prepare would overwrite the source; "
                         "name another file")
