"""Class sizes: the distribution of items over classes and the head / torso / tail buckets.

E-commerce teams read long-tailed results by frequency bucket. The buckets are defined here,
once, by **cumulative item share**: rank the classes by their number of items (most first,
ties by class index); a class is

* ``head`` if the classes ranked above it hold less than half of the items (:data:`HEAD_SHARE`),
* ``torso`` if they hold less than 80% (:data:`TORSO_SHARE`),
* ``tail`` otherwise, and always when it has no item.

So the head is the few large classes that make up the first half of the catalog, the tail the
many small classes that make up its last fifth. `embedstore info` counts the classes per
bucket over the store's trainable items; `fusion report` (through :mod:`fusion.metrics`) gives
the macro-F1 of each bucket.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BUCKETS", "HEAD_SHARE", "TORSO_SHARE", "frequency_buckets", "class_sizes"]

BUCKETS = ("head", "torso", "tail")
HEAD_SHARE = 0.5  # the head ends where the classes ranked above hold half of the items
TORSO_SHARE = 0.8  # the torso ends at 80%; the rest is the tail


def frequency_buckets(counts: np.ndarray) -> np.ndarray:
    """(K,) bucket index per class (0 head, 1 torso, 2 tail; see the module docstring) from
    the number of items of each class."""
    counts = np.asarray(counts, np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))  # most items first, ties by index
    ranked = counts[order]
    before = (np.cumsum(ranked) - ranked) / max(1, int(counts.sum()))
    out = np.empty(len(counts), np.int64)
    out[order] = np.where(before < HEAD_SHARE, 0, np.where(before < TORSO_SHARE, 1, 2))
    out[counts == 0] = 2
    return out


def class_sizes(counts: np.ndarray) -> dict[str, Any]:
    """The class-size distribution: min / median / max items per class, how many classes have
    fewer than 5 and 20 items, and how many classes are head / torso / tail."""
    counts = np.asarray(counts, np.int64)
    if not len(counts):
        return {"min": 0, "median": 0.0, "max": 0, "below_5": 0, "below_20": 0,
                **dict.fromkeys(BUCKETS, 0)}
    per = np.bincount(frequency_buckets(counts), minlength=len(BUCKETS))
    return {"min": int(counts.min()), "median": float(np.median(counts)),
            "max": int(counts.max()), "below_5": int((counts < 5).sum()),
            "below_20": int((counts < 20).sum()),
            **{b: int(n) for b, n in zip(BUCKETS, per, strict=True)}}
