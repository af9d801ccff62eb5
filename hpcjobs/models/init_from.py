"""``model.init_from``: the layers of a built model that another hpcjobs model fills (by name
and weight shapes), frozen or not, and the plan kept in the run directory so a resume needs
no source.  The source is an hpcjobs export (or its run) or a ``.weights.h5`` written for
the same architecture (``model.save_weights``): that file is loaded into a copy of this
model with whatever does not fit skipped, and the layers it filled are those copied."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..export.loading import load_exported
from .errors import ModelError
from .freeze import FIXED


@dataclass
class InitPlan:
    """The layers of a model that ``model.init_from`` fills, found when the model is built."""

    path: str
    source: Any  # the loaded source model
    layers: list[str]  # names of the layers to copy
    frozen: bool
    note: str = ""  # e.g. a fresh head for another number of classes
    left: list = None  # layers with weights that keep their fresh values (reported)

    def apply(self, model):
        """Copy the planned layers' weights from the source (loaded now if the plan was read
        from the run directory)."""
        if self.source is None:
            self.source = _weights_model(model, self.path) if is_weights_file(self.path) else load_exported(self.path)
        src = {layer.name: layer for layer in self.source.layers}
        for name in self.layers:
            model.get_layer(name).set_weights(src[name].get_weights())


def is_weights_file(path: str) -> bool:
    """A Keras weights file (``.weights.h5``, or any ``.h5`` file), not an export or a run."""
    import os

    return path.lower().endswith(".h5") and not os.path.isdir(path)


def _weights_model(model, path: str):
    """A copy of ``model`` with the weights of the file ``path``, where they fit; every
    floating weight the file did not fill is NaN (so what was filled is known)."""
    import os

    import keras
    import numpy as np

    from .. import compat

    if not os.path.isfile(path):
        raise ModelError(f"model.init_from: {path}: no such file")
    copy = keras.models.clone_model(model)
    for v in copy.weights:
        if np.issubdtype(np.dtype(getattr(v.dtype, "name", v.dtype)), np.floating):
            v.assign(np.full(tuple(v.shape), np.nan, np.dtype(getattr(v.dtype, "name", v.dtype))))
    try:
        compat.load_weights_skipping(copy, path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.init_from: {path}: cannot load it as weights of this model ({why[:200]})") from None
    return copy


def _filled(layer) -> str:
    """``all``, ``none`` or ``some``: how much of a layer's floating weights are not NaN."""
    import numpy as np

    values = [np.asarray(w) for w in layer.get_weights() if np.issubdtype(np.asarray(w).dtype, np.floating)]
    nan = [bool(np.isnan(v).any()) for v in values]
    return "none" if values and all(nan) else "some" if any(nan) else "all"


def _plan_weights_file(model, path: str, freeze: bool) -> "InitPlan":
    """``plan_init`` for a ``.weights.h5``: the layers it filled, by the file's own matching
    (Keras 3: layer order and shapes; Keras 2: layer names and shapes)."""
    source = _weights_model(model, path)
    names, left, partial = [], [], []
    for layer in model.layers:
        if layer.name in FIXED or not layer.weights:
            continue
        how = _filled(source.get_layer(layer.name))
        (names if how == "all" else partial if how == "some" else left).append(layer.name)
    if partial or not [n for n in names if n != "head"]:
        what = f"layers {', '.join(partial[:6])} are only partly in it" if partial else "no layer of it fits"
        raise ModelError(f"model.init_from: {path}: {what} (this model is {model.name}): it was written for "
                         "another architecture")
    note = ""
    if "head" in left:
        note = f"a fresh head: the file's classifier does not fit {model.output_shape[-1]} classes"
    if freeze:
        _freeze(model, names)
    return InitPlan(path, source, names, freeze, note, left)


def _shapes(layer) -> list:
    return [tuple(w.shape) for w in layer.weights]


def _class_names(model_file: str) -> list | None:
    import json
    import os

    try:
        with open(os.path.join(os.path.dirname(model_file), "preprocessing.json"), encoding="utf-8") as f:
            return list(json.load(f)["class_names"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan_init(model, path: str, freeze: bool = False, class_names=None) -> InitPlan:
    """Match ``model``'s layers against another hpcjobs model (a ``.keras`` export, an
    export folder or a run directory) by name and weight shapes.  The head is carried
    over when it has this model's classes (names, where both are known), else a fresh
    head is built (and the note says so).  Any other layer of the same name with other shapes, or no
    match at all, is a ModelError naming the layers.  With ``freeze`` the copied
    backbone layers are made non-trainable now, before an optimizer is built."""
    from ..export.model import model_file as resolve

    if is_weights_file(path):
        return _plan_weights_file(model, path, freeze)
    model_file = resolve(path)
    source = load_exported(model_file, unsafe_hint="model.init_from never runs a model's code: export the "
                                                   "source without its Lambda layer",
                           trust_hint="model.init_from imports no code of a bundle's: it takes a model of your "
                                      "own from a run whose model.arch is the same file", imported_ok=True)
    src = {layer.name: layer for layer in source.layers}
    names, differ, note, left = [], [], "", []
    theirs = _class_names(model_file)
    other_classes = class_names is not None and theirs is not None and list(map(str, class_names)) != theirs
    for layer in model.layers:
        if layer.name in FIXED or not layer.weights:
            continue
        if layer.name not in src:
            left.append(layer.name)
            continue
        if layer.name == "head" and other_classes:
            note = f"a fresh head: these classes are not those of {model_file}"
        elif _shapes(layer) == _shapes(src[layer.name]):
            names.append(layer.name)
        elif layer.name == "head":
            note = (f"a fresh head: {model.output_shape[-1]} classes here, {source.output_shape[-1]} in "
                    f"{model_file}")
        else:
            differ.append(layer.name)
        if layer.name == "head" and layer.name not in names:
            left.append("head")
    if differ or not [n for n in names if n != "head"]:
        what = f"layers {', '.join(differ[:6])} differ in shape" if differ else "no layer matches by name"
        raise ModelError(f"model.init_from: {path}: {what} (this model is {model.name}, that one "
                         f"{source.name}): the architectures differ")
    if freeze:
        _freeze(model, names)
    return InitPlan(model_file, source, names, freeze, note, left)


def _freeze(model, names):
    for name in names:
        if name != "head":
            model.get_layer(name).trainable = False


PLAN_FILE = "init_from.json"


def plan_for_run(model, run_dir, path: str, freeze: bool, class_names, resuming: bool) -> InitPlan:
    """``plan_init``, remembered in ``RUN/init_from.json``: a session that resumes from the
    run's own checkpoint (which holds every weight) takes the layers from there and needs
    no source, which may have been moved or deleted since the first session."""
    import json
    import os

    saved = os.path.join(run_dir.path, PLAN_FILE)
    if resuming:
        from ..rundir import read_json_capped

        try:
            d = read_json_capped(saved, 16 << 20, PLAN_FILE)
        except (OSError, ValueError):
            d = None
        if isinstance(d, dict) and d.get("init_from") == path and d.get("frozen") == freeze:
            layers = d.get("layers")
            if isinstance(layers, list) and all(isinstance(n, str) for n in layers) \
                    and isinstance(d.get("path"), str):
                if freeze:
                    _freeze(model, layers)
                left = d.get("left") if isinstance(d.get("left"), list) else []
                return InitPlan(d["path"], None, list(layers), freeze, str(d.get("note", "")), [str(n) for n in left])
            print(f"warning: {saved} is damaged (no 'path' and 'layers' list); matching the layers of "
                  f"{path} again", flush=True)
    plan = plan_init(model, path, freeze, class_names)
    if run_dir.writer:
        from ..rundir import atomic_write

        os.makedirs(run_dir.path, exist_ok=True)
        atomic_write(saved, json.dumps(dict(init_from=path, path=plan.path, layers=plan.layers, frozen=freeze,
                                            note=plan.note, left=plan.left or []), indent=2) + "\n", fsync=False)
    return plan
