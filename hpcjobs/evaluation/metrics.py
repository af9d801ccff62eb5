"""Classification metrics: the confusion matrix and what follows from it.

One :class:`Report` holds a split's confusion matrix (rows: true class, columns:
predicted class), its top-k hit counts and its loss sum.  Per-class precision, recall,
F1 and support, their macro and weighted averages, accuracy and top-k accuracy are
computed from it exactly as ``sklearn.metrics.classification_report`` does with
``labels=range(C)`` and ``zero_division=0`` (a class never predicted has precision 0),
except that macro averages are over the classes present in the true labels only.

A report comes from the compiled evaluation (``from_sums``: training, every worker)
or from predicted probabilities (``from_predictions``: ``hpcjobs evaluate``, the export);
``write`` puts one into a folder as ``metrics.json``, ``per_class.csv``,
``confusion_matrix.csv`` and ``confusion_matrix.png``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass

import numpy as np

TOP_K = (1, 3, 5)


def top_ks(num_classes: int) -> tuple[int, ...]:
    """The k of top-k accuracy worth reporting: 1, and 3 and 5 below the class count."""
    return tuple(k for k in TOP_K if k == 1 or k < num_classes)


def eval_width(num_classes: int) -> int:
    """Length of the compiled evaluation's sum vector (``from_sums``)."""
    return 3 + len(top_ks(num_classes)) + num_classes * num_classes


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


@dataclass
class Report:
    class_names: list[str]
    confusion: np.ndarray  # int64 (C, C): rows true, columns predicted
    top_k_hits: dict[int, int]  # k -> samples whose class is among the k most probable
    loss_sum: float
    correct: float | None = None  # the compiled step's own count (equal to the trace)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        correct = self.correct if self.correct is not None else float(np.trace(self.confusion))
        return correct / max(self.count, 1)

    def per_class(self) -> dict[str, np.ndarray]:
        cm = self.confusion
        tp = np.diag(cm).astype(np.float64)
        support = cm.sum(1)
        precision, recall = _ratio(tp, cm.sum(0)), _ratio(tp, support)
        return {"precision": precision, "recall": recall,
                "f1": _ratio(2 * precision * recall, precision + recall), "support": support}

    @property
    def absent(self) -> list[str]:
        """Classes with no sample among the true labels (``evaluate --data`` on a subset)."""
        return [name for name, n in zip(self.class_names, self.confusion.sum(1)) if n == 0]

    def averages(self) -> dict[str, dict[str, float]]:
        """Macro: the mean over the classes present (support > 0), so a subset of the classes
        is not averaged with zeros for the rest; weighted: by support."""
        pc = self.per_class()
        present = pc["support"] > 0 if pc["support"].any() else np.ones(len(pc["support"]), bool)
        weights = pc["support"] / max(pc["support"].sum(), 1)
        return {kind: {m: float(np.mean(pc[m][present]) if kind == "macro" else np.sum(pc[m] * weights))
                       for m in ("precision", "recall", "f1")} for kind in ("macro", "weighted")}

    @property
    def macro_f1(self) -> float:
        return self.averages()["macro"]["f1"]

    def top_k(self) -> dict[str, float]:
        return {f"top_{k}": hits / max(self.count, 1) for k, hits in sorted(self.top_k_hits.items())}

    def to_dict(self, confusion: bool = True) -> dict:
        """Everything as plain JSON values; ``confusion`` False leaves the matrix out
        (then it is in ``evaluation/confusion_matrix.csv``)."""
        pc = self.per_class()
        return {"count": self.count, "loss": self.loss, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "top_k": self.top_k(), "averages": self.averages(),
                "per_class": [{"class": name, **{m: float(pc[m][i]) for m in ("precision", "recall", "f1")},
                               "support": int(pc["support"][i])} for i, name in enumerate(self.class_names)],
                "class_names": list(self.class_names), "absent_classes": self.absent,
                "confusion_matrix": self.confusion.tolist() if confusion else "evaluation/confusion_matrix.csv"}


def from_sums(sums: np.ndarray, class_names: list[str]) -> Report:
    """A report from the compiled evaluation's summed vector: loss sum, correct, count,
    the top-k hits (``top_ks``), then the confusion matrix row by row."""
    c = len(class_names)
    ks = top_ks(c)
    sums = np.asarray(sums, np.float64)
    if len(sums) != eval_width(c):
        raise ValueError(f"{len(sums)} evaluation sums for {c} classes (expected {eval_width(c)})")
    hits = dict(zip(ks, (int(round(v)) for v in sums[3:3 + len(ks)])))
    confusion = np.rint(sums[3 + len(ks):]).astype(np.int64).reshape(c, c)
    return Report(list(class_names), confusion, hits, float(sums[0]), correct=float(sums[1]))


def from_predictions(labels, probs, class_names: list[str], loss=None) -> Report:
    """A report from true labels and predicted probabilities (N, C).  A class is in the
    top k when fewer than k classes are more probable (``tf.math.in_top_k``'s rule).
    ``loss``: the run's per-example loss on arrays (``hpcjobs.train.losses.numpy_loss``);
    None: crossentropy, the loss of a bundle evaluated without its run."""
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    c = len(class_names)
    if probs.shape != (len(labels), c):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(labels)} labels and {c} classes")
    pred = probs.argmax(1)
    confusion = np.bincount(labels * c + pred, minlength=c * c).reshape(c, c).astype(np.int64)
    own = probs[np.arange(len(labels)), labels]
    above = (probs > own[:, None]).sum(1)
    hits = {k: int((above < k).sum()) for k in top_ks(c)}
    total = float(-np.log(np.clip(own, 1e-7, 1.0)).sum()) if loss is None else float(np.sum(loss(labels, probs)))
    return Report(list(class_names), confusion, hits, total)


# --------------------------------------------------------------------------- tables
_COLUMNS = ("precision", "recall", "f1", "support")


def _rows(report: Report) -> list[tuple[str, list[str]]]:
    pc, avg = report.per_class(), report.averages()
    rows = [(name, [f"{pc[m][i]:.4f}" for m in _COLUMNS[:3]] + [str(int(pc["support"][i]))])
            for i, name in enumerate(report.class_names)]
    for kind in ("macro", "weighted"):
        rows.append((f"{kind} avg", [f"{avg[kind][m]:.4f}" for m in _COLUMNS[:3]] + [str(report.count)]))
    return rows


def summary_line(report: Report) -> str:
    tops = "".join(f", top-{k[4:]} {v:.4f}" for k, v in report.top_k().items() if k != "top_1")
    return (f"accuracy {report.accuracy:.4f} on {report.count} images, macro-F1 {report.macro_f1:.4f}"
            f"{tops}, loss {report.loss:.4f}")


def text_table(report: Report, limit: int = 50) -> str:
    """The compact per-class table a terminal shows (the first ``limit`` classes)."""
    rows = _rows(report)
    if len(rows) - 2 > limit:
        rows = rows[:limit] + [("...", [""] * 4)] + rows[-2:]
    width = max(12, *(len(name) for name, _ in rows))
    lines = [f"{'class':<{width}} " + " ".join(f"{c:>9}" for c in _COLUMNS)]
    lines += [f"{name:<{width}} " + " ".join(f"{v:>9}" for v in values) for name, values in rows]
    return "\n".join(lines + [summary_line(report)])


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(report: Report) -> str:
    """Per-class precision, recall, F1 and support as a Markdown table, averages last."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, values in _rows(report):
        bold = name.endswith(" avg")
        cells = [f"**{cell(name)}**" if bold else cell(name)] + values
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_confusion(report: Report) -> str:
    names = [cell(n) for n in report.class_names]
    lines = ["| true \\ predicted | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {names[i]} | " + " | ".join(str(int(v)) for v in row) + " |"
              for i, row in enumerate(report.confusion)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- files
def confusion_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true \\ predicted", *report.class_names])
    for name, row in zip(report.class_names, report.confusion):
        w.writerow([name, *(int(v) for v in row)])
    return buf.getvalue()


def per_class_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", *_COLUMNS])
    for name, values in _rows(report):
        w.writerow([name, *values])
    return buf.getvalue()


def is_evaluation(metrics_json: str) -> bool:
    """The file is a metrics.json that :func:`write` wrote (the mark of an evaluation folder)."""
    from ..rundir import read_json_capped

    d = read_json_capped(metrics_json, 64 << 20, "metrics.json")
    return isinstance(d, dict) and all(k in d for k in ("per_class", "class_names", "confusion_matrix", "macro_f1"))


def write(report: Report, folder: str, about: dict | None = None, plot: bool = True):
    """``metrics.json`` (with ``about``: what was evaluated), ``per_class.csv``,
    ``confusion_matrix.csv`` and (with ``plot``) ``confusion_matrix.png`` in ``folder``, each atomically."""
    from .files import plot_confusion
    from ..rundir import atomic_write

    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "metrics.json"),
                 json.dumps(dict(about or {}, **report.to_dict()), indent=2) + "\n", fsync=False)
    atomic_write(os.path.join(folder, "per_class.csv"), per_class_csv(report), fsync=False)
    atomic_write(os.path.join(folder, "confusion_matrix.csv"), confusion_csv(report), fsync=False)
    if plot:
        plot_confusion(report.confusion, report.class_names, os.path.join(folder, "confusion_matrix.png"))
