"""Which layers of a built model train: its parts (the head, and the backbone cut into the
stem and blocks by :func:`hpcjobs.models.backbones.blocks`; a keras.applications backbone is
the nested model, a built-in net its own layers between the normalisation and the head),
and the trainable part (``head``, the top N blocks, ``all``)."""
from __future__ import annotations

from . import backbones


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
