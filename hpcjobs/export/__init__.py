"""The export bundle: what a model needs to be used and judged without its run.

    export/model.keras          the model: raw pixels (0..255) in, probabilities out
    export/preprocessing.json   how an image becomes that input; the class names
    export/labels.txt           the class names, one a line, in output order
    export/saved_model/         TF SavedModel; ``serving_default`` takes uint8 (N, H, W, C)   (export.formats)
    export/model.tflite         float32 TFLite, converted from the SavedModel                  (export.formats)
    export/model.int8.tflite    dynamic-range int8 TFLite                                     (export.formats)
    export/model.onnx           ONNX (tf2onnx) from the SavedModel                            (export.formats)
    export/code/                the model's own code when it is the user's (model.arch: file.py:build),
                                with code.json (its sha256); loading imports it: --trust-code
    export/model_card.md        data and splits, test metrics, parity, input format, limits
    export/SHA256SUMS           every file above (``sha256sum -c SHA256SUMS``)

Written at the end of training (``hpcjobs.train.session``) and by ``hpcjobs export``
(``bundle.command``).  Every file is written atomically; SHA256SUMS comes last.  Each
format besides ``model.keras`` is run on the test split (else the validation split)
and compared with ``model.keras`` as a user loads it: top-1 agreement and the largest
probability difference go into the card, and an agreement below
``export.min_agreement`` is a :class:`ParityFailure` naming the format.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from . import model as export
from .. import plugins
from ..digest import file_digest
from ..errors import RunFailure
from ..rundir import atomic_write
from . import card, formats
from .formats import FILES, check_available, open_runner

__all__ = ["FILES", "ParityFailure", "check_available", "open_runner", "parity", "write"]


class ParityFailure(RunFailure):
    """An exported format disagrees with model.keras (exit code 1)."""


def parity_split(data) -> tuple[str, object]:
    """The split parity is measured on: test, else validation (name, Split), or (None, None)."""
    for name in ("test", "val"):
        if len(data.splits[name]):
            return name, data.splits[name]
    return None, None


def parity(reference, paths: dict[str, str], images) -> dict[str, dict]:
    """Top-1 agreement and the largest probability difference of each format with the
    ``reference`` Runner (model.keras as a user loads it) on ``images``."""
    expected = reference.predict(images)
    out = {}
    for fmt, path in paths.items():
        probs = open_runner(path).predict(images)
        out[fmt] = {"agreement": float(np.mean(probs.argmax(1) == expected.argmax(1))),
                    "max_prob_diff": float(np.max(np.abs(probs - expected))), "images": int(len(images))}
    return out


def _remove_stale(folder: str, formats):
    """Files of formats an earlier export wrote and this one does not."""
    for fmt, name in FILES.items():
        path = os.path.join(folder, name)
        if fmt not in formats and fmt != "keras" and os.path.lexists(path):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def sha256sums(folder: str) -> str:
    """``sha256sum``'s format for every file of the bundle (not evaluation/ or temporaries)."""
    lines = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (root == folder and d == "evaluation"))
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), folder)
            if name.startswith(".") or rel == "SHA256SUMS":
                continue
            lines.append(f"{file_digest(os.path.join(root, name))}  {rel}")
    return "\n".join(sorted(lines, key=lambda s: s.split("  ", 1)[1])) + "\n"


def write(model, folder: str, *, cfg, data, report, training: dict, wanted=None) -> dict:
    """The whole bundle of ``model`` into ``folder``; returns the parity figures.

    ``data``: the run's prepared data (splits for the card, parity images); ``report``:
    the test split's ``metrics.Report`` (or None); ``training``: what the card says about
    the run (steps, epochs, which weights); ``wanted``: the formats (else export.formats).
    A format below ``export.min_agreement`` is removed again, the card says so, and
    ParityFailure names it."""
    wanted = tuple(wanted or cfg.export.formats)
    check_available(wanted)
    info = export.preprocessing_info(data, cfg.data.normalize)
    code = plugins.bundle_code(cfg, folder)  # the model's own code, if it is the user's: before it is loaded
    export.save(model, info, folder)
    atomic_write(os.path.join(folder, "labels.txt"), "".join(f"{c}\n" for c in info["class_names"]))
    _remove_stale(folder, wanted)
    figures, split_name = {}, None
    if set(wanted) - {"keras"}:
        reference = open_runner(folder, trust_code=True)  # the code this run has imported already
        paths = formats.write_formats(reference.model, folder, wanted)
        split_name, split = parity_split(data)
        figures = parity(reference, paths, split.images) if split is not None else {}
    bad = [fmt for fmt, p in figures.items() if p["agreement"] < cfg.export.min_agreement]
    _remove_stale(folder, [f for f in wanted if f not in bad])
    card.write(folder, cfg=cfg, data=data, report=report, training=training, info=info, parity=figures,
               parity_split=split_name, formats=wanted, failed=bad, model=model, code=code)
    atomic_write(os.path.join(folder, "SHA256SUMS"), sha256sums(folder))
    if bad:
        shown = ", ".join(f"{fmt} ({figures[fmt]['agreement']:.2%})" for fmt in bad)
        raise ParityFailure(f"{folder}: top-1 agreement with model.keras below {cfg.export.min_agreement:.1%} on "
                            f"the {split_name} split: {shown}; removed, see model_card.md")
    return figures
