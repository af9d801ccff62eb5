"""Models: the built-in nets, any keras.applications architecture by name, the head,
transfer learning and freezing.

Every model takes raw pixel values (0..255, float) and starts with its own
normalisation layer (the training split's statistics, or a 1/255 rescale), so the
exported model needs nothing but the geometric preprocessing in preprocessing.json.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import ModelConfig
from .config_checks import BUILTIN_ARCHS as BUILTIN
from .errors import UserError


class ModelError(UserError, ValueError):
    """A model that cannot be built or loaded as configured (exit code 2)."""


def _normalizer(keras, normalize: str, mean, std):
    if normalize == "rescale":
        return keras.layers.Rescaling(1.0 / 255.0, name="normalize")
    mean = np.asarray(mean, np.float32)
    return keras.layers.Normalization(mean=mean, variance=np.asarray(std, np.float32) ** 2, name="normalize")


def _kernel(keras, cfg: ModelConfig) -> dict:
    """The built-in nets' kernel settings: He initialisation and ``model.l2``."""
    return dict(kernel_initializer="he_normal",
                kernel_regularizer=keras.regularizers.L2(cfg.l2) if cfg.l2 else None)


def _simple_cnn(keras, x, cfg: ModelConfig):
    """The seed's convnet: Conv32-Conv64-Pool-Dense128 (with dropout)."""
    L = keras.layers
    w = cfg.width
    kernel = _kernel(keras, cfg)
    x = L.Conv2D(w, 3, activation="relu", name="conv1", **kernel)(x)
    x = L.Conv2D(2 * w, 3, activation="relu", name="conv2", **kernel)(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Dropout(cfg.dropout / 2, name="dropout1")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(128, activation="relu", name="dense1", **kernel)(x)
    return L.Dropout(cfg.dropout, name="dropout2")(x)


def _small_resnet(keras, x, cfg: ModelConfig):
    """Three stages of one residual block each (width, 2x, 4x), global average pooling."""
    L = keras.layers
    w = cfg.width
    kernel = _kernel(keras, cfg)
    x = L.Conv2D(w, 3, padding="same", use_bias=False, name="stem_conv", **kernel)(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.Activation("relu", name="stem_relu")(x)
    for stage, filters in enumerate((w, 2 * w, 4 * w)):
        stride = 1 if stage == 0 else 2
        p = f"stage{stage + 1}"
        y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{p}_conv1", **kernel)(x)
        y = L.BatchNormalization(name=f"{p}_bn1")(y)
        y = L.Activation("relu", name=f"{p}_relu1")(y)
        y = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{p}_conv2", **kernel)(y)
        y = L.BatchNormalization(name=f"{p}_bn2")(y)
        if stride != 1 or x.shape[-1] != filters:
            x = L.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{p}_proj", **kernel)(x)
            x = L.BatchNormalization(name=f"{p}_proj_bn")(x)
        x = L.Activation("relu", name=f"{p}_out")(L.Add(name=f"{p}_add")([x, y]))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return L.Dropout(cfg.dropout, name="dropout")(x)


def _application(keras, x, cfg: ModelConfig, input_shape):
    apps = keras.applications
    names = sorted(n for n in dir(apps) if n[:1].isupper() and callable(getattr(apps, n)))
    ctor = getattr(apps, cfg.arch) if cfg.arch in names else None  # never __class__ or a submodule
    if ctor is None:
        import difflib

        close = difflib.get_close_matches(cfg.arch, list(BUILTIN) + names, 1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (built-in: {', '.join(BUILTIN)})"
        raise ModelError(f"model.arch: unknown architecture '{cfg.arch}'{hint}")
    if input_shape[-1] != 3:
        raise ModelError(f"model.arch: {cfg.arch} needs 3 channels; set data.channels: 3")
    weights = cfg.weights
    if weights is not None and not os.path.isfile(weights):
        raise ModelError(f"model.weights: no such file: {weights} (weights are never downloaded)")
    try:
        base = ctor(include_top=False, weights=weights, input_shape=tuple(input_shape), pooling="avg")
    except ValueError as e:
        raise ModelError(f"model.arch: {cfg.arch}: {str(e).splitlines()[0]}") from None
    base.trainable = not cfg.freeze_backbone
    x = base(x)
    return keras.layers.Dropout(cfg.dropout, name="dropout")(x)


def build(cfg: ModelConfig, input_shape, num_classes: int, mean, std, normalize: str = "standardize"):
    """A Keras model from raw pixels (float 0..255) to class probabilities."""
    import keras

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _normalizer(keras, normalize, mean, std)(inputs)
    if cfg.arch == "simple_cnn":
        x = _simple_cnn(keras, x, cfg)
    elif cfg.arch == "small_resnet":
        x = _small_resnet(keras, x, cfg)
    else:
        x = _application(keras, x, cfg, input_shape)
    # float32 probabilities whatever the precision policy (mixed_float16/bfloat16 compute in half)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="head", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=cfg.arch)


def code_objects(path: str) -> list[str]:
    """What in a ``.keras`` file's config would run Python code from the file or from
    outside Keras when loaded: Lambda layers (serialized lambdas) and foreign classes."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            stack = [json.loads(z.read("config.json"))]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []  # load_model says what is wrong with the file
    found = []
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            cls, module, conf = node.get("class_name"), node.get("module"), node.get("config")
            if cls == "Lambda":
                found.append(f"a Lambda layer ({conf.get('name') if isinstance(conf, dict) else 'unnamed'})")
            elif cls == "__lambda__" or isinstance(module, str) and module.split(".")[0] not in ("keras", "builtins"):
                found.append(f"Python code ({module or ''}.{cls})" if cls != "__lambda__" else "a Python lambda")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(set(found))


def load_exported(path: str, unsafe: bool = False):
    """Load a ``.keras`` file with safe_mode=True (no code from the file runs): a model
    holding a Lambda layer or another class from outside Keras is refused in one line,
    unless ``unsafe`` (``--unsafe``: the file's code runs)."""
    import keras

    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file")
    code = code_objects(path)
    if code and not unsafe:
        raise ModelError(f"{path}: holds {', '.join(code)}, code that would run on loading; refused "
                         "(safe mode). Pass --unsafe only for a model from a source you trust")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as e:  # keras raises many types for a bad file
        raise ModelError(f"{path}: cannot load model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


@dataclass
class InitPlan:
    """The layers of a model that ``model.init_from`` fills, found when the model is built."""

    path: str
    source: Any  # the loaded source model
    layers: list[str]  # names of the layers to copy
    frozen: bool

    def apply(self, model):
        """Copy the planned layers' weights from the source."""
        src = {layer.name: layer for layer in self.source.layers}
        for name in self.layers:
            model.get_layer(name).set_weights(src[name].get_weights())


def plan_init(model, path: str, freeze: bool = False) -> InitPlan:
    """Match ``model``'s layers against another hpcjobs model (a ``.keras`` export, an
    export folder or a run directory) by name and weight shapes; the head and the
    normalisation layer never match.  With ``freeze`` the matched layers are made
    non-trainable now, before an optimizer is built for the model."""
    from .export import model_file as resolve

    model_file = resolve(path)
    source = load_exported(model_file)
    src = {layer.name: layer for layer in source.layers}
    names = []
    for layer in model.layers:
        if layer.name in ("head", "normalize", "image") or layer.name not in src:
            continue
        theirs = src[layer.name].get_weights()
        mine = layer.get_weights()
        if mine and len(theirs) == len(mine) and all(a.shape == b.shape for a, b in zip(theirs, mine)):
            names.append(layer.name)
    if not names:
        raise ModelError(f"model.init_from: {path}: no layer matches this model's layers")
    if freeze:
        for name in names:
            model.get_layer(name).trainable = False
    return InitPlan(model_file, source, names, freeze)
