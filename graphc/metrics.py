"""Classification metrics in NumPy, with scikit-learn's definitions.

Inputs are label arrays (integer class indices) or score arrays. Where a ratio is 0/0 (the
precision of a class never predicted, the recall of a class absent from `y_true`), it is
taken as 0 without a warning: scikit-learn's `zero_division=0`, which is what its default
("warn") returns, minus the warning.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from graphc.ir.errors import GraphcError

AVERAGES = ("macro", "micro", "weighted", None)


class MetricError(GraphcError, ValueError):
    """Inputs a metric cannot be computed from."""


# A confusion matrix of more classes takes more than 512 MiB of counts (K is one more than the
# largest label: two labels of 30000 asked for 6.7 GiB).
MAX_CLASSES = 2**13


def _labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise MetricError(f"{name} must be a 1-D array of labels, got shape {y.shape}")
    if y.size and not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise MetricError(f"{name} must hold integer class labels, got {y.dtype}")
    if y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max:  # would wrap negative
        raise MetricError(f"{name} holds label {y.max()}, beyond int64")
    return y.astype(np.int64)


def _label_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise MetricError(f"y_true and y_pred differ in length: {y_true.shape} vs {y_pred.shape}")
    return y_true, y_pred


def _num_classes(num_classes: int | None, caller: str) -> int | None:
    """`num_classes` checked: None, or an integer >= 1 (2.7 or True would count some other way)."""
    if num_classes is None:
        return None
    if (not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, (bool, np.bool_))
            or num_classes < 1):
        raise MetricError(f"{caller}: num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, with 0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of predictions equal to the true label."""
    y_true, y_pred = _label_pair(y_true, y_pred)
    if y_true.size == 0:
        raise MetricError("accuracy of an empty set of predictions is undefined")
    return float(np.mean(y_true == y_pred))


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """int64 (K, K) counts: entry [i, j] is the number of samples of class i predicted as j.

    Classes are the indices 0..K-1; K defaults to one more than the largest label seen.
    """
    y_true, y_pred = _label_pair(y_true, y_pred)
    num_classes = _num_classes(num_classes, "confusion_matrix")
    seen_max = int(max(y_true.max(initial=-1), y_pred.max(initial=-1)))
    k = seen_max + 1 if num_classes is None else num_classes
    if y_true.size and min(y_true.min(), y_pred.min()) < 0:
        raise MetricError("confusion_matrix: labels must be non-negative class indices")
    if seen_max >= k:
        raise MetricError(f"confusion_matrix: label {seen_max} does not fit num_classes={k}")
    if k > MAX_CLASSES:
        raise MetricError(f"confusion_matrix: {k} classes (labels are class indices 0..K-1) would "
                          f"make a {k} x {k} matrix of {k * k * 8 / 2**30:.3g} GiB; at most "
                          f"{MAX_CLASSES} classes")
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def precision_recall_f1(y_true: Any, y_pred: Any, average: str | None = "macro",
                        num_classes: int | None = None
                        ) -> tuple[float, float, float] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 score, per class or averaged.

    The classes are 0..num_classes-1 when `num_classes` is given, else the labels that occur in
    `y_true` or `y_pred` (sorted), as scikit-learn does. `average`: "macro" (unweighted mean
    over classes), "micro" (from the pooled counts; equals accuracy when every label is
    counted), "weighted" (mean weighted by each class's support), or None (arrays, one entry
    per class). A 0/0 ratio counts as 0 (see the module docstring).
    """
    if average not in AVERAGES:
        raise MetricError(f"precision_recall_f1: average must be one of {AVERAGES}, "
                          f"got {average!r}")
    tp, predicted, support = _per_class_counts(y_true, y_pred, num_classes)
    if average == "micro":
        tp, predicted, support = tp.sum(), predicted.sum(), support.sum()
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * tp, predicted + support)  # = 2PR/(P+R), and 0 when tp = 0
    if average == "micro":
        return float(precision), float(recall), float(f1)
    if average is None:
        return precision, recall, f1
    weights = support if average == "weighted" else np.ones_like(support)
    return tuple(float(_safe_divide(np.sum(m * weights), np.sum(weights)))
                 for m in (precision, recall, f1))


def _per_class_counts(y_true, y_pred, num_classes: int | None):
    """(true positives, predicted count, support) per class, as int64 arrays."""
    y_true, y_pred = _label_pair(y_true, y_pred)
    num_classes = _num_classes(num_classes, "precision_recall_f1")
    if y_true.size == 0:
        raise MetricError("precision and recall of an empty set of predictions are undefined")
    if num_classes is None:
        classes = np.union1d(y_true, y_pred)
    else:
        classes = np.arange(num_classes)
        outside = np.setdiff1d(np.union1d(y_true, y_pred), classes)
        if outside.size:
            raise MetricError(f"labels {outside.tolist()} do not fit num_classes={num_classes}")
    true_index = np.searchsorted(classes, y_true)
    pred_index = np.searchsorted(classes, y_pred)
    k = len(classes)
    tp = np.bincount(true_index[y_true == y_pred], minlength=k)
    return tp, np.bincount(pred_index, minlength=k), np.bincount(true_index, minlength=k)


def roc_curve(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Receiver operating characteristic of binary labels (1 positive, 0 negative) and scores.

    Returns (fpr, tpr, thresholds) with one point per distinct score, highest first, after a
    leading (0, 0) point at threshold +inf: scikit-learn's `roc_curve` with
    `drop_intermediate=False`. Tied scores form a single point, so ties give diagonal steps.
    """
    y_true, scores = _binary_problem(y_true, scores)
    order = np.argsort(scores, kind="stable")[::-1]  # not -scores: that wraps unsigned integers
    y_sorted, s_sorted = y_true[order], scores[order]
    # the last index of each run of equal scores: where the curve takes a point
    ends = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), y_sorted.size - 1]
    tps = np.cumsum(y_sorted)[ends]
    fps = ends + 1 - tps
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, s_sorted[ends]]


def _scores(scores) -> np.ndarray:
    """Scores to rank: integers as they are, since float64 would tie 2**60 and 2**60 + 1;
    anything else as float64."""
    scores = np.asarray(scores)
    return scores if scores.dtype.kind in "iu" else scores.astype(np.float64)


def _binary_problem(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y_true = _labels(y_true, "y_true")
    scores = _scores(scores)
    if scores.shape != y_true.shape:
        raise MetricError(f"roc_curve: scores must have the shape of y_true {y_true.shape}, "
                          f"got {scores.shape}")
    if not np.all((y_true == 0) | (y_true == 1)):
        raise MetricError("roc_curve: y_true must be binary (0 or 1)")
    if not np.all(np.isfinite(scores)):
        raise MetricError("roc_curve: scores must be finite")
    positives = int(y_true.sum())
    if positives == 0 or positives == y_true.size:
        raise MetricError(f"ROC is undefined with {positives} positive(s) among {y_true.size} "
                          "samples: both classes must occur")
    return y_true, scores


def auc(x: Any, y: Any) -> float:
    """Area under the curve through the points (x, y), by the trapezoidal rule.

    `x` must be monotonic (increasing or decreasing); the area is positive either way.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise MetricError(f"auc needs two 1-D arrays of equal length >= 2, got shapes "
                          f"{x.shape} and {y.shape}")
    steps = np.diff(x)
    if np.all(steps >= 0):
        direction = 1.0
    elif np.all(steps <= 0):
        direction = -1.0
    else:
        raise MetricError("auc: x must be monotonic increasing or decreasing")
    return direction * float(np.sum(steps * (y[1:] + y[:-1]) / 2))


def roc_auc(y_true: Any, scores: Any, multi_class: str = "ovr") -> float:
    """Area under the ROC curve.

    Binary: `y_true` in {0, 1} and 1-D `scores` for the positive class. Multiclass: `y_true`
    class indices 0..K-1 and `scores` (N, K); each class against the rest, macro-averaged
    (scikit-learn's multi_class="ovr", average="macro"). Every class must occur in `y_true`.
    """
    if multi_class != "ovr":
        raise MetricError(f"roc_auc: only multi_class='ovr' is supported, got {multi_class!r}")
    scores = _scores(scores)
    if scores.ndim == 1:
        return auc(*roc_curve(y_true, scores)[:2])
    y_true = _labels(y_true, "y_true")
    if scores.ndim != 2 or scores.shape[0] != y_true.size:
        raise MetricError(f"roc_auc: multiclass scores must be (N, K) with N = {y_true.size}, "
                          f"got {scores.shape}")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= scores.shape[1]):
        raise MetricError(f"roc_auc: labels must be class indices below K = {scores.shape[1]}")
    if y_true.size == 0:
        raise MetricError("roc_auc: y_true is empty: the area is undefined without samples")
    absent = np.setdiff1d(np.arange(scores.shape[1]), y_true)
    if absent.size:
        raise MetricError(f"roc_auc: one-vs-rest ROC is undefined for class(es) "
                          f"{absent.tolist()}, which never occur in y_true")
    per_class = [auc(*roc_curve(y_true == c, scores[:, c])[:2]) for c in range(scores.shape[1])]
    return float(np.mean(per_class))


def classification_report(y_true: Any, y_pred: Any, digits: int = 2) -> str:
    """A text table of per-class precision, recall, F1 and support, then accuracy and the
    macro and support-weighted averages, laid out exactly as scikit-learn's report."""
    booleans = all(np.asarray(y).dtype == np.bool_ for y in (y_true, y_pred))
    y_true, y_pred = _label_pair(y_true, y_pred)
    classes = np.union1d(y_true, y_pred)
    names = [str(bool(c)) if booleans else str(c) for c in classes]  # False/True as scikit-learn
    precision, recall, f1 = precision_recall_f1(y_true, y_pred, average=None)
    support = np.bincount(np.searchsorted(classes, y_true), minlength=len(classes))
    total = int(support.sum())

    headers = ("precision", "recall", "f1-score", "support")
    label_width = max(len("weighted avg"), digits, *map(len, names))
    cell = len(headers[0])

    def row(label: str, metrics: list[float | None], count: int) -> str:
        cells = "".join(" " * (cell + 1) if m is None else f" {m:>{cell}.{digits}f}"
                        for m in metrics)
        return f"{label:>{label_width}} {cells} {count:>{cell}}"

    lines = [f"{'':>{label_width}} " + "".join(f" {h:>{cell}}" for h in headers), ""]
    lines += [row(name, [p, r, f], int(s))
              for name, p, r, f, s in zip(names, precision, recall, f1, support)]
    lines.append("")
    lines.append(row("accuracy", [None, None, accuracy(y_true, y_pred)], total))
    for average in ("macro", "weighted"):
        lines.append(row(f"{average} avg", list(precision_recall_f1(y_true, y_pred, average)),
                         total))
    return "\n".join(lines) + "\n"
