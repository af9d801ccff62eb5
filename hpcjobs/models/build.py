"""Models: the built-in nets, any keras.applications architecture by name, the head,
transfer learning and freezing.

Every model takes raw pixel values (0..255, float) and starts with its own
normalisation layer (the training split's statistics, or a 1/255 rescale), so the
exported model needs nothing but the geometric preprocessing in preprocessing.json.
"""
from __future__ import annotations

import numpy as np

from .. import compat, plugins
from ..errors import first_line
from ..config import ModelConfig
from ..config import BUILTIN_ARCHS as BUILTIN
from ..config import unknown_arch
from .errors import ModelError


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


def _application(keras, x, cfg: ModelConfig, input_shape, num_classes: int):
    """A keras.applications backbone with its own preprocessing, and the head."""
    from . import backbones

    apps = keras.applications
    names = sorted(n for n in dir(apps) if n[:1].isupper() and callable(getattr(apps, n)))
    ctor = getattr(apps, cfg.arch) if cfg.arch in names else None  # never __class__ or a submodule
    if ctor is None:
        raise ModelError(f"model.{unknown_arch(cfg.arch, names)}")
    pre = backbones.preprocessing(keras, cfg.arch, input_shape)
    x = backbones.apply(pre, x)
    shape = tuple(int(d) for d in x.shape[1:])
    top = cfg.head.include_top
    weights = backbones.resolve_weights(cfg.arch, cfg.weights, cfg.weights_cache, shape, top)
    if top and weights is not None:  # the pretrained classifier is kept as it is: its classes must be the data's
        theirs = 1000 if cfg.weights == "imagenet" else backbones.classifier_classes(weights)
        if theirs is not None and theirs != num_classes:
            raise ModelError(f"model.head.include_top: the pretrained classifier of {cfg.arch} has {theirs} classes, "
                             f"the data {num_classes}; it is kept only for as many classes (set include_top: false "
                             "for a new head)")
    kw = dict(classes=num_classes, classifier_activation="softmax") if top else dict(pooling=None)
    try:
        base = ctor(include_top=top, weights=weights, input_shape=shape, **kw)
    except ValueError as e:
        raise ModelError(f"model.arch: {cfg.arch}: {str(e).splitlines()[0]}") from None
    base.trainable = not cfg.freeze_backbone
    x = base(x)
    if top:  # the pretrained classifier is the head
        return keras.layers.Activation("linear", dtype="float32", name="head")(x)
    pool = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D,
            "flatten": keras.layers.Flatten}[cfg.head.pooling]
    return _head(keras, pool(name="pool")(x), cfg, num_classes)


KERASHUB = "kerashub:"


def _kerashub(keras, x, cfg: ModelConfig, input_shape, num_classes: int):
    """A KerasHub preset saved in a local folder (``model.arch: kerashub:PATH``): its backbone,
    with the preset's own image preprocessing (its ImageConverter: size, scale, offset) as plain
    Keras layers in front, and a new head for the data's classes.  The backbone is re-wrapped
    as a plain functional model, so stages and freezing see its layers as those of a
    keras.applications backbone.  Nothing is downloaded: a folder that is no preset is exit 2."""
    import json
    import os

    from . import backbones

    path = cfg.arch[len(KERASHUB):]
    try:
        import keras_hub
    except ImportError as e:
        raise ModelError(f"model.arch: {cfg.arch}: KerasHub is not installed ({e}); install keras-hub 0.32 "
                         "(pip install --no-deps 'keras-hub>=0.32,<0.33' regex tokenizers sentencepiece "
                         "'kagglehub!=1.0.1' kagglesdk==0.1.28, see the README)") from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"model.arch: {cfg.arch}: {path} is not a KerasHub preset folder (no config.json; "
                         "write one with save_to_preset)")
    try:
        backbone = keras_hub.models.Backbone.from_preset(path)
    except Exception as e:  # noqa: BLE001 -- KerasHub raises many types for a bad preset; one line, exit 2
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.arch: {cfg.arch}: cannot load the preset's backbone ({why[:200]})") from None
    converter = {}
    if os.path.isfile(os.path.join(path, "image_converter.json")):
        with open(os.path.join(path, "image_converter.json"), encoding="utf-8") as f:
            converter = json.load(f).get("config", {})
    L = keras.layers
    h, w, c = input_shape
    if c == 1 and backbone.input_shape[-1] == 3:
        x = backbones.apply([L.Concatenate(name="gray_to_rgb")], x)
    size = converter.get("image_size")
    if size and tuple(size) != (h, w):
        x = L.Resizing(int(size[0]), int(size[1]), interpolation=converter.get("interpolation", "bilinear"),
                       crop_to_aspect_ratio=bool(converter.get("crop_to_aspect_ratio", False)),
                       name="resize_to_backbone")(x)
    scale, offset = converter.get("scale"), converter.get("offset")
    if scale is not None or offset is not None:
        x = L.Rescaling(1.0 if scale is None else scale, offset=0.0 if offset is None else offset,
                        name="preprocess_kerashub")(x)
    name = "kerashub_" + (os.path.basename(os.path.normpath(path)) or "preset")
    base = keras.Model(backbone.input, backbone.output, name=backbone.name)
    base.trainable = not cfg.freeze_backbone
    x = base(x)
    if len(x.shape) == 3:  # tokens (a transformer's sequence): their mean
        x = L.GlobalAveragePooling1D(name="pool")(x)
    else:
        pool = {"avg": L.GlobalAveragePooling2D, "max": L.GlobalMaxPooling2D, "flatten": L.Flatten}[cfg.head.pooling]
        x = pool(name="pool")(x)
    return _head(keras, x, cfg, num_classes), name


def _head(keras, x, cfg: ModelConfig, num_classes: int):
    """``model.head.dense`` layers, dropout, and the classifier (float32 probabilities
    whatever the precision policy: mixed_float16/bfloat16 compute in half)."""
    for i, units in enumerate(cfg.head.dense):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense{i + 1}", **_kernel(keras, cfg))(x)
    if cfg.arch not in BUILTIN:  # the built-in nets end in their own dropout
        x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    l2 = keras.regularizers.L2(cfg.l2) if cfg.l2 else None
    return keras.layers.Dense(num_classes, activation="softmax", name="head", dtype="float32", kernel_regularizer=l2)(x)


USER_OUTPUT = "probabilities"  # the last layer of a model around the user's own (see ``freeze.parts``)


def _user_net(keras, cfg: ModelConfig, input_shape, num_classes: int):
    """The user's own network: ``build(input_shape, num_classes, **model.options)`` from
    ``model.arch``, checked to be a keras.Model with ``(None, num_classes)`` outputs."""
    fn = plugins.resolve(cfg.arch, "model", "model.arch")
    where = plugins.where(cfg.arch)
    net = plugins.call(fn, "model.arch", where, tuple(int(d) for d in input_shape), num_classes, **cfg.options)
    if not isinstance(net, keras.Model):
        raise ModelError(f"model.arch: {where}: {fn.__name__} returned a {type(net).__name__}, not a keras.Model")
    try:
        shape = tuple(net.output_shape)
    except (AttributeError, ValueError, RuntimeError):
        shape = None
    if shape is None or len(shape) != 2 or shape[1] != num_classes:
        raise ModelError(f"model.arch: {where}: {fn.__name__} returned a model with outputs of shape {shape}; "
                         f"expected (None, {num_classes}): one {cfg.outputs} vector over the {num_classes} classes")
    return net


def _user(keras, inputs, cfg: ModelConfig, input_shape, num_classes: int, normalize: str, mean, std):
    """The run's normalisation, the user's network, and (for logits) a softmax, in float32."""
    net = _user_net(keras, cfg, input_shape, num_classes)
    try:
        x = net(_normalizer(keras, normalize, mean, std)(inputs))
    except Exception as e:
        raise ModelError(f"model.arch: {plugins.where(cfg.arch)}: the model does not take images of shape "
                         f"{tuple(input_shape)} ({first_line(e)})") from None
    if cfg.outputs == "logits":
        return keras.layers.Softmax(dtype="float32", name=USER_OUTPUT)(x)
    return keras.layers.Activation("linear", dtype="float32", name=USER_OUTPUT)(x)


def build(cfg: ModelConfig, input_shape, num_classes: int, mean, std, normalize: str = "standardize"):
    """A Keras model from raw pixels (float 0..255) to class probabilities."""
    import keras

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    if plugins.is_spec(cfg.arch):
        outputs = _user(keras, inputs, cfg, input_shape, num_classes, normalize, mean, std)
        model = keras.Model(inputs, outputs, name="user_model")
        compat.init_random_layers(model)
        return model
    name = cfg.arch
    if cfg.arch in BUILTIN:
        x = _normalizer(keras, normalize, mean, std)(inputs)
        x = (_simple_cnn if cfg.arch == "simple_cnn" else _small_resnet)(keras, x, cfg)
        outputs = _head(keras, x, cfg, num_classes)
    elif cfg.arch.startswith(KERASHUB):  # the preset's own preprocessing
        outputs, name = _kerashub(keras, inputs, cfg, input_shape, num_classes)
    else:  # the backbone's own preprocessing, not the run's normalisation
        outputs = _application(keras, inputs, cfg, input_shape, num_classes)
    model = keras.Model(inputs, outputs, name=name)
    compat.init_random_layers(model)  # their generator states exist before a checkpoint is made
    return model
