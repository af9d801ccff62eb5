"""Transfer learning on a built model: weights from another hpcjobs model
(``model.init_from``), which layers train (the head, the top N blocks, all), and the
negative-transfer comparison with a scratch baseline.

A model's parts: its *head* (the ``head`` classifier, ``head_dense*`` layers, and
with ``include_top`` the pretrained classifier), and its *backbone*, cut into the stem
and blocks by :func:`hpcjobs.backbones.blocks` (a keras.applications backbone is the
nested model; a built-in net is its own layers between the normalisation and the head).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import backbones
from ..export.loading import load_exported
from .errors import ModelError

FIXED = ("image", "gray_to_rgb", "resize_to_backbone")  # no weights worth copying or training


def _is_head(layer) -> bool:
    return layer.name == "head" or layer.name.startswith("head_dense")


def parts(model) -> tuple[list, list]:
    """(backbone layers in order, head layers) of an hpcjobs model."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if nested:  # a keras.applications backbone
        base = nested[0]
        inner = [layer for layer in base.layers if type(layer).__name__ != "InputLayer"]
        if type(model.get_layer("head")).__name__ == "Activation":  # include_top: its classifier is the head
            return inner[:-1], [inner[-1]]
        return inner, [layer for layer in model.layers if _is_head(layer)]
    backbone = [layer for layer in model.layers if not _is_head(layer) and layer.name not in FIXED
                and not layer.name.startswith("preprocess_")]
    return backbone, [layer for layer in model.layers if _is_head(layer)]


def set_trainable(model, trainable, bn_trainable: bool = False) -> str:
    """Make ``trainable`` (``head``, ``all`` or ``TopBlocks``) the trainable part of
    ``model``; BatchNormalization layers stay in inference mode unless ``bn_trainable``.
    Returns a description for the log."""
    import keras

    backbone, head = parts(model)
    groups = backbones.blocks(backbone)
    if trainable == "all":
        chosen, what = backbone, "all"
    elif trainable == "head":
        chosen, what = [], "the head"
    else:
        n = min(trainable.top_blocks, max(0, len(groups) - 1))  # the stem comes last: only with all
        chosen = [layer for g in groups[len(groups) - n:] for layer in g]
        what = f"the top {n} of {len(groups) - 1} blocks and the head"
    chosen_ids = {id(layer) for layer in chosen}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layer.trainable = True  # then each inner layer below
    for layer in backbone:
        is_bn = type(layer).__name__ == "BatchNormalization"
        layer.trainable = id(layer) in chosen_ids and (bn_trainable or not is_bn)
    for layer in head:
        layer.trainable = True
    return what


@dataclass
class InitPlan:
    """The layers of a model that ``model.init_from`` fills, found when the model is built."""

    path: str
    source: Any  # the loaded source model
    layers: list[str]  # names of the layers to copy
    frozen: bool
    note: str = ""  # e.g. a fresh head for another number of classes

    def apply(self, model):
        """Copy the planned layers' weights from the source (loaded now if the plan was read
        from the run directory)."""
        if self.source is None:
            self.source = load_exported(self.path)
        src = {layer.name: layer for layer in self.source.layers}
        for name in self.layers:
            model.get_layer(name).set_weights(src[name].get_weights())


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

    model_file = resolve(path)
    source = load_exported(model_file, unsafe_hint="model.init_from never runs a model's code: export the "
                                                   "source without its Lambda layer")
    src = {layer.name: layer for layer in source.layers}
    names, differ, note = [], [], ""
    theirs = _class_names(model_file)
    other_classes = class_names is not None and theirs is not None and list(map(str, class_names)) != theirs
    for layer in model.layers:
        if layer.name in FIXED or layer.name not in src or not layer.weights:
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
    if differ or not [n for n in names if n != "head"]:
        what = f"layers {', '.join(differ[:6])} differ in shape" if differ else "no layer matches by name"
        raise ModelError(f"model.init_from: {path}: {what} (this model is {model.name}, that one "
                         f"{source.name}): the architectures differ")
    if freeze:
        _freeze(model, names)
    return InitPlan(model_file, source, names, freeze, note)


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
                return InitPlan(d["path"], None, list(layers), freeze, str(d.get("note", "")))
            print(f"warning: {saved} is damaged (no 'path' and 'layers' list); matching the layers of "
                  f"{path} again", flush=True)
    plan = plan_init(model, path, freeze, class_names)
    if run_dir.writer:
        from ..rundir import atomic_write

        os.makedirs(run_dir.path, exist_ok=True)
        atomic_write(saved, json.dumps(dict(init_from=path, path=plan.path, layers=plan.layers, frozen=freeze,
                                            note=plan.note), indent=2) + "\n", fsync=False)
    return plan


# what shapes a checkpoint beyond the model's weights: the optimizers, their slots, the stages
CHECKPOINT_KEYS = ("model.arch", "model.freeze_backbone", "model.init_from", "model.bn_trainable",
                   "optimizer.name", "optimizer.amsgrad", "optimizer.reduce_on_plateau.patience",
                   "training.stages", "training.precision")


def config_differs(path: str, cfg) -> str | None:
    """The keys that make ``--from PATH``'s checkpoint a different training state than
    ``cfg`` would build (None when they agree, or when PATH has no config.yaml)."""
    import os

    import yaml

    from ..config import to_dict

    for candidate in (os.path.join(path, "config.yaml"), os.path.join(os.path.dirname(path), "..", "config.yaml")):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                theirs = yaml.safe_load(f) or {}
            break
    else:
        return None
    ours = to_dict(cfg)

    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    keys = [k for k in CHECKPOINT_KEYS if get(theirs, k) != get(ours, k)]
    return ", ".join(keys) or None


def compare(transferred: list[dict], scratch: list[dict], epochs: int, key: str = "val_accuracy") -> dict:
    """The two curves at ``epochs`` and whether transfer is behind (negative transfer)."""
    def at(rows):
        rows = [r for r in rows if r["epoch"] <= epochs and key in r]
        return rows[-1][key] if rows else math.nan

    a, b = at(transferred), at(scratch)
    return {"epochs": epochs, "metric": key, "transferred": a, "scratch": b,
            "behind": bool(a < b), "transferred_curve": [r.get(key) for r in transferred[:epochs]],
            "scratch_curve": [r.get(key) for r in scratch[:epochs]]}


def scratch_config(cfg, epochs: int):
    """``cfg`` from scratch: no pretrained or copied weights, one stage of ``epochs``."""
    import dataclasses

    from ..config.transfer import TransferConfig

    model = dataclasses.replace(cfg.model, init_from=None, weights=None, freeze_backbone=False)
    training = dataclasses.replace(cfg.training, epochs=epochs, stages=())
    return dataclasses.replace(cfg, model=model, training=training, transfer=TransferConfig())


def check_negative_transfer(cfg, run_dir: str, train, verbose: bool = True) -> dict:
    """``transfer.compare_scratch_epochs`` / ``transfer.baseline``: the run's validation
    accuracy after K epochs against a scratch baseline's (trained now in
    ``RUN/scratch-baseline``, or an existing run); both curves go into run.json and a
    warning is printed when the transferred model is behind."""
    import os

    from ..rundir import RunDir

    rd = RunDir(run_dir)
    mine = rd.read_metrics()
    if cfg.transfer.baseline:
        base_dir, k = cfg.transfer.baseline, cfg.transfer.compare_scratch_epochs or len(mine)
    else:
        k = cfg.transfer.compare_scratch_epochs
        base_dir = os.path.join(run_dir, "scratch-baseline")
        rc = train(scratch_config(cfg, k), base_dir, verbose=False)
        if rc != 0:
            return {}
    result = dict(compare(mine, RunDir(base_dir).read_metrics(), k), baseline=os.path.abspath(base_dir))
    rd.update_record(transfer_check=result)
    if verbose:
        word = "WARNING: negative transfer" if result["behind"] else "transfer helps"
        print(f"{word}: after {k} epoch(s) val_accuracy {result['transferred']:.4f} transferred vs "
              f"{result['scratch']:.4f} from scratch ({result['baseline']})", flush=True)
    return result
