"""Data: sources -> prepare (preprocess, stratified split, store) -> feeders."""
from __future__ import annotations

import os

from ..config import Config
from .sources import SourceError, open_source
from .store import Prepared, open_store, prepare


def load_data(cfg: Config, base_dir: str = ".", progress: bool = False) -> Prepared:
    """The prepared data a run trains on: the store if the config names one, otherwise
    the source prepared in memory (same preprocessing and split as ``hpcjobs prepare``)."""
    d = cfg.data
    if d.store:
        path = d.store if os.path.isabs(d.store) else os.path.join(base_dir, d.store)
        return open_store(path)
    samples = open_source(d.source, base_dir)
    return prepare(samples, d.image_size, d.channels, d.validation_split, d.test_split, d.seed,
                   progress=progress)


def prepare_store(cfg: Config, out_path: str, base_dir: str = ".", strict: bool = False,
                  progress: bool = True) -> Prepared:
    d = cfg.data
    samples = open_source(d.source, base_dir)
    return prepare(samples, d.image_size, d.channels, d.validation_split, d.test_split, d.seed,
                   out_path=out_path, strict=strict, progress=progress)


__all__ = ["SourceError", "Prepared", "load_data", "prepare_store", "open_store"]
