"""Pretrained backbones from ``keras.applications``: their own input preprocessing,
their weights from local files (never downloaded at run time), and their blocks, the
unit of staged unfreezing.

Preprocessing.  Each family expects its own input (``preprocess_input``): *caffe*
(ResNet, VGG: RGB to BGR, minus the ImageNet mean), *tf* (MobileNet, Inception,
Xception, NASNet, ResNetV2: scaled to -1..1), *torch* (DenseNet: 0..1, minus mean,
over std), or *none* (EfficientNet, ConvNeXt, MobileNetV3 rescale inside the model).
:func:`preprocessing` builds that as plain Keras layers in front of the backbone, so
the model (and its export) takes raw 0..255 pixels like every hpcjobs model; gray
images are repeated to 3 channels and small images resized up to the family's
minimum input size inside the model too.

Weights.  ``model.weights`` is a file path, or ``imagenet``: the file Keras itself
would download, looked up in the Keras cache (``model.weights_cache``, else
``$KERAS_HOME/models``, else ``~/.keras/models``).  ``hpcjobs weights fetch NAME``,
on a login node, puts it there (``hpcjobs.weights``).

Blocks.  A backbone's layers in order are cut into the stem and blocks: after every
``Add`` for residual nets (a ResNet block ends in its Add), else after every layer
with weights.  ``{top_blocks: N}`` unfreezes the last N blocks; the stem comes last
(only ``all`` unfreezes it).
"""
from __future__ import annotations

import os

from .. import compat
from .errors import ModelError

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MODES = {"resnet": "caffe", "vgg16": "caffe", "vgg19": "caffe", "densenet": "torch",
         "mobilenet": "tf", "mobilenet_v2": "tf", "inception_v3": "tf", "inception_resnet_v2": "tf",
         "xception": "tf", "nasnet": "tf", "resnet_v2": "tf",
         "efficientnet": "none", "efficientnet_v2": "none", "convnext": "none", "mobilenet_v3": "none"}
MIN_SIZE = {"inception_v3": 75, "inception_resnet_v2": 75, "xception": 71}  # others: 32


def constructor(arch: str):
    import keras

    return getattr(keras.applications, arch)


def family(arch: str) -> str:
    """The keras.applications module of ``arch`` (resnet, mobilenet_v2, ...)."""
    return constructor(arch).__module__.rsplit(".", 1)[-1]


def preprocess_mode(arch: str) -> str:
    return MODES.get(family(arch), "tf")


def min_size(arch: str) -> int:
    return MIN_SIZE.get(family(arch), 32)


def preprocessing(keras, arch: str, input_shape) -> list:
    """Layers from raw 0..255 pixels to ``arch``'s expected input (see the module doc)."""
    import numpy as np

    L, layers = keras.layers, []
    h, w, c = input_shape
    if c == 1:
        layers.append(L.Concatenate(name="gray_to_rgb"))  # called on [x, x, x]
    size = min_size(arch)
    if min(h, w) < size:
        scale = size / min(h, w)
        layers.append(L.Resizing(int(round(h * scale)), int(round(w * scale)), name="resize_to_backbone"))
    mode = preprocess_mode(arch)
    if mode == "tf":
        layers.append(L.Rescaling(1 / 127.5, offset=-1.0, name="preprocess_tf"))
    elif mode == "torch":
        layers.append(L.Rescaling(1 / 255.0, name="preprocess_torch_scale"))
        layers.append(L.Normalization(mean=np.array(TORCH_MEAN, np.float32),
                                      variance=np.square(np.array(TORCH_STD, np.float32)),
                                      name="preprocess_torch"))
    elif mode == "caffe":  # RGB -> BGR and minus the mean: one fixed, frozen 3x3 map on the channels
        swap = np.eye(3, dtype=np.float32)[::-1]
        layers.append(L.Dense(3, name="preprocess_caffe", trainable=False,
                              kernel_initializer=keras.initializers.Constant(swap),
                              bias_initializer=keras.initializers.Constant(-np.array(CAFFE_MEAN_BGR, np.float32))))
    return layers


def apply(layers: list, x):
    for layer in layers:
        x = layer([x, x, x]) if layer.name == "gray_to_rgb" else layer(x)
    return x


def cache_dir(setting: str | None) -> str:
    """Where ``imagenet`` weights live: the config's, else Keras' own cache."""
    if setting:
        return setting
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def weights_request(arch: str, input_shape, include_top: bool = False) -> dict:
    """The file Keras would download for ``arch``'s imagenet weights (name, origin, hash)."""
    shape = tuple(input_shape) if not include_top else None
    return compat.keras_weights_request(constructor(arch), include_top=include_top, input_shape=shape)


def resolve_weights(arch: str, setting: str | None, cache: str | None, input_shape, include_top: bool):
    """A local weights file for ``model.weights`` (None: random); never downloads.
    A missing file raises ModelError naming it and the command that fetches it."""

    if setting is None:
        return None
    if setting != "imagenet":
        if not os.path.isfile(setting):
            raise ModelError(f"model.weights: no such file: {setting} (weights are never downloaded)")
        return setting
    req = weights_request(arch, input_shape, include_top)
    path = os.path.join(cache_dir(cache), req["fname"])
    if not os.path.isfile(path):
        top = " --include-top" if include_top else ""
        raise ModelError(f"model.weights: imagenet: {path} is missing (compute nodes never download); fetch it "
                         f"on a login node: hpcjobs weights fetch {arch}{top}"
                         + (f" --cache {cache}" if cache else ""))
    return path


def classifier_classes(weights_path: str) -> int | None:
    """The class count of the classifier in a keras.applications weights file written with
    its top (the ``predictions`` layer's kernel: Keras 2's and the downloads' layout name it;
    Keras 3's ``.weights.h5`` numbers its dense layers, the classifier last); None if none."""
    import h5py

    kernels: list[tuple[str, tuple]] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and len(obj.shape) == 2:
            kernels.append((name, tuple(obj.shape)))

    try:
        with h5py.File(weights_path, "r") as f:
            f.visititems(visit)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.weights: {weights_path}: not a readable weights file ({e})") from None
    named = [shape for name, shape in kernels if "predictions" in name]
    if named:
        return int(named[-1][-1])

    def dense_number(name: str) -> int | None:  # layers/dense_2/vars/0 -> 2, layers/dense/... -> 0
        part = next((p for p in name.split("/") if p == "dense" or p.startswith("dense_")), None)
        return None if part is None else int(part[6:]) if part[6:].isdigit() else 0

    dense = sorted((dense_number(name), shape) for name, shape in kernels if dense_number(name) is not None)
    return int(dense[-1][1][-1]) if dense else None


def blocks(layers: list) -> list[list]:
    """[stem, block 1, ..., block N] of a backbone's layers in order (see the module doc)."""
    residual = any(type(layer).__name__ == "Add" for layer in layers)
    groups, current = [], []
    for layer in layers:
        if type(layer).__name__ == "InputLayer":
            continue
        current.append(layer)
        ends = type(layer).__name__ == "Add" if residual else bool(layer.weights)
        if ends:
            groups.append(current)
            current = []
    if current:  # layers after the last block (activations, pooling) belong to it
        if groups:
            groups[-1] += current
        else:
            groups.append(current)
    if residual and groups:  # the stem: the first group's layers not named like its block's Add
        prefix = groups[0][-1].name.rsplit("_", 1)[0]
        stem = [layer for layer in groups[0] if not layer.name.startswith(prefix)]
        if stem and len(stem) < len(groups[0]):
            groups[0] = [layer for layer in groups[0] if layer.name.startswith(prefix)]
            groups.insert(0, stem)
    return groups
