"""Data: sources -> prepare (preprocess, stratified split, store) -> feeders."""
from __future__ import annotations

import os

from ..config import Config
from . import stage
from .sources import SourceError, open_source
from .store import Prepared, PrepareStopped, open_store, prepare


def load_data(cfg: Config, base_dir: str = ".", progress: bool = False, info=None, say=print) -> Prepared:
    """The prepared data a run trains on: the store if the config names one, otherwise
    the source prepared in memory (same preprocessing and split as ``hpcjobs prepare``);
    then ``data.classes``, ``data.folds`` and ``data.max_per_class`` take their subsets.
    With ``info`` (the run's ClusterInfo) and ``data.stage`` set, the store is staged to
    node-local scratch first (``stage.py``) and read from there; ``Prepared.staged`` says
    how."""
    d = cfg.data
    staged = None
    if d.store:
        path = d.store if os.path.isabs(d.store) else os.path.join(base_dir, d.store)
        folder = stage.stage_folder(d.stage, info.scratch) if info is not None else None
        if folder and os.path.isfile(path):
            job = f"{info.job_id}.{info.restart_count}" if info.job_id else None  # a requeued job tries again
            staged = stage.stage(path, folder, job=job, say=say)
            path = staged.path
        data = open_store(path)
        data.staged = staged
    else:
        samples = open_source(d.source, base_dir, own_test=d.test_split == "source")
        data = prepare(samples, d.image_size, d.channels, d.validation_split, d.test_split, d.seed,
                       progress=progress)
    from . import subsets

    if d.classes:
        data = subsets.select_classes(data, d.classes)
    if d.folds:
        data = subsets.apply_fold(data, d.folds, d.fold or 0, d.seed)
    if d.max_per_class:
        data = subsets.limit_per_class(data, d.max_per_class, d.seed)
    return data


def prepare_store(cfg: Config, out_path: str, base_dir: str = ".", strict: bool = False,
                  progress: bool = True, force: bool = False, workers: int | None = None,
                  stop=None) -> Prepared:
    """``hpcjobs prepare``: the source into the store ``out_path`` (``force``: even over
    the source itself or a file that is not a store), on ``workers`` processes (default:
    the CPUs this process may use), resumably: ``stop()`` true ends it at a chunk
    boundary with ``PrepareStopped``, and a run again continues from there."""
    d = cfg.data
    samples = open_source(d.source, base_dir, own_test=d.test_split == "source")
    return prepare(samples, d.image_size, d.channels, d.validation_split, d.test_split, d.seed,
                   out_path=out_path, strict=strict, progress=progress, force=force, workers=workers, stop=stop)


__all__ = ["SourceError", "Prepared", "PrepareStopped", "load_data", "prepare_store", "open_store"]
