"""The export formats: how each is written from ``model.keras``, and how each is run.

* ``saved_model/``: Keras' ``ExportArchive`` (what ``model.export`` uses) with one
  endpoint, ``serve`` (also ``serving_default``): ``image``, uint8 (N, H, W, C) raw
  pixels of the trained size, to ``probabilities`` (N, classes).
* ``model.tflite`` (float32) and ``model.int8.tflite`` (dynamic-range int8 weights):
  converted from that SavedModel (TensorFlow's Keras-model converter path does not
  take Keras 3 models), so they take the same uint8 input.
* ``model.onnx``: tf2onnx from that SavedModel (its frozen graph).  Keras'
  own ``model.export(format="onnx")`` (tf2onnx ``from_function``) is not used: with
  Keras 3.15, TF 2.21 and tf2onnx 1.17 it turns the Normalization layer's mean and
  variance into two extra graph inputs, so the model cannot be run as it is.

A :class:`Runner` runs any of them (and ``model.keras``) on uint8 batches, in numpy
(``predict``) or inside a ``tf.function`` (``tf_call``, for ``hpcjobs infer``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import compat
from . import loading
from . import model as export
from ..errors import UserError
from .model import ExportError
from ..rundir import atomic_path

FILES = {"keras": "model.keras", "saved_model": "saved_model", "tflite": "model.tflite",
         "tflite_int8": "model.int8.tflite", "onnx": "model.onnx"}
INPUT, OUTPUT = "image", "probabilities"


def check_available(formats) -> None:
    """A format whose converter is not installed is a user error before any work."""
    if "onnx" in formats:
        missing = [m for m in ("tf2onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"export.formats: onnx needs {' and '.join(missing)}: "
                              "pip install 'hpcjobs[onnx]' (or leave onnx out)")


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary folder beside ``path``; it replaces ``path`` on success."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp, old = os.path.join(parent, f".tmp-{os.getpid()}-{name}"), os.path.join(parent, f".old-{os.getpid()}-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- writing
def write_saved_model(model, path: str):
    """The SavedModel with the uint8 serving signature, atomically."""
    import keras
    import tensorflow as tf

    shape = tuple(int(d) for d in model.input_shape[1:])

    @tf.function(input_signature=[tf.TensorSpec((None, *shape), tf.uint8, name=INPUT)])
    def serve(image):
        return {OUTPUT: tf.cast(model(tf.cast(image, tf.float32), training=False), tf.float32)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve)
    with atomic_dir(path) as tmp:
        compat.write_export_archive(archive, tmp)


def write_tflite(saved_model: str, path: str, int8: bool = False):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=["serving_default"])
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
    flat = converter.convert()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(flat)


def write_onnx(saved_model: str, path: str):
    import tf2onnx
    from tf2onnx import tf_loader

    import tensorflow as tf

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    tf_logger, level = tf.get_logger(), tf.get_logger().level
    tf_logger.setLevel(logging.ERROR)  # tf2onnx's loader calls TF1 graph functions, each with a notice
    try:
        graph_def, inputs, outputs = tf_loader.from_saved_model(saved_model, None, None, tag="serve",
                                                                signatures=["serving_default"])[:3]
        with atomic_path(path) as tmp:
            tf2onnx.convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs, output_path=tmp)
    finally:
        tf_logger.setLevel(level)


def write_formats(model, folder: str, formats) -> dict[str, str]:
    """Each of ``formats`` (but keras) into ``folder`` from ``model``; their paths.  The
    SavedModel is written first, also when only the others are asked for (then removed)."""
    paths = {f: os.path.join(folder, FILES[f]) for f in formats if f != "keras"}
    if not paths:
        return {}
    saved = paths.get("saved_model") or os.path.join(folder, f".tmp-{os.getpid()}-saved_model-only")
    try:
        write_saved_model(model, saved)
        for fmt, path in paths.items():
            if fmt in ("tflite", "tflite_int8"):
                write_tflite(saved, path, int8=fmt == "tflite_int8")
            elif fmt == "onnx":
                write_onnx(saved, path)
    finally:
        if "saved_model" not in paths:
            shutil.rmtree(saved, ignore_errors=True)
    return paths


# --------------------------------------------------------------------------- running
@dataclass
class Runner:
    """One exported model, ready to run on uint8 batches (N, H, W, C)."""

    kind: str  # keras | saved_model | tflite | onnx
    path: str  # the model file or folder
    folder: str  # the export folder: preprocessing.json
    info: dict  # preprocessing.json
    predict_batch: Callable[[np.ndarray], np.ndarray]  # uint8 batch -> float32 probabilities
    tf_call: Callable  # uint8 tensor -> float32 tensor, inside a tf.function
    model: object = None  # the Keras model (keras only)
    files: list[str] = field(default_factory=list)  # what the model's fingerprint covers

    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        """Probabilities of ``images`` (an array or an h5py dataset), in batches."""
        out = [self.predict_batch(np.asarray(images[a:a + batch_size], np.uint8))
               for a in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.info["class_names"])), np.float32)


def locate(path: str) -> tuple[str, str, str]:
    """(kind, model path, export folder) of a run directory, an export folder, a
    ``model.keras``/``.tflite``/``.onnx`` file or a ``saved_model`` folder."""
    lower = path.lower()
    if os.path.isfile(path) and lower.endswith((".tflite", ".onnx")):
        return ("tflite" if lower.endswith(".tflite") else "onnx"), path, os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return "saved_model", path, os.path.dirname(os.path.abspath(path.rstrip("/")))
    folder = export.find(path)
    return "keras", os.path.join(folder, "model.keras"), folder


def _tree_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)


def _numpy_call(predict_batch, classes: int):
    import tensorflow as tf

    def call(x):
        p = tf.numpy_function(predict_batch, [x], tf.float32, stateful=False)
        p.set_shape([None, classes])
        return p

    return call


def keras_calls(model):
    """(numpy predict_batch, tf call) of a Keras model taking 0..255 pixels."""
    import tensorflow as tf

    def call(x):
        return tf.cast(model(tf.cast(x, tf.float32), training=False), tf.float32)

    shape = tuple(int(d) for d in model.input_shape[1:])
    fn = tf.function(call, input_signature=[tf.TensorSpec((None, *shape), tf.uint8)])  # one trace
    return (lambda x: fn(x).numpy()), call


def model_runner(model, info: dict) -> Runner:
    """A Runner for a Keras model in memory (``hpcjobs export`` before it writes the files)."""
    return Runner("keras", "", "", info, *keras_calls(model), model)


def _keras(path, info, unsafe, trust_code=False):
    model = loading.load(os.path.dirname(path), unsafe=unsafe, trust_code=trust_code)[0]
    return (*keras_calls(model), model)


def _saved_model(path, info, unsafe):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)  # held by ``call``: its variables live as long as the object

    def call(x):
        return loaded.signatures["serving_default"](**{INPUT: tf.cast(x, tf.uint8)})[OUTPUT]

    return (lambda x: call(tf.constant(x)).numpy()), call, None


def tflite_interpreter(path: str):
    """The TFLite interpreter the installed TensorFlow supports: ``tf.lite.Interpreter``
    (deprecated in TF 2.20, still there in 2.21), else ``ai_edge_litert``'s."""
    import warnings

    import tensorflow as tf

    cls = getattr(getattr(tf, "lite", None), "Interpreter", None)
    if cls is None:
        try:
            from ai_edge_litert.interpreter import Interpreter as cls
        except ImportError:
            raise ExportError(f"{path}: this TensorFlow has no tf.lite.Interpreter: pip install ai-edge-litert") \
                from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice, once per process
        return cls(model_path=path)


def _tflite(path, info, unsafe):
    interpreter = tflite_interpreter(path)
    runner = interpreter.get_signature_runner("serving_default")
    classes = len(info["class_names"])

    def predict_batch(x):
        return np.asarray(runner(**{INPUT: np.asarray(x, np.uint8)})[OUTPUT], np.float32)

    return predict_batch, _numpy_call(predict_batch, classes), None


def _onnx(path, info, unsafe):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict_batch(x):
        return np.asarray(session.run(None, {name: np.asarray(x, np.uint8)})[0], np.float32)

    return predict_batch, _numpy_call(predict_batch, len(info["class_names"])), None


_OPEN = {"keras": _keras, "saved_model": _saved_model, "tflite": _tflite, "onnx": _onnx}


def check_sums(folder: str, files: list[str]) -> list[str]:
    """Warn about each of ``files`` that no longer matches the export's SHA256SUMS (changed
    since it was exported); the files that differ.  An export without SHA256SUMS is not checked."""
    import hashlib

    try:
        with open(os.path.join(folder, "SHA256SUMS"), encoding="utf-8") as f:
            sums = dict(reversed(line.rstrip("\n").split("  ", 1)) for line in f if "  " in line)
    except (OSError, ValueError):
        return []
    differ = []
    for path in files:
        rel = os.path.relpath(path, folder)
        if rel not in sums:
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != sums[rel]:
            differ.append(rel)
    if differ:
        print(f"warning: {folder}: {', '.join(differ)} no longer match SHA256SUMS (changed since the export)",
              flush=True)
    return differ


def open_runner(path: str, unsafe: bool = False, trust_code: bool = False) -> Runner:
    """A Runner for any export format (see ``locate``); the Keras model loads with
    safe_mode unless ``unsafe``, and a bundle carrying the user's code (``code/``) only
    with ``trust_code``.  The output width must match the class names."""
    kind, model_path, folder = locate(path)
    info = export.read_info(folder)
    if kind == "onnx":
        check_available(["onnx"])
    try:
        extra = {"trust_code": trust_code} if kind == "keras" else {}  # the other formats hold no Python
        predict_batch, call, model = _OPEN[kind](model_path, info, unsafe, **extra)
    except UserError:  # already one line: a missing file, code refused, another stack's model.keras
        raise
    except Exception as e:  # a damaged file: TF, TFLite and ONNX Runtime raise their own types
        raise ExportError(f"{model_path}: cannot load the {kind} model ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]})") from None
    files = [os.path.join(folder, "preprocessing.json")] + _tree_files(model_path)
    check_sums(folder, files)
    runner = Runner(kind, model_path, folder, info, predict_batch, call, model, files)
    if kind != "keras":
        probe = runner.predict_batch(np.zeros((1, *info["input_shape"]), np.uint8))
        if probe.shape != (1, len(info["class_names"])):
            raise ExportError(f"{model_path}: {probe.shape[-1]} outputs for {len(info['class_names'])} class names")
    return runner
