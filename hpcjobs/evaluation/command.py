"""``hpcjobs evaluate RUN_OR_EXPORT [--data CONFIG_OR_PATH]``: an exported model's metrics
on labelled images.

The model: a run's export, an export folder (also one copied away from its run), or
one format of it (``model.tflite``, ``model.int8.tflite``, ``model.onnx``, ``saved_model/``).
The images, with their labels:

* no ``--data``: the run's own test split (``--split``), from the run's ``config.yaml``
  and its data; an export without its run directory needs ``--data``;
* ``--data CONFIG.yaml``: that config's split, prepared as ``hpcjobs train`` prepares it;
* ``--data STORE.h5``: a split of an hpcjobs store;
* ``--data PATH``: every image of a labelled source hpcjobs reads (a folder of class
  sub-folders, a path,label listing, an ``.npz`` with labels, a built-in name),
  preprocessed as at training (the export's size and channels).

Classes are matched with the export's ``labels`` by name (an ``.npz`` without class
names by index).  Writes ``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv`` and
``confusion_matrix.png`` into ``--output`` (default ``RUN_OR_EXPORT/evaluation/``) and
prints the per-class table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..rundir import check_output_folder, check_regular, os_reason


class EvaluateError(UserError, ValueError):
    """Nothing to evaluate on, or labels that do not fit the model (exit code 2)."""


@dataclass
class Labelled:
    images: object  # uint8 (N, H, W, C): an array or an h5py dataset
    labels: np.ndarray
    class_names: list[str]  # of the labels
    about: str  # what the images are, for metrics.json
    skipped: int = 0


def add_arguments(p):
    p.add_argument("model", metavar="RUN_OR_EXPORT",
                   help="run directory, export folder, or one exported file (model.tflite, model.onnx, saved_model/)")
    p.add_argument("--data", metavar="CONFIG_OR_PATH",
                   help="labelled images: a config, an .h5 store, a class-folder tree, a listing, an .npz "
                        "(default: the run's own test split)")
    p.add_argument("--split", choices=["test", "val", "train"], default="test",
                   help="split of the run's, the config's or the store's data (default test)")
    p.add_argument("--output", help="results folder (default RUN_OR_EXPORT/evaluation)")
    p.add_argument("--unsafe", action="store_true",
                   help="load a model.keras that holds code (a Lambda layer); only for a source you trust")
    p.add_argument("--trust-code", action="store_true",
                   help="import the Python code an export carries (a model of the trainer's own, in code/); "
                        "importing code runs it: only for a source you trust")


def run_config(path: str, folder: str) -> str | None:
    """The config.yaml of the run ``path`` names or whose export ``folder`` is."""
    for run in (path, os.path.dirname(os.path.abspath(folder))):
        if os.path.isdir(run) and os.path.isfile(os.path.join(run, "config.yaml")) \
                and os.path.isfile(os.path.join(run, "run.json")):
            return os.path.join(run, "config.yaml")
    return None


def _from_split(data, split: str, where: str) -> Labelled:
    s = data.splits[split]
    if len(s) == 0:
        raise EvaluateError(f"{where}: no {split} split (data.{'test' if split == 'test' else 'validation'}_split "
                            "is 0); give --data CONFIG_OR_PATH with labelled images")
    return Labelled(s.images, np.asarray(s.labels), list(data.class_names), f"{where}: {split} split")


def _from_config(path: str, split: str, overrides) -> Labelled:
    from .. import config, plugins
    from ..data import load_data

    if os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(path)), plugins.CODE_DIR)):
        plugins.use_run_code(os.path.dirname(os.path.abspath(path)))  # a run's data loader: its own copy
    return _from_split(load_data(config.load(path, overrides)), split, path)


def _from_source(path: str, shape, image_path: str) -> Labelled:
    from ..data.images import ImageError, model_image
    from ..data.sources import open_source

    samples = open_source(path)
    h, w, c = shape
    images, labels, skipped = [], [], 0
    for i in range(len(samples)):
        try:
            item = samples.paths[i] if samples.paths is not None else samples.arrays[i]
            images.append(model_image(item, (h, w), c, image_path))
            labels.append(int(samples.labels[i]))
        except ImageError:
            skipped += 1
    if not images:
        raise EvaluateError(f"{path}: no readable image")
    return Labelled(np.stack(images), np.array(labels, np.int64), list(samples.class_names), path, skipped)


def labelled(args, folder: str, shape, image_path: str | None = None) -> Labelled:
    """The images and labels ``args`` asks for (see the module docstring)."""
    data = args.data
    if data is None:
        cfg = run_config(args.model, folder)
        if cfg is None:
            raise EvaluateError(f"{args.model}: no run directory with its config.yaml here, so no test split; "
                                "give --data CONFIG_OR_PATH (a config, a store, a folder, a listing or an .npz)")
        return _from_config(cfg, args.split, args.set)
    if data.lower().endswith((".yaml", ".yml")):
        return _from_config(data, args.split, args.set)
    if data.lower().endswith((".h5", ".hdf5")):
        from ..data import open_store

        return _from_split(open_store(data), args.split, data)
    from ..data.images import LEGACY_PATH

    return _from_source(data, shape, image_path or LEGACY_PATH)


def model_labels(data: Labelled, names: list[str]) -> np.ndarray:
    """``data``'s labels as the model's class indices: by class name, or by index for a
    source whose classes are only numbered (an .npz without class_names)."""
    index = {str(n): i for i, n in enumerate(names)}
    theirs = [str(n) for n in data.class_names]
    if all(n in index for n in theirs):
        lookup = np.array([index[n] for n in theirs], np.int64)
    elif theirs == [str(i) for i in range(len(theirs))] and len(theirs) <= len(names):
        lookup = np.arange(len(theirs))
    else:
        unknown = [n for n in theirs if n not in index]
        raise EvaluateError(f"{data.about}: classes the model does not have: {', '.join(unknown[:10])}"
                            f"{' ...' if len(unknown) > 10 else ''} (the model's: {', '.join(names[:20])})")
    return lookup[np.asarray(data.labels, np.int64)]


def _fit(images, shape, image_path: str):
    """Images of another size or channel count (a store prepared otherwise) as the model's input."""
    if tuple(images.shape[1:]) == tuple(shape):
        return images
    from ..data.images import model_image

    return np.stack([model_image(np.asarray(img), tuple(shape[:2]), shape[2], image_path) for img in images])


def _run_loss(args, folder: str, num_classes: int):
    """The run's ``training.loss`` on arrays, where the model is a run's (its config.yaml);
    crossentropy for a bundle on its own.  Both from the loss factory of training."""
    from .. import config
    from ..train.losses import numpy_loss

    path = run_config(args.model, folder)
    loss = config.LossConfig()
    if path:
        try:
            loss = config.load(path).training.loss
        except config.ConfigError:
            pass  # a run config this version cannot read: the bundle's crossentropy
    return numpy_loss(loss, num_classes)


def cmd_evaluate(args) -> int:
    if args.data is not None and os.path.exists(args.data) and not os.path.isdir(args.data):
        check_regular(args.data, "--data file")  # a FIFO or a device: refused before TensorFlow loads the model
    from . import metrics
    from ..export.formats import open_runner

    runner = open_runner(args.model, unsafe=args.unsafe, trust_code=args.trust_code)
    names = [str(n) for n in runner.info["class_names"]]
    shape = tuple(runner.info["input_shape"])
    image_path = str(runner.info.get("image_path", "tf/1"))  # the export's (tf/1 if made before it was recorded)
    data = labelled(args, runner.folder, shape, image_path)
    labels = model_labels(data, names)
    report = metrics.from_predictions(labels, runner.predict(_fit(data.images, shape, image_path)), names,
                                      loss=_run_loss(args, runner.folder, len(names)))
    base = args.model if os.path.isdir(args.model) and runner.kind != "saved_model" else runner.folder
    out = args.output or os.path.join(base, "evaluation")
    check_output_folder(out, "metrics.json", metrics.is_evaluation, "evaluation")
    try:
        metrics.write(report, out, {"model": os.path.abspath(runner.path), "format": runner.kind,
                                    "data": data.about, "skipped_unreadable": data.skipped})
    except OSError as e:
        raise EvaluateError(f"{out}: cannot write the evaluation there ({os_reason(e, out)})") from None
    print(f"{runner.kind} model {runner.path} on {data.about}"
          + (f" ({data.skipped} unreadable image(s) skipped)" if data.skipped else ""))
    print(metrics.text_table(report))
    if report.absent:
        print(f"macro averages over the {report.num_classes - len(report.absent)} classes present; absent from "
              f"the data: {', '.join(report.absent[:20])}{' ...' if len(report.absent) > 20 else ''}")
    print(f"written: {out}/ (metrics.json, per_class.csv, confusion_matrix.csv, confusion_matrix.png)")
    return 0
