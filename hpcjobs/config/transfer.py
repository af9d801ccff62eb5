"""Config sections of transfer learning: the model's head and the negative-transfer check.
(Referenced from ``hpcjobs.config``; staged unfreezing, ``training.stages``, is in ``train``.)"""
from __future__ import annotations

from typing import Literal, Optional

from .loader import section as _frozen


@_frozen
class HeadConfig:
    """What sits on a backbone: pooling, optional dense layers, dropout, the classifier."""

    pooling: Literal["avg", "max", "flatten"] = "avg"
    dense: tuple[int, ...] = ()  # units of dense (relu) layers before the classifier
    # keras.applications: keep the pretrained classifier as it is, only where the data has as many classes as it
    # (imagenet: 1,000; else exit 2); false: a new head for the data's classes
    include_top: bool = False

    def __post_init__(self):
        if any(u < 1 for u in self.dense):
            raise ValueError("dense: every layer needs >= 1 unit")


@_frozen
class TransferConfig:
    """The negative-transfer check: the same run from scratch for K epochs, compared."""

    compare_scratch_epochs: Optional[int] = None  # train a scratch baseline for K epochs
    baseline: Optional[str] = None  # or compare with this existing run directory

    def __post_init__(self):
        if self.compare_scratch_epochs is not None and self.compare_scratch_epochs < 1:
            raise ValueError("compare_scratch_epochs: must be >= 1 or null")
