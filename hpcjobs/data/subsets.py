"""Subsets of the prepared splits: stratified K-fold cross-validation over train and
validation, a per-class limit on the training split, and a choice of classes.

K-fold.
For small data sets the handbook re-draws the validation split.  ``data.folds: K``
pools the prepared train and validation splits (the test split stays held out),
deals every class's samples round-robin into K folds after a seeded shuffle, and
fold I validates on fold I and trains on the rest.  The folds are disjoint, cover
the pool exactly once, and keep each class's share within one sample.  The
normalisation statistics are those of the fold's own training part.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .sources import SourceError
from .store import Prepared, Split, stratified_order


def fold_indices(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """K disjoint index arrays into ``labels``, each class dealt round-robin."""
    rng = np.random.default_rng(seed)
    folds: list[list[np.ndarray]] = [[] for _ in range(k)]
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for f in range(k):
            folds[(f + offset) % k].append(idx[f::k])
        offset += len(idx) % k  # the next class's remainder goes to the folds that got fewer
    return [np.sort(np.concatenate(f)).astype(np.int64) for f in folds]


def _stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
    mean = pixels.mean(0)
    std = pixels.std(0)
    return mean.astype(np.float32), np.where(std < 1e-3, 1.0, std).astype(np.float32)


def _check_folds(labels: np.ndarray, k: int, class_names):
    """K folds need K samples at least (else a fold validates on nothing: exit 2); a class
    with fewer than K samples is missing from some folds' validation (a warning)."""
    if k > len(labels):
        raise SourceError(f"data.folds: {k} folds over {len(labels)} train + validation samples would leave "
                          f"folds with nothing to validate on; use at most {len(labels)}")
    counts = np.bincount(labels, minlength=len(class_names))
    small = [(str(class_names[c]), int(n)) for c, n in enumerate(counts) if 0 < n < k]
    if small:
        shown = ", ".join(f"{name} ({n})" for name, n in small[:5]) + (" ..." if len(small) > 5 else "")
        print(f"warning: data.folds {k} is more than the samples of class(es) {shown}: some folds validate "
              "without them", flush=True)


def apply_fold(data: Prepared, k: int, fold: int, seed: int) -> Prepared:
    """``data`` with train and val replaced by fold ``fold`` of ``k`` (test unchanged).
    A store's images are read into memory (cross-validation is for small data)."""
    tr, va = data.splits["train"], data.splits["val"]
    labels = np.concatenate([tr.labels, va.labels]).astype(np.int32)
    _check_folds(labels, k, data.class_names)
    images = np.concatenate([np.asarray(tr.images[:]), np.asarray(va.images[:])])
    origin = np.concatenate([tr.source_index, va.source_index])
    folds = fold_indices(labels, k, seed)
    rng = np.random.default_rng(seed + 1 + fold)
    val = stratified_order(folds[fold], labels, rng)
    train = stratified_order(np.concatenate([f for i, f in enumerate(folds) if i != fold]), labels, rng)

    def split(idx):
        return Split(images[idx], labels[idx], origin[idx])

    mean, std = _stats(images[train])
    splits = dict(data.splits, train=split(train), val=split(val))
    return dataclasses.replace(data, splits=splits, mean=mean, std=std)


def limit_per_class(data: Prepared, n: int, seed: int) -> Prepared:
    """``data`` with at most ``n`` training images per class (``data.max_per_class``): a
    seeded, stratified subset, so the value of transfer can be measured on little data.
    Validation and test are unchanged."""
    tr = data.splits["train"]
    rng = np.random.default_rng(seed + 7)
    keep = np.concatenate([rng.permutation(np.flatnonzero(tr.labels == c))[:n] for c in np.unique(tr.labels)])
    keep = stratified_order(np.sort(keep), tr.labels, rng)
    order = np.sort(keep)  # an h5py dataset reads increasing indices only
    images = np.asarray(tr.images[order])[np.searchsorted(order, keep)]
    small = Split(images, tr.labels[keep], tr.source_index[keep])
    mean, std = _stats(small.images)
    return dataclasses.replace(data, splits=dict(data.splits, train=small), mean=mean, std=std)


def select_classes(data: Prepared, names: tuple[str, ...]) -> Prepared:
    """``data`` with only the classes ``names`` (``data.classes``), relabelled 0..n-1 in
    that order, in every split; the statistics are the new training split's."""

    missing = [n for n in names if n not in data.class_names]
    if missing:
        raise SourceError(f"data.classes: {', '.join(missing)} not among the source's classes "
                          f"({', '.join(data.class_names)})")
    old = np.array([data.class_names.index(n) for n in names])
    new_label = np.full(len(data.class_names), -1, np.int32)
    new_label[old] = np.arange(len(old), dtype=np.int32)
    splits = {}
    for key, sp in data.splits.items():
        keep = np.flatnonzero(new_label[sp.labels] >= 0)
        splits[key] = Split(np.asarray(sp.images[keep] if len(keep) else sp.images[:0]),
                            new_label[sp.labels[keep]], sp.source_index[keep])
    mean, std = _stats(splits["train"].images)
    return dataclasses.replace(data, splits=splits, class_names=list(names), mean=mean, std=std)
