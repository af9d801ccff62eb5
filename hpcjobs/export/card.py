"""``model_card.md``: what a person needs to judge and use a shared model.

A Hugging Face style card: a YAML header (``library_name``, ``pipeline_tag:
image-classification``, ``metrics``, ``tags`` and a ``model-index`` with the test
figures), then the model, the data and its splits, the test metrics with the
per-class table (and the confusion matrix up to 20 classes), the formats and their
parity with model.keras, the input format with code for each format, the training
config, intended use and limits, and the versions.
"""
from __future__ import annotations

import math
import os
import platform

import numpy as np
import yaml

from ..evaluation import metrics
from ..compat import keras_major
from ..config import to_dict
from ..rundir import atomic_write
from .formats import FILES

SPLIT_WORDS = {"train": "train", "val": "validation", "test": "test"}
DESCRIBED = {"keras": "Keras {major} (`keras.saving.load_model`, safe_mode; loads on Keras {major} only)",
             "saved_model": "TensorFlow SavedModel (TF Serving), `serving_default`",
             "tflite": "TensorFlow Lite, float32", "tflite_int8": "TensorFlow Lite, dynamic-range int8 weights",
             "onnx": "ONNX (tf2onnx), ONNX Runtime"}


def versions(formats) -> dict[str, str]:
    import importlib.metadata as md

    import keras
    import tensorflow as tf

    from .. import __version__

    out = {"hpcjobs": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
           "numpy": np.__version__, "python": platform.python_version()}
    if "onnx" in formats:
        for name in ("tf2onnx", "onnxruntime"):
            try:
                out[name] = md.version(name)
            except md.PackageNotFoundError:
                pass
    return out


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a proportion ``p`` measured on ``n`` samples."""
    if n == 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def header(cfg, report) -> str:
    fields = {"library_name": "keras", "pipeline_tag": "image-classification",
              "tags": ["hpcjobs", "keras", "tensorflow", "image-classification"],
              "metrics": ["accuracy", "f1", "precision", "recall"]}
    if report is not None:
        fields["model-index"] = [{"name": cfg.name, "results": [{
            "task": {"type": "image-classification", "name": "Image classification"},
            "dataset": {"name": str(cfg.data.source), "type": str(cfg.data.source), "split": "test"},
            "metrics": [{"type": "accuracy", "value": round(report.accuracy, 4), "name": "Test accuracy"},
                        {"type": "f1", "value": round(report.macro_f1, 4), "name": "Test macro F1",
                         "args": {"average": "macro"}}]}]}]
    return "---\n" + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True) + "---\n"


def _shape_words(shape) -> str:
    h, w, c = shape
    return f"{h} x {w} x {c} ({'grayscale' if c == 1 else 'RGB'})"


def model_section(cfg, info, training, model) -> str:
    names = info["class_names"]
    shown = ", ".join(f"`{n}`" for n in names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    if training.get("weights") == "best":
        weights = (f"the weights of epoch {training['best_epoch']} of {training.get('epochs', '?')}, the best by "
                   f"`{training['monitor']}` ({training['best']:.4f})")
    else:
        weights = f"the last weights (step {training.get('step', '?')} of {training.get('total_steps', '?')})"
    return (f"# {cfg.name}: `{cfg.model.arch}` image classifier, {len(names)} classes\n\n"
            f"An image classifier trained with hpcjobs. Architecture `{cfg.model.arch}`, "
            f"{model.count_params():,} parameters; input {_shape_words(info['input_shape'])} raw pixels; "
            f"output the probabilities of {len(names)} classes: {shown} (`labels.txt`, one a line, in output "
            f"order). This export holds {weights}.\n")


def data_section(cfg, data) -> str:
    d = cfg.data
    counts = {s: np.bincount(data.splits[s].labels, minlength=data.num_classes) for s in SPLIT_WORDS}
    total = sum(len(data.splits[s]) for s in SPLIT_WORDS)
    lines = ["## Data and splits", "",
             f"- Source: `{d.source}`" + (f" (prepared into the store `{d.store}`)" if d.store else "")
             + f": {total:,} images" + (f", {len(data.skipped)} unreadable ones skipped" if data.skipped else ""),
             f"- Split: stratified by class (seed {d.seed}): "
             + " / ".join(f"{len(data.splits[s]):,} {w}" for s, w in SPLIT_WORDS.items())
             + (f"; K-fold: fold {d.fold} of {d.folds}" if d.folds else ""),
             *([f"- Test split: the source's own test set, {len(data.splits['test']):,} images ({data.test_origin}), "
                "kept apart as the source published it (`data.test_split: source`); validation is split from "
                "the rest"] if getattr(data, "test_origin", "") else []),
             f"- Images: {_shape_words(data.image_shape)} after the preprocessing below; normalisation "
             f"`{d.normalize}` inside the model",
             f"- Image path: `{data.image_path}` made these images ({data.image_path_about}); "
             "`hpcjobs infer` preprocesses with the same", "",
             "| class | train | validation | test |", "|---|---:|---:|---:|"]
    for c, name in list(enumerate(data.class_names))[:50]:
        lines.append(f"| {metrics.cell(name)} | " + " | ".join(str(int(counts[s][c])) for s in SPLIT_WORDS) + " |")
    if data.num_classes > 50:
        lines.append(f"| ... {data.num_classes - 50} more classes | | | |")
    return "\n".join(lines) + "\n"


def metrics_section(report) -> str:
    if report is None:
        return "## Test metrics\n\nNot measured: this run has no test split (`data.test_split: 0`).\n"
    lo, hi = wilson(report.accuracy, report.count)
    avg = report.averages()
    tops = ", ".join(f"top-{k[4:]} {v:.4f}" for k, v in report.top_k().items() if k != "top_1")
    lines = ["## Test metrics", "",
             f"On the {report.count:,} test images, held out from training and from the choice of the best epoch:",
             "",
             f"- Accuracy **{report.accuracy:.4f}** (95% interval {lo:.3f} to {hi:.3f})" + (f"; {tops}" if tops else ""),
             f"- Macro F1 **{avg['macro']['f1']:.4f}**, weighted F1 {avg['weighted']['f1']:.4f}; "
             f"loss {report.loss:.4f}", "", "### Per class", "", metrics.markdown_table(report)]
    if len(report.class_names) <= 20:
        lines += ["", "### Confusion matrix", "", "Rows: true class; columns: predicted class.", "",
                  metrics.markdown_confusion(report)]
    return "\n".join(lines) + "\n"


def _size(path: str) -> str:
    if os.path.isdir(path):
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)
    else:
        total = os.path.getsize(path) if os.path.exists(path) else 0
    return f"{total / 1e6:.2f} MB"


def formats_section(folder, formats, parity, split, failed) -> str:
    lines = ["## Formats and parity", "",
             "| file | format | size | top-1 agreement with model.keras | largest probability difference |",
             "|---|---|---:|---:|---:|",
             f"| `model.keras` | {DESCRIBED['keras'].format(major=keras_major())} | "
             f"{_size(os.path.join(folder, 'model.keras'))} | reference | "
             "reference |"]
    for fmt in formats:
        if fmt == "keras":
            continue
        p = parity.get(fmt)
        name = FILES[fmt] + ("/" if fmt == "saved_model" else "")
        figures = (f"{p['agreement']:.2%} | {p['max_prob_diff']:.2e}" if p else "not measured | not measured")
        size = "removed" if fmt in failed else _size(os.path.join(folder, FILES[fmt]))
        lines.append(f"| `{name}` | {DESCRIBED[fmt]} | {size} | {figures} |")
    if parity:
        n = next(iter(parity.values()))["images"]
        lines += ["", f"Measured on the {n:,} images of the {SPLIT_WORDS[split]} split."]
    if failed:
        lines += ["", f"Removed for an agreement below the required one: {', '.join(failed)}."]
    return "\n".join(lines) + "\n"


def input_section(info) -> str:
    h, w, c = info["input_shape"]
    norm = info["normalization"]
    r = info["resize"]
    return f"""## Input format

Every format takes raw pixels: shape (N, {h}, {w}, {c}), values 0..255, uint8 (model.keras also takes float32).
Do not scale or normalise them: the model does (`{norm['kind']}`, mean {[round(m, 3) for m in norm['mean']]},
std {[round(s, 3) for s in norm['std']]}).
To turn an image into that input (`preprocessing.json`; `hpcjobs infer` does all of it):
{info['bit_depth']}; {info['color']}; pad to the aspect ratio ({r['pad_mode']}), then resize to {h} x {w}
({r['shrink']} when shrinking, {r['enlarge']} when enlarging).

```python
import numpy as np, keras                      # images: uint8 array (N, {h}, {w}, {c})
model = keras.saving.load_model("model.keras", safe_mode=True)
probs = model.predict(images.astype("float32"))
labels = open("labels.txt").read().splitlines()
predicted = [labels[i] for i in probs.argmax(1)]

import tensorflow as tf                        # SavedModel (also for TF Serving)
serve = tf.saved_model.load("saved_model").signatures["serving_default"]
probs = serve(image=tf.constant(images))["probabilities"].numpy()

interpreter = tf.lite.Interpreter(model_path="model.tflite")   # or ai_edge_litert.interpreter
probs = interpreter.get_signature_runner("serving_default")(image=images)["probabilities"]

import onnxruntime                             # ONNX
session = onnxruntime.InferenceSession("model.onnx")
probs = session.run(None, {{session.get_inputs()[0].name: images}})[0]
```
"""


def training_section(cfg, training) -> str:
    t = cfg.training
    plain = {k: v for k, v in to_dict(cfg).items() if k in ("name", "data", "model", "optimizer", "training", "export")}
    return (f"## Training\n\n{training.get('step', '?')} steps of batch {t.batch_size} "
            f"({training.get('epochs', '?')} epochs, {training.get('sessions', 1)} session(s)), optimizer "
            f"`{cfg.optimizer.name}` at learning rate {cfg.optimizer.learning_rate} "
            f"(`{cfg.optimizer.schedule.kind}` schedule). The resolved config:\n\n```yaml\n"
            + yaml.safe_dump(plain, sort_keys=False, allow_unicode=True) + "```\n")


def limits_section(cfg, data, report) -> str:
    names = data.class_names
    small = ""
    if report is not None:
        support = report.per_class()["support"]
        small = (f" The smallest class has {int(support.min())} test image(s): its per-class figures are "
                 "rough.")
    return f"""## Intended use and limits

- Intended use: sorting images like those of `{cfg.data.source}` into its {len(names)} classes, in research,
  teaching and batch processing (`hpcjobs infer`), or served through TF Serving, TensorFlow Lite or ONNX
  Runtime.
- Every input gets one of the {len(names)} classes: there is no "none of these". Images unlike the training
  data (another camera, scanner, site, population, size or kind of object) get answers that can be
  confident and wrong.
- The test figures come from a random stratified split of the same source, so they say how the model does on
  more images from that source, not elsewhere; check it on your own labelled images first
  (`hpcjobs evaluate EXPORT --data YOUR_DATA`).{small}
- The probabilities are not calibrated; do not read them as the chance of being right.
- Not for decisions about people (health, identity, access, work) without an independent validation.
"""


def code_section(code) -> str:
    """The user's code the model needs: the files this folder carries, the modules it imports."""
    if not code:
        return ""
    lines = []
    for e in code:
        if "copy" in e:
            lines.append(f"- `code/{e['copy']}` (sha256 `{e['sha256']}`): defines the model (`{e['name']}`) "
                         "and its layers")
        else:
            what = ", ".join(x for x in (e.get("version"), f"sha256 `{e['sha256']}`" if e.get("sha256") else "")
                             if x)
            lines.append(f"- module `{e['module']}`{f' ({what})' if what else ''}: defines the model "
                         f"(`{e.get('name', '?')}`); it must be importable where the model is loaded")
    carries = any("copy" in e for e in code)
    return ("## Code\n\nThe model is the trainer's own, and loading it needs its code:\n\n" + "\n".join(lines)
            + ("\n\nLoading imports these files, and importing code runs it: `hpcjobs infer` and `hpcjobs evaluate` "
               "refuse this folder unless given `--trust-code`. In Python, import them (which registers the "
               "layers) before `keras.saving.load_model(..., safe_mode=True)`." if carries else "") + "\n")


def write(folder: str, *, cfg, data, report, training, info, parity, parity_split, formats, failed, model,
          code=None):
    parts = [header(cfg, report), model_section(cfg, info, training, model), code_section(code),
             data_section(cfg, data),
             metrics_section(report), formats_section(folder, formats, parity, parity_split, failed),
             input_section(info), training_section(cfg, training), limits_section(cfg, data, report),
             "## Versions\n\n" + "\n".join(f"- {k} {v}" for k, v in versions(formats).items()) + "\n",
             "## Files\n\nEvery file of this folder is listed with its SHA-256 in `SHA256SUMS` "
             "(`sha256sum -c SHA256SUMS`).\n"]
    atomic_write(os.path.join(folder, "model_card.md"), "\n".join(p for p in parts if p))
