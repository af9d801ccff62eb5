"""Stages in one run (``training.stages``): a hook that makes each stage current at its
first step, with its own trainable set, optimizer and learning rate.

A stage covers whole epochs, so its start is an epoch's end and the stage of any step
is a function of the step: a run resumed anywhere (time budget, signal, SIGKILL)
enters the same stage with the same optimizer state, restored from the checkpoint
(one optimizer per stage is in it).  The stage index is checkpointed too, and every
metrics.csv row says its stage, which the plot marks.
"""
from __future__ import annotations

from .base import Hook


def stage_of(epoch: int, stages) -> int:
    """The index of the stage that trains epoch ``epoch`` (0-based)."""
    end = 0
    for i, st in enumerate(stages):
        end += st.epochs
        if epoch < end:
            return i
    return len(stages) - 1


class Stages(Hook):
    def __init__(self, stages):
        self.stages = stages

    def setup(self, trainer):
        tf = trainer.tf
        self.index = tf.Variable(0, dtype=tf.int64, trainable=False, name="stage")
        return {"stage": self.index}

    def _enter(self, loop, epoch: int):
        i = stage_of(epoch, self.stages)
        t = loop.trainer
        what = t.enter_stage(i)
        self.index.assign(i)
        t.say(f"stage {i + 1}/{len(self.stages)} from epoch {epoch + 1}: {self.stages[i].epochs} epoch(s) "
              f"training {what}, learning rate {t.learning_rate():.3g}")

    def begin(self, loop):  # also mid-stage, after a resume
        self._enter(loop, loop.step // loop.trainer.steps_per_epoch)

    def epoch_begin(self, loop, epoch):
        if epoch and stage_of(epoch, self.stages) != stage_of(epoch - 1, self.stages):
            self._enter(loop, epoch)

    def epoch_end(self, loop, row):
        row["stage"] = int(self.index.numpy()) + 1
        return None
