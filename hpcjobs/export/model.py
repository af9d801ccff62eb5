"""Export: ``export/model.keras`` plus ``export/preprocessing.json``.

The model takes raw pixels (0..255) and carries its own normalisation; the JSON says
how an image becomes such an input (size, channels, padding and interpolation, the
training statistics) and names the classes.  Both files are written atomically.
"""
from __future__ import annotations

import json
import os

from ..errors import UserError
from ..rundir import FileRefused, atomic_path, atomic_write, read_json_capped

FORMAT = "hpcjobs-preprocessing/1"


class ExportError(UserError, ValueError):
    """An export that is missing or does not match its model (exit code 2)."""


def preprocessing_info(data, normalize: str) -> dict:
    """The input of the model.  ``image_path`` names the function that made the training
    images (infer uses the same); an older export has none, and means ``tf/1``."""
    h, w, c = data.image_shape
    return {
        "format": FORMAT,
        "input_shape": [h, w, c],
        "input_dtype": "float32",
        "input_range": [0, 255],
        "channels": c,
        "image_path": data.image_path,  # hpcjobs.data.images.IMAGE_PATHS: decode and resize as training did
        "resize": {"pad_to_aspect": True, "pad_mode": "edge", "shrink": "area", "enlarge": "bicubic"},
        "bit_depth": "16-bit and other depths scaled to 8-bit",
        "color": "grayscale = ITU-R 601 luma; alpha composited over white",
        "normalization": {"kind": normalize, "mean": [float(m) for m in data.mean],
                          "std": [float(s) for s in data.std], "in_model": True},
        "class_names": list(data.class_names),
    }


def is_export(preprocessing_json: str) -> bool:
    """The file is an hpcjobs export's preprocessing.json (the mark of an export folder)."""
    info = read_json_capped(preprocessing_json, 16 << 20, "preprocessing.json")
    return isinstance(info, dict) and info.get("format") == FORMAT


def save(model, info: dict, folder: str):
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, "model.keras")) as tmp:
        model.save(tmp)
    atomic_write(os.path.join(folder, "preprocessing.json"), json.dumps(info, indent=2) + "\n")


def find(path: str) -> str:
    """The export folder of a run directory, an export folder, or a model.keras file: the
    one place a run dir or an export dir is resolved (infer, export.load, model.init_from)."""
    if not os.path.exists(path):  # EXPORT/model.onnx that is not there is no way to EXPORT/model.keras
        raise ExportError(f"{path}: no such file or folder")
    folders = [os.path.dirname(path)] if os.path.isfile(path) and path.endswith(".keras") else \
        [os.path.join(path, "export"), path]
    for folder in folders:
        if os.path.isfile(os.path.join(folder, "model.keras")):
            return folder
    raise ExportError(f"{path}: no export/model.keras there (train a run first)")


def model_file(path: str) -> str:
    """The ``.keras`` file of a run directory or an export folder; a file is itself."""
    return path if os.path.isfile(path) else os.path.join(find(path), "model.keras")


def read_info(folder: str) -> dict:
    """An export folder's preprocessing.json, checked to be one."""
    pp = os.path.join(folder, "preprocessing.json")
    try:
        info = read_json_capped(pp, 16 << 20, "preprocessing.json")
    except OSError:
        raise ExportError(f"{pp}: missing; an export needs model.keras and preprocessing.json") from None
    except FileRefused as e:
        raise ExportError(str(e)) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ExportError(f"{pp}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(info, dict):
        raise ExportError(f"{pp}: not a JSON object")
    if info.get("format") != FORMAT:
        raise ExportError(f"{pp}: format {info.get('format')!r}, expected {FORMAT!r}")
    return info
