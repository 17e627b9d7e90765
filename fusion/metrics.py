"""The one definition of every classification metric the product reports.

Macro-F1 is averaged over **all K classes of the store** (labels ``0..K-1``), with F1 = 0 for a
class that is neither present nor predicted (scikit-learn's ``f1_score(y, p,
labels=range(K), average="macro", zero_division=0)``). Heads, fine-tuned heads and stacks all
report through :func:`classification_metrics`, so `fusion compare` ranks them on one metric.
Rows whose label is negative (unlabelled items) are left out of every metric.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedstore.classes import BUCKETS, frequency_buckets

__all__ = ["confusion", "f1_from_counts", "macro_f1", "per_class_f1", "classification_metrics",
           "f1_by_frequency", "frequency_buckets", "BUCKETS", "AVAILABILITY", "IMAGE_COUNTS",
           "by_availability"]


def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    y = np.asarray(y, np.int64)
    pred = np.asarray(pred, np.int64)
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def f1_from_counts(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray) -> np.ndarray:
    """F1 per class from counts of true positives, true items and predicted items (arrays of
    any matching shape, e.g. (resamples, K)): ``2 tp / (n_true + n_pred)``, 0 where both are 0.
    The one F1 formula: :func:`per_class_f1` and the bootstrap (:mod:`fusion.bootstrap`) use it.
    """
    tp = np.asarray(tp, np.float64)
    denom = np.asarray(n_true, np.float64) + np.asarray(n_pred, np.float64)
    return np.divide(2 * tp, denom, out=np.zeros(np.broadcast(tp, denom).shape),
                     where=denom > 0)


def per_class_f1(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(K,) F1 per class; 0 for a class neither present nor predicted. From three bincounts
    (true positives, true items, predicted items), O(N + K): no K x K confusion matrix, which
    at 5,600 classes would be 250 MB per call (every epoch's validation calls this)."""
    y = np.asarray(y, np.int64)
    pred = np.asarray(pred, np.int64)
    return f1_from_counts(np.bincount(y[y == pred], minlength=k), np.bincount(y, minlength=k),
                          np.bincount(pred, minlength=k))


def macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Mean F1 over the K classes (see the module docstring). Cheap enough for every epoch."""
    return float(per_class_f1(y, pred, k).mean())


def classification_metrics(y: np.ndarray, probs: np.ndarray,
                           classes: list[Any] | None = None) -> dict[str, Any]:
    """``{"accuracy", "macro_f1", "n"}`` (+ ``"per_class_f1"``, a list aligned with ``classes``,
    when ``classes`` is given) for probabilities ``probs`` (N, K) against labels ``y`` (N,);
    ``probs`` may be a dense array or a top-k block (:class:`fusion.probs.TopK`).

    Rows with ``y < 0`` are ignored; with no labelled row the metrics are ``None``.
    """
    y = np.asarray(y, np.int64)
    k = probs.shape[1]
    keep = y >= 0
    if not keep.any():
        out: dict[str, Any] = {"accuracy": None, "macro_f1": None, "n": 0}
        if classes is not None:
            out["per_class_f1"] = None
        return out
    # a fusion.probs.TopK answers argmax(1) from its stored indices (no N x K array)
    pred = (probs.argmax(1) if hasattr(probs, "argmax") else np.asarray(probs).argmax(1))[keep]
    y = y[keep]
    per = per_class_f1(y, pred, k)
    out = {"accuracy": float((pred == y).mean()), "macro_f1": float(per.mean()),
           "n": int(keep.sum())}
    if classes is not None:
        if len(classes) != k:
            raise ValueError(f"{len(classes)} class names for {k} probability columns")
        out["per_class_f1"] = [float(v) for v in per]
    return out


def f1_by_frequency(per_class: np.ndarray | list[float], counts: np.ndarray
                    ) -> dict[str, dict[str, Any]]:
    """Per-class F1 by frequency bucket: ``{"head" | "torso" | "tail": {"classes", "items",
    "macro_f1"}}``, each bucket's mean F1 over its classes (None for an empty bucket). The
    buckets come from ``counts``, the classes' numbers of training items, and are defined once
    in :func:`embedstore.classes.frequency_buckets` (cumulative item share: head = the largest
    classes holding the first 50% of items, torso the next 30%, tail the last 20%)."""
    per = np.asarray(per_class, np.float64)
    counts = np.asarray(counts, np.int64)
    bucket = frequency_buckets(counts)
    out = {}
    for j, name in enumerate(BUCKETS):
        sel = bucket == j
        out[name] = {"classes": int(sel.sum()), "items": int(counts[sel].sum()),
                     "macro_f1": float(per[sel].mean()) if sel.any() else None}
    return out


AVAILABILITY = ("both", "text_only", "image_only")
IMAGE_COUNTS = ("1", "2", "3", "4+")  # galleries: items by number of readable images


def by_availability(y: np.ndarray, probs: np.ndarray, text_ok: np.ndarray,
                    image_ok: np.ndarray) -> dict[str, dict[str, Any]]:
    """:func:`classification_metrics` (accuracy, macro-F1 over all K classes, n) of the items
    with both modalities, with the text only and with the image only (``text_ok`` /
    ``image_ok``: (N,) bool, what each item has in the store; docs/runs.md §2.6). Items with
    neither are in no group (they still count in the overall metrics).

    Galleries: ``image_ok`` may be (N,) int, each item's number of readable images (0 = no
    image); when some item has more than one, ``by_images`` adds the blocks of the items with
    1, 2, 3 and 4+ images (:data:`IMAGE_COUNTS`)."""
    counts = np.asarray(image_ok)
    t, i = np.asarray(text_ok, bool), counts.astype(bool)
    y = np.asarray(y, np.int64)
    groups = {"both": t & i, "text_only": t & ~i, "image_only": ~t & i}

    def block(sel: np.ndarray) -> dict[str, Any]:
        rows = np.flatnonzero(sel)
        # classification_metrics: macro-F1 over all K columns, as every other score
        return (classification_metrics(y[rows], probs[rows]) if len(rows)
                else {"accuracy": None, "macro_f1": None, "n": 0})

    out: dict[str, Any] = {name: block(groups[name]) for name in AVAILABILITY}
    if counts.dtype.kind in "iu" and (counts > 1).any():
        out["by_images"] = {k: block(counts == j + 1 if j < 3 else counts >= 4)
                            for j, k in enumerate(IMAGE_COUNTS)}
    return out
