"""Training: the compiled step (``step``), the outer loop that decides *when*
(``loop``), the hooks that decide *what* (``hooks``), the Trainer that builds and
restores (``trainer``), and one session's run.json and end-of-training work
(``session``)."""
from ..errors import EX_TEMPFAIL
from .hooks import Hook
from .loop import Loop, TrainingDiverged
from .optim import make_optimizer, make_schedule
from .job import train
from .trainer import Trainer

__all__ = ["EX_TEMPFAIL", "Hook", "Loop", "Trainer", "TrainingDiverged", "make_optimizer", "make_schedule",
           "train"]
