"""Safe loading of an exported ``.keras`` model: no code from the file runs unless asked."""
from __future__ import annotations

import os

from .. import plugins
from ..compat import stack
from .model import ExportError, find, read_info


def code_objects(path: str) -> list[str]:
    """What in a ``.keras`` file's config would run Python code from the file or from
    outside Keras when loaded: Lambda layers (serialized lambdas) and foreign classes
    (but for those registered with Keras by code already imported: a bundle's own code,
    imported with consent, or an installed module)."""
    import json
    import zipfile

    from ..compat import registered_object

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
            elif isinstance(node.get("registered_name"), str) and registered_object(node["registered_name"]):
                pass  # a class of code imported already (its Lambda layers are still found)
            elif cls == "__lambda__" or isinstance(module, str) and module.split(".")[0] not in ("keras", "builtins"):
                found.append(f"Python code ({module or ''}.{cls})" if cls != "__lambda__" else "a Python lambda")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(set(found))


UNSAFE_HINT = "Pass --unsafe only for a model from a source you trust"
TRUST_HINT = "Pass --trust-code (in a config: infer.trust_code: true) only for a bundle from a source you trust"


def load_exported(path: str, unsafe: bool = False, unsafe_hint: str = UNSAFE_HINT, trust_code: bool = False,
                  trust_hint: str = TRUST_HINT, imported_ok: bool = False):
    """Load a ``.keras`` file with safe_mode=True (no code from the file runs): a model
    holding a Lambda layer or another class from outside Keras is refused in one line,
    unless ``unsafe`` (``--unsafe``: the file's code runs); ``unsafe_hint`` says what to
    do instead (a command without ``--unsafe`` has its own).  A file that is no complete
    ``.keras`` archive (truncated, or a ``.weights.h5``) is said to be one.  An export
    folder that carries the user's code (``code/``, a model of their own) is refused
    unless ``trust_code`` (``--trust-code``): its files are imported (their layers
    registered) before the model loads, still in safe mode; ``imported_ok``: or when this
    process imported that very code already (``model.init_from`` of a run's own model)."""
    import zipfile

    import keras

    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        what = "a weights file, which holds no model" if path.endswith(".h5") else "truncated or damaged"
        raise ExportError(f"{path}: not a readable .keras model ({what}); give a model.keras, an export "
                         "folder or a run directory")
    other_stack = stack.keras_file_refusal(path)  # saved by the other Keras major
    if other_stack:
        raise ExportError(other_stack)
    plugins.import_bundle_code(os.path.dirname(os.path.abspath(path)), trust_code, trust_hint, imported_ok)
    code = code_objects(path)
    if code and not unsafe:
        raise ExportError(f"{path}: holds {', '.join(code)}, code that would run on loading; refused "
                         f"(safe mode). {unsafe_hint}")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as e:  # keras raises many types for a bad file
        raise ExportError(f"{path}: cannot load model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load(path: str, unsafe: bool = False, trust_code: bool = False):
    """(model, preprocessing info) from an export; checks the two match.  The model
    loads in safe mode: one holding code (a Lambda layer) is refused unless ``unsafe``,
    a bundle carrying the user's code unless ``trust_code``."""
    folder = find(path)
    info = read_info(folder)
    pp = os.path.join(folder, "preprocessing.json")
    model = load_exported(os.path.join(folder, "model.keras"), unsafe=unsafe, trust_code=trust_code)
    shape = list(model.input_shape[1:])
    if shape != list(info["input_shape"]):
        raise ExportError(f"{pp}: input_shape {info['input_shape']} does not match the model's {shape}")
    if model.output_shape[-1] != len(info["class_names"]):
        raise ExportError(f"{pp}: {len(info['class_names'])} class names for a model with "
                          f"{model.output_shape[-1]} outputs")
    return model, info
