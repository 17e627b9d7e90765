"""Paired bootstrap intervals for the difference between two runs on the same items.

Both runs' predictions on the *same* resampled items are scored in each resample, so the
interval is on the paired difference (what `fusion compare` needs to say "tied"): items are
drawn with replacement (optionally within each class, ``stratified``), and for every resample
each item's multiplicity is one ``np.bincount`` over a batch of resamples' flattened
draws, and the per-class counts (true, predicted, true positives) of both runs are one sparse
product of those multiplicities with the items' class-indicator matrix. Macro-F1
comes from those counts through :func:`fusion.metrics.f1_from_counts` (the one F1 formula), so
there is no Python loop over items; the loop is over batches of resamples.

The draws are a function of ``seed`` only (one :func:`draw_indices` call per resample, in
order), so the same seed gives the same interval whatever the batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from .metrics import f1_from_counts

__all__ = ["DEFAULT_RESAMPLES", "Interval", "draw_indices", "paired_bootstrap", "strata_of"]

DEFAULT_RESAMPLES = 1000
#: items x resamples gathered at once (memory: ~10 int64 arrays of this size)
_BATCH_ITEMS = 4_000_000


@dataclass(frozen=True)
class Interval:
    """``diff`` = metric(A) - metric(B) on all items; ``lo``/``hi`` its ``level`` percentile
    bootstrap interval; ``tied`` when the interval contains 0."""

    diff: float
    lo: float
    hi: float
    tied: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def strata_of(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`draw_indices` needs to resample within each class of ``y``: the item indices
    sorted by class, and for each position in that order the start and size of its class."""
    order = np.argsort(y, kind="stable")
    _, start, size = np.unique(y[order], return_index=True, return_counts=True)
    return order, np.repeat(start, size), np.repeat(size, size)


def draw_indices(rng: np.random.Generator, n: int,
                 strata: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """One resample: ``n`` item indices drawn with replacement. With ``strata``
    (:func:`strata_of`), each class is resampled within itself, keeping its size."""
    if strata is None:
        return rng.integers(0, n, n)
    order, start, size = strata
    return order[start + (rng.random(n) * size).astype(np.int64)]


def _indicator(keys: list[np.ndarray], k: int) -> sp.csr_matrix:
    """(len(keys) * k, n) 0/1 matrix: block j row c has a 1 for each item whose ``keys[j]`` is c
    (key k, "no class", is dropped)."""
    n = len(keys[0])
    rows = np.concatenate([j * (k + 1) + kj for j, kj in enumerate(keys)])
    cols = np.tile(np.arange(n), len(keys))
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(keys) * (k + 1), n))
    keep = np.ones(len(keys) * (k + 1), bool)
    keep[k::k + 1] = False
    return m[keep]


def _f1_diff(counts: np.ndarray) -> np.ndarray:
    """Macro-F1(A) - macro-F1(B) per resample from counts (b, 5, K): true, predicted A,
    predicted B, true positives A, true positives B."""
    true, pa, pb, tpa, tpb = (counts[:, j] for j in range(5))
    return f1_from_counts(tpa, true, pa).mean(1) - f1_from_counts(tpb, true, pb).mean(1)


def _interval(point: float, samples: np.ndarray, level: float) -> Interval:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    lo, hi = float(lo), float(hi)
    return Interval(diff=float(point), lo=lo, hi=hi, tied=bool(lo <= 0 <= hi))


def paired_bootstrap(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, k: int, *,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     stratified: bool = False, level: float = 0.95) -> dict[str, Interval]:
    """``{"macro_f1": Interval, "accuracy": Interval}`` of A minus B over the items ``y``
    (labels in [0, k)), ``pred_a`` and ``pred_b`` (predicted classes, aligned with ``y``)."""
    y = np.asarray(y, np.int64)
    pred_a = np.asarray(pred_a, np.int64)
    pred_b = np.asarray(pred_b, np.int64)
    n = len(y)
    if n == 0 or len(pred_a) != n or len(pred_b) != n:
        raise ValueError(f"need the same non-zero number of items, got {n}, {len(pred_a)}, "
                         f"{len(pred_b)}")
    if resamples < 1:
        raise ValueError(f"resamples={resamples}: need at least 1")
    ok_a, ok_b = pred_a == y, pred_b == y
    # per item: its class, both predictions, and the class it is a true positive of (k = none)
    keys = [y, pred_a, pred_b, np.where(ok_a, y, k), np.where(ok_b, y, k)]
    # (5K, n) column-compressed: the product below walks each item's 5 entries once per
    # resample; float32 counts are exact below 2**24 items (2.6x faster than float64 CSR)
    dtype = np.float32 if n < 2**24 else np.float64
    ind = _indicator(keys, k).tocsc().astype(dtype)
    ok_diff = ok_a.astype(np.float64) - ok_b
    strata = strata_of(y) if stratified else None
    rng = np.random.default_rng(seed)
    f1_diff = np.empty(resamples)
    acc_diff = np.empty(resamples)
    step = max(1, _BATCH_ITEMS // n)
    for start in range(0, resamples, step):
        b = min(step, resamples - start)
        idx = np.stack([draw_indices(rng, n, strata) for _ in range(b)])  # (b, n)
        flat = idx + (np.arange(b, dtype=np.int64) * n)[:, None]
        # w[r, i] = how many times resample r drew item i
        w = np.bincount(flat.ravel(), minlength=b * n).reshape(b, n).astype(dtype)
        f1_diff[start:start + b] = _f1_diff((ind @ w.T).T.reshape(b, 5, k).astype(np.float64))
        acc_diff[start:start + b] = w.astype(np.float64) @ ok_diff / n
    point_f1 = float(_f1_diff((ind @ np.ones((n, 1), dtype)).T.reshape(1, 5, k)
                              .astype(np.float64))[0])
    point_acc = float(ok_diff.mean())
    return {"macro_f1": _interval(point_f1, f1_diff, level),
            "accuracy": _interval(point_acc, acc_diff, level)}
