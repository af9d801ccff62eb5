"""The bad signs of a training curve (``diagnose``) and the hook that logs them and stops on them."""
from __future__ import annotations

from .base import Hook


def diagnose(history: list[dict], cfg) -> list[str]:
    """The handbook's bad signs in the last ``cfg.window`` epochs of ``history``:
    ``diverging`` (validation loss up every epoch while the training loss falls),
    ``plateau`` (the validation loss, else the training loss, moved by less than
    ``plateau_delta`` relative), ``bouncing`` (the validation loss changed direction at
    least ``bounces`` times)."""
    w = cfg.window
    rows = history[-(w + 1):]
    if len(rows) < w + 1:
        return []
    key = "val_loss" if all("val_loss" in r for r in rows) else "loss"
    val = [r[key] for r in rows]
    steps = [b - a for a, b in zip(val, val[1:])]
    signs = []
    if key == "val_loss" and all(d > 0 for d in steps) and rows[-1]["loss"] < rows[0]["loss"]:
        signs.append("diverging")
    if max(val) - min(val) <= cfg.plateau_delta * max(abs(v) for v in val):
        signs.append("plateau")
    turns = sum(1 for a, b in zip(steps, steps[1:]) if a * b < 0)
    if key == "val_loss" and turns >= cfg.bounces:
        signs.append("bouncing")
    return signs


class Diagnosis(Hook):
    """Logs the bad signs of each epoch (``diagnose``), keeps them for run.json, and
    stops the run on those named in ``training.stop_on``."""

    def __init__(self, cfg, stop_on):
        self.cfg, self.stop_on = cfg, tuple(stop_on)

    def epoch_end(self, loop, row):
        signs = diagnose(loop.history, self.cfg)
        for sign in signs:
            loop.trainer.say(f"diagnosis: {sign} at epoch {row['epoch']}")
        stop = [s for s in signs if s in self.stop_on]
        return f"diagnosis_{stop[0]}" if stop else None

    def summary(self, loop):
        history = loop.history
        # first epoch of each sign over the whole history (earlier sessions too)
        first = {}
        for i in range(len(history)):
            for sign in diagnose(history[:i + 1], self.cfg):
                first.setdefault(sign, history[i]["epoch"])
        return {"diagnosis": first}
