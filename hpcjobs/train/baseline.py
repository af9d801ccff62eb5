"""The negative-transfer check (``transfer.compare_scratch_epochs``, ``transfer.baseline``):
a finished run's validation curve against a scratch baseline's, trained now or read."""
from __future__ import annotations

import math


def compare(transferred: list[dict], scratch: list[dict], epochs: int, key: str = "val_accuracy") -> dict:
    """The two curves at ``epochs`` and whether transfer is behind (negative transfer)."""
    def at(rows):
        rows = [r for r in rows if r["epoch"] <= epochs and key in r]
        return rows[-1][key] if rows else math.nan

    a, b = at(transferred), at(scratch)
    return {"epochs": epochs, "metric": key, "transferred": a, "scratch": b,
            "behind": bool(a < b), "transferred_curve": [r.get(key) for r in transferred[:epochs]],
            "scratch_curve": [r.get(key) for r in scratch[:epochs]]}


def scratch_config(cfg, epochs: int):
    """``cfg`` from scratch: no pretrained or copied weights, one stage of ``epochs``."""
    import dataclasses

    from ..config import TransferConfig

    model = dataclasses.replace(cfg.model, init_from=None, weights=None, freeze_backbone=False)
    training = dataclasses.replace(cfg.training, epochs=epochs, stages=())
    return dataclasses.replace(cfg, model=model, training=training, transfer=TransferConfig())


def check_negative_transfer(cfg, run_dir: str, train, verbose: bool = True) -> dict:
    """``transfer.compare_scratch_epochs`` / ``transfer.baseline``: the run's validation
    accuracy after K epochs against a scratch baseline's (trained now in
    ``RUN/scratch-baseline``, or an existing run); both curves go into run.json and a
    warning is printed when the transferred model is behind."""
    import os

    from ..rundir import RunDir

    rd = RunDir(run_dir)
    mine = rd.read_metrics()
    if cfg.transfer.baseline:
        base_dir, k = cfg.transfer.baseline, cfg.transfer.compare_scratch_epochs or len(mine)
    else:
        k = cfg.transfer.compare_scratch_epochs
        base_dir = os.path.join(run_dir, "scratch-baseline")
        rc = train(scratch_config(cfg, k), base_dir, verbose=False)
        if rc != 0:
            return {}
    result = dict(compare(mine, RunDir(base_dir).read_metrics(), k), baseline=os.path.abspath(base_dir))
    rd.update_record(transfer_check=result)
    if verbose:
        word = "WARNING: negative transfer" if result["behind"] else "transfer helps"
        print(f"{word}: after {k} epoch(s) val_accuracy {result['transferred']:.4f} transferred vs "
              f"{result['scratch']:.4f} from scratch ({result['baseline']})", flush=True)
    return result
