"""Which layers of a built model train: its parts (the head, and the backbone cut into the
stem and blocks by :func:`hpcjobs.models.backbones.blocks`; a keras.applications backbone is
the nested model, a built-in net its own layers between the normalisation and the head),
and the trainable part (``head``, the top N blocks, ``all``)."""
from __future__ import annotations

from . import backbones
from .build import USER_OUTPUT
from .errors import ModelError


FIXED = ("image", "gray_to_rgb", "resize_to_backbone")  # no weights worth copying or training


def _is_head(layer) -> bool:
    return layer.name == "head" or layer.name.startswith("head_dense")


def parts(model) -> tuple[list, list]:
    """(backbone layers in order, head layers) of an hpcjobs model."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if nested and model.layers[-1].name == USER_OUTPUT:  # the user's own model: its last layer is the head
        inner = [layer for layer in nested[0].layers if type(layer).__name__ != "InputLayer"]
        last = max((i for i, layer in enumerate(inner) if layer.weights), default=len(inner) - 1)
        return inner[:last], inner[last:]
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
    if isinstance(trainable, (tuple, list)):  # layers by name or prefix, of any model
        return _set_named(model, backbone + head, trainable, bn_trainable)
    if trainable == "all":
        chosen, what = backbone, "all"
    elif trainable == "head":
        chosen, what = [], "the head"
    elif len(groups) < 2:
        raise ModelError(f"training.stages: trainable: top_blocks, but {model.name} has no blocks; name its "
                         "layers (trainable: [names or prefixes]), or use head or all")
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


def _set_named(model, layers: list, names, bn_trainable: bool) -> str:
    """Only the layers named (a name, or a prefix of names) train; a name matching none is exit 2."""
    import keras

    unmatched = [n for n in names if not any(layer.name == n or layer.name.startswith(n) for layer in layers)]
    if unmatched:
        shown = ", ".join(layer.name for layer in layers[:12]) + (" ..." if len(layers) > 12 else "")
        raise ModelError(f"training.stages: trainable: no layer is named {unmatched[0]!r} or starts with it "
                         f"(layers: {shown})")
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layer.trainable = True
    chosen = [layer for layer in layers if any(layer.name == n or layer.name.startswith(n) for n in names)]
    ids = {id(layer) for layer in chosen}
    for layer in layers:
        is_bn = type(layer).__name__ == "BatchNormalization"
        layer.trainable = id(layer) in ids and (bn_trainable or not is_bn)
    return f"the layers {', '.join(names)} ({len(chosen)} layers)"
