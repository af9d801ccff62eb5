"""``hpcjobs export RUN [--format keras,saved_model,tflite,tflite_int8,onnx] [--from best|latest|CKPT]``.

Rebuilds the run's model from its ``config.yaml``, loads the weights asked for (the
best epoch's, kept by the BestMetric hook; the newest checkpoint's; or those of a
given checkpoint), measures the test split and writes the bundle (``hpcjobs.bundle``)
into ``RUN/export`` (or ``--output``).  The run is locked meanwhile, so an export never
races a training session of the same run.
"""
from __future__ import annotations

import os

from ..config import EXPORT_FORMATS
from .model import ExportError



def add_arguments(p):
    p.add_argument("run", metavar="RUN", nargs="?", help="run directory (or --run-dir)")
    p.add_argument("--format", metavar="LIST",
                   help=f"comma-separated formats: {','.join(EXPORT_FORMATS)} (default export.formats)")
    p.add_argument("--from", dest="source", metavar="best|latest|CKPT",
                   help="the weights: best (the best epoch's), latest (the newest checkpoint), or a checkpoint "
                        "prefix (default export.from)")
    p.add_argument("--output", help="export folder (default RUN/export)")


def parse_formats(text: str | None):
    if text is None:
        return None
    wanted = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    bad = [f for f in wanted if f not in EXPORT_FORMATS]
    if bad or not wanted:
        raise ExportError(f"--format {text!r}: unknown format {bad[0] if bad else '(none)'}; "
                          f"choose from {', '.join(EXPORT_FORMATS)}")
    return wanted


def load_weights(model, rd, source: str, monitor: str, fallback: bool = False) -> dict:
    """Put the weights ``source`` names into ``model``; what the model card says of them.
    ``fallback``: when no best weights were kept (``best`` by default only), the latest."""
    import tensorflow as tf

    from ..train.checkpoint import BEST_EPOCH_KEY, BEST_KEY, STEP_KEY, find_checkpoint, restore_model_only
    from ..train.hooks import best_weights_path

    prefix = find_checkpoint(rd.path if source in ("best", "latest") else source)
    step = int(tf.train.load_variable(prefix, STEP_KEY))
    if source == "best":
        epoch = int(tf.train.load_variable(prefix, BEST_EPOCH_KEY))
        path = best_weights_path(rd, epoch) if epoch else None
        if (not path or not os.path.isfile(path)) and fallback:
            print(f"no best weights kept ({monitor} was never measured): exporting the latest checkpoint")
            return load_weights(model, rd, "latest", monitor)
        if not path or not os.path.isfile(path):
            raise ExportError(f"{rd.path}: no best weights kept ({monitor} never measured, e.g. without a "
                              "validation split); use --from latest")
        model.load_weights(path)
        best = float(tf.train.load_variable(prefix, BEST_KEY))
        return {"weights": "best", "best_epoch": epoch, "monitor": monitor, "best": best, "step": step}
    why = restore_model_only(tf, model, prefix)
    if why:
        raise ExportError(f"{prefix}: does not hold this run's model ({why[:160]})")
    return {"weights": "latest", "step": step}


def export_run(run: str, overrides=(), wanted=None, source=None, output=None) -> dict:
    """Export run ``run`` (see the module docstring); the parity figures."""
    from .. import config, plugins
    from . import model as export
    from ..evaluation import metrics
    from ..models import build as models
    from ..data import load_data
    from ..rundir import RunDir, check_output_folder, os_reason
    from . import check_available, formats, parity_split, write

    rd = RunDir(run)
    if not os.path.isfile(rd.config_yaml):
        raise ExportError(f"{run}: no config.yaml (not a run directory)")
    if output:
        check_output_folder(output, "preprocessing.json", export.is_export, "export")
    cfg = config.load(rd.config_yaml, list(overrides))
    wanted = wanted or cfg.export.formats
    check_available(wanted)
    rd.lock()
    try:
        plugins.use_run_code(rd.path)  # the run's own copy of its code (its own: no --trust-code)
        data = load_data(cfg)
        model = models.build(cfg.model, data.image_shape, data.num_classes, data.mean, data.std, cfg.data.normalize)
        training = load_weights(model, rd, source or cfg.export.from_, cfg.training.early_stopping.monitor,
                                fallback=source is None)
        record = rd.read_record()
        training.update(total_steps=record.total_steps, epochs=training["step"] // (record.steps_per_epoch or 1),
                        sessions=len(record.sessions) or 1)
        test = data.splits["test"]
        report = None
        if len(test):
            runner = formats.model_runner(model, export.preprocessing_info(data, cfg.data.normalize))
            from ..train.losses import numpy_loss

            report = metrics.from_predictions(test.labels, runner.predict(test.images), data.class_names,
                                              loss=numpy_loss(cfg.training.loss, data.num_classes))
        try:
            figures = write(model, output or rd.export, cfg=cfg, data=data, report=report, training=training,
                            wanted=wanted)
        except OSError as e:
            folder = output or rd.export
            raise ExportError(f"{folder}: cannot write the export there ({os_reason(e, folder)})") from None
        return {"folder": output or rd.export, "parity": figures, "split": parity_split(data)[0],
                "report": report, "training": training}
    finally:
        rd.unlock()


def cmd_export(args) -> int:
    if not (args.run or args.run_dir):
        raise ExportError("hpcjobs export: name the run directory (RUN or --run-dir)")
    done = export_run(args.run or args.run_dir, args.set, parse_formats(args.format), args.source, args.output)
    t = done["training"]
    which = f"best epoch {t['best_epoch']} ({t['monitor']} {t['best']:.4f})" if t["weights"] == "best" \
        else f"step {t['step']}"
    print(f"exported {which} to {done['folder']}")
    if done["report"] is not None:
        from ..evaluation.metrics import summary_line

        print(f"test: {summary_line(done['report'])}")
    for fmt, p in done["parity"].items():
        print(f"  {fmt}: top-1 agreement {p['agreement']:.2%}, largest probability difference "
              f"{p['max_prob_diff']:.2e} ({p['images']} {done['split']} images)")
    return 0
