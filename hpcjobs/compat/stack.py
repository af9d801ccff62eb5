"""Which stack this is, as a record a run keeps: platform, Python, TensorFlow, Keras,
CUDA/cuDNN as TensorFlow was built, Horovod, and every installed package's version.

Two stacks are supported (see ``keras_api``): TensorFlow >= 2.16 with Keras 3, and
TensorFlow 2.14 with Keras 2 (Open-CE 1.11).  Checkpoints and ``.keras`` files do not
cross between them, so what matters when a run or a bundle meets another stack is the
*family*: the Keras major.  A record written before stacks were recorded (none) is
taken as TensorFlow >= 2.16 with Keras 3, the only stack hpcjobs ran on then.
Checked with TF 2.21.0 + Keras 3.15.1 and TF 2.14.1 + Keras 2.14.0 (tensorflow-cpu).
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import platform
import sys

# what a run or a bundle that records no stack was made with
LEGACY = {"tensorflow": ">=2.16", "keras": "3"}
FAMILIES = {3: "TensorFlow >= 2.16 with Keras 3", 2: "TensorFlow 2.14 with Keras 2 (tf.keras, Open-CE 1.11)"}


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def build_info() -> dict:
    """CUDA and cuDNN as TensorFlow was built (``tf.sysconfig.get_build_info()``: no keys
    on a CPU build; checked with TF 2.21.0 and 2.14.1)."""
    import tensorflow as tf

    info = dict(tf.sysconfig.get_build_info())
    return {"cuda_build": bool(info.get("is_cuda_build")), "cuda": info.get("cuda_version"),
            "cudnn": info.get("cudnn_version")}


def horovod_version() -> str | None:
    """Horovod's version if it is installed (not imported: that would load its library)."""
    return _version("horovod")


def packages() -> dict[str, str]:
    """Every installed distribution and its version, sorted by name."""
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out[name.lower()] = dist.version
    return dict(sorted(out.items()))


@functools.lru_cache(maxsize=1)
def _current() -> dict:
    import keras
    import tensorflow as tf

    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": str(keras.__version__), **build_info(),
            "horovod": horovod_version(), "packages": packages()}


def current() -> dict:
    """This process's stack record (imports TensorFlow and Keras). Read once per process (the
    installed packages' metadata take 0.2 s to read: a search or a test suite trains many runs
    in one process, whose TensorFlow and Keras do not change); a copy each time."""
    record = _current()
    return dict(record, packages=dict(record["packages"]))


def keras_major_of(record: dict | None) -> int:
    """The Keras major of a stack record; 3 for none (written before stacks were recorded)."""
    keras = (record or {}).get("keras") or LEGACY["keras"]
    try:
        return int(str(keras).split(".")[0])
    except ValueError:
        return 3


def describe(record: dict | None) -> str:
    """'TensorFlow 2.21.0 + Keras 3.15.1' (or the legacy family for no record)."""
    if not record:
        return f"TensorFlow {LEGACY['tensorflow']} + Keras {LEGACY['keras']} (no stack recorded)"
    return f"TensorFlow {record.get('tensorflow')} + Keras {record.get('keras')}"


def family(major: int) -> str:
    return FAMILIES.get(major, f"Keras {major}")


def same_family(before: dict | None, now: dict) -> bool:
    return keras_major_of(before) == keras_major_of(now)


def changes(before: dict | None, now: dict) -> list[str]:
    """What differs from ``before`` to ``now``: 'keras 2.14.0 -> 3.15.1', package by package."""
    if not before:
        return []
    out = [f"{k} {before.get(k)} -> {now.get(k)}" for k in now
           if k != "packages" and before.get(k) != now.get(k)]
    old, new = before.get("packages") or {}, now.get("packages") or {}
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            out.append(f"{name} {old.get(name, '(none)')} -> {new.get(name, '(none)')}")
    return out


def environment_text(record: dict) -> str:
    """RUN/environment.txt: the record as 'key: value' lines, then 'name==version' lines."""
    lines = [f"{k}: {v}" for k, v in record.items() if k != "packages"]
    lines.append(f"executable: {sys.executable}")
    lines += ["", "# installed packages"] + [f"{n}=={v}" for n, v in (record.get("packages") or {}).items()]
    return "\n".join(lines) + "\n"


def keras_file_version(path: str) -> str | None:
    """The Keras version that saved a ``.keras`` file (its ``metadata.json``), or None.
    Checked with files saved by Keras 3.15.1 and 2.14.0: ``{"keras_version": ...}``."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("metadata.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    version = meta.get("keras_version") if isinstance(meta, dict) else None
    return str(version) if version else None


def keras_file_refusal(path: str) -> str | None:
    """Why a ``.keras`` file cannot load on this stack (saved by the other Keras major:
    neither loads the other's files), in one line naming what it needs; else None."""
    import keras

    saved = keras_file_version(path)
    if saved is None:
        return None
    here, there = keras_major_of({"keras": str(keras.__version__)}), keras_major_of({"keras": saved})
    if here == there:
        return None
    import tensorflow as tf

    return (f"{path}: saved by Keras {saved}, which needs {family(there)}; this is TensorFlow {tf.__version__} + "
            f"Keras {keras.__version__}. Load it there, or use the bundle's saved_model/ (hpcjobs export RUN "
            "--format saved_model on that stack), which loads on both")
