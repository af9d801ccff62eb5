"""A search's charts (RUN/search/plots/) and its TensorBoard HParams (RUN/search/tensorboard/).

* ``<param>.png`` for every searched key: the metric of each trial against the key's
  value (log x for a log-uniform key), coloured by status;
* ``curves.png``: every trial's learning curve (the metric per epoch) on one chart.

HParams: the experiment's config (each key's domain, the metric) in the folder itself,
and one sub-folder per trial with its parameters and its best metric, so TensorBoard's
HParams dashboard shows the table.  Written only where TensorBoard is installed.
"""
from __future__ import annotations

import os

from ..rundir import atomic_path

COLOURS = {"complete": "tab:blue", "pruned": "tab:orange", "failed": "tab:red", "running": "tab:gray"}


def _save(fig, path: str):
    import matplotlib.pyplot as plt

    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def plot_all(table: list[dict], cfg, folder: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    metric = cfg.search.metric
    for key, spec in cfg.search.space.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for status, colour in COLOURS.items():
            pts = [(r[key], r["value"]) for r in table if r["status"] == status and r["value"] is not None]
            if pts:
                x = [p[0] if not isinstance(p[0], (str, bool)) else str(p[0]) for p in pts]
                ax.scatter(x, [p[1] for p in pts], color=colour, label=status)
        if spec.kind == "log_uniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, os.path.join(folder, f"{key}.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in table:
        h = [row for row in r["history"] if metric in row]
        if h:
            ax.plot([row["epoch"] for row in h], [row[metric] for row in h], "o-", ms=3,
                    color=COLOURS.get(r["status"], "k"), alpha=0.7)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(table)} trials (blue complete, orange pruned, red failed, grey running)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, os.path.join(folder, "curves.png"))


def _domain(hp, spec):
    if spec.kind == "choice":
        return hp.Discrete(list(spec.choice))
    if spec.kind == "int":
        return hp.IntInterval(*spec.int)
    return hp.RealInterval(*[float(v) for v in getattr(spec, spec.kind)])


def hparams(table: list[dict], cfg, folder: str):
    try:
        import tensorflow as tf
        from tensorboard.plugins.hparams import api as hp
    except ImportError:
        return
    metric = cfg.search.metric
    written = os.path.join(folder, ".written-config")
    if not os.path.exists(written):
        with tf.summary.create_file_writer(folder).as_default():
            hp.hparams_config(hparams=[hp.HParam(k, _domain(hp, s)) for k, s in cfg.search.space.items()],
                              metrics=[hp.Metric(metric, display_name=metric)])
        open(written, "w").close()
    for r in table:
        marker = os.path.join(folder, f"{r['trial']:03d}", f".written-{r['status']}")
        if r["value"] is None or r["status"] == "running" or os.path.exists(marker):
            continue
        with tf.summary.create_file_writer(os.path.dirname(marker)).as_default():
            hp.hparams({k: r[k] for k in cfg.search.space}, trial_id=f"{r['trial']:03d}")
            tf.summary.scalar(metric, r["value"], step=int(r["epochs"]))
        open(marker, "w").close()
