"""The candidate stacker's rows: (item, candidate class) pairs and their float32 features, built
vectorised over blocks of items (issue 15).

Input is :func:`fusion.stack.inputs.candidate_matrix` (per source run its top-k class indices,
probabilities and rest, (N, runs x (2k + 1)) float32). For each item the candidates are the union
of the runs' top ``depth`` classes, sorted by class; each row's features are, per run, the run's
probability of the class (its ``fill``, rest / (K - k), when the run did not keep it), its rank
(k + 1 when not kept), its log-odds and its margin to the run's best class, then how many runs
rank the class first and the class's frequency among a model's training rows.

A run's value for any (item, class) is found by one ``searchsorted`` of the keys
``item * K + class`` in the run's keys sorted the same way: O(rows x log(n x k)) per run, never
a comparison of every candidate with every kept class and never a per-item Python loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import StackError

__all__ = ["BLOCK_ITEMS", "EPS", "PER_RUN", "SHARED", "Tops", "candidate_pairs", "features",
           "item_blocks", "split_columns"]

PER_RUN = ("p", "rank", "logodds", "margin")  # features per source run and candidate
SHARED = ("n_first", "class_freq")  # features shared by the runs
EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before log-odds
BLOCK_ITEMS = 16_384  # items whose rows are built (and scored) at a time: bounds the scratch


@dataclass(frozen=True)
class Tops:
    """The runs' top-k blocks of n items: ``idx`` (runs, n, k) int64 class indices, most probable
    first, ``p`` (runs, n, k) float32, ``rest`` (runs, n) float32 (the mass outside the top k)."""

    idx: np.ndarray
    p: np.ndarray
    rest: np.ndarray

    @property
    def k(self) -> int:
        return self.idx.shape[2]

    def __len__(self) -> int:
        return self.idx.shape[1]


def split_columns(X: np.ndarray, n_runs: int) -> Tops:
    """:class:`Tops` of a candidate-matrix block ``X`` (n, runs x (2k + 1))."""
    width = X.shape[1] // n_runs if n_runs else 0
    k = (width - 1) // 2
    if n_runs < 1 or X.shape[1] != n_runs * (2 * k + 1) or k < 1:
        raise StackError(f"candidate stacker: {X.shape[1]} input columns are not "
                         f"{n_runs} runs x (2k + 1); build them with candidate_matrix")
    B = X.reshape(len(X), n_runs, width)
    return Tops(idx=np.ascontiguousarray(B[:, :, :k].transpose(1, 0, 2)).astype(np.int64),
                p=np.ascontiguousarray(B[:, :, k:2 * k].transpose(1, 0, 2), np.float32),
                rest=np.ascontiguousarray(B[:, :, 2 * k].T, np.float32))


def item_blocks(n: int, block: int | None = None) -> Iterator[slice]:
    """Slices of at most ``block`` (default :data:`BLOCK_ITEMS`) items covering ``range(n)``."""
    block = block or BLOCK_ITEMS
    for s in range(0, n, block):
        yield slice(s, min(n, s + block))


def candidate_pairs(tops: Tops, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """``(item, class)`` (M,) int64 of every candidate row: the union of the runs' top ``depth``
    classes of each item, item-major and by class within an item. M <= n x depth x runs."""
    d = min(depth, tops.k)
    cand = np.sort(tops.idx[:, :, :d].transpose(1, 0, 2).reshape(len(tops), -1), axis=1)
    keep = np.ones(cand.shape, bool)
    keep[:, 1:] = cand[:, 1:] != cand[:, :-1]
    item = np.broadcast_to(np.arange(len(tops))[:, None], cand.shape)
    return item[keep], cand[keep]


def _lookup(idx: np.ndarray, item: np.ndarray, cls: np.ndarray, n_classes: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Where class ``cls[m]`` sits in one run's top-k row ``idx[item[m]]`` (n, k):
    ``(found (M,) bool, column (M,) int64)`` (column 0 where not found)."""
    n, k = idx.shape
    order = np.argsort(idx, axis=1, kind="stable")  # (n, k): a repeated class keeps its first
    keys = (np.arange(n, dtype=np.int64)[:, None] * n_classes
            + np.take_along_axis(idx, order, 1)).ravel()  # ascending, item-major
    q = item * n_classes + cls
    pos = np.minimum(np.searchsorted(keys, q), keys.size - 1)
    found = keys[pos] == q
    col = np.where(found, order.ravel()[pos], 0)
    return found, col


def features(tops: Tops, item: np.ndarray, cls: np.ndarray, n_classes: int,
             class_freq: np.ndarray) -> np.ndarray:
    """(M, 4 x runs + 2) float32 C-ordered features of the rows (``item``, ``cls``), any class
    (one a run did not keep gets its fill and rank k + 1). ``class_freq`` (K,) float32 is the
    class-frequency feature of every class."""
    n_runs, k = tops.idx.shape[0], tops.k
    out = np.empty((len(PER_RUN) * n_runs + len(SHARED), len(item)), np.float32).T
    first = np.zeros(len(item), np.float32)
    for j in range(n_runs):
        found, col = _lookup(tops.idx[j], item, cls, n_classes)
        fill = tops.rest[j] / max(1, n_classes - k)  # (n,) float32
        pc = np.where(found, tops.p[j].ravel()[item * k + col], fill[item])
        pc = np.clip(pc, EPS, 1.0 - EPS)
        rank = np.where(found, col + 1, k + 1).astype(np.float32)
        log_best = np.log(np.clip(tops.p[j, :, 0], EPS, 1.0))  # (n,)
        log_pc = np.log(pc)
        c = len(PER_RUN) * j
        out[:, c] = pc
        out[:, c + 1] = rank
        out[:, c + 2] = np.log(pc / (1.0 - pc))
        out[:, c + 3] = log_best[item] - log_pc
        first += rank == 1
    out[:, -2] = first
    out[:, -1] = class_freq[cls]
    return out
