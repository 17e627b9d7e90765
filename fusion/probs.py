"""A run's probabilities in either layout (docs/runs.md section 2.3): dense (N, K) float32 arrays
for small K, :class:`TopK` once K is large.

A :class:`TopK` block holds, per row, the k largest probabilities (descending, float16), their
class indices (int32) and ``rest``, the mass of the other K - k classes (float32, so a row still
sums to 1). It answers the few questions consumers ask of a dense array with the same spelling
(``shape``, ``len``, ``block[rows]``, ``argmax(1)``), so metrics, the bootstrap and reports read
both layouts without densifying; :meth:`TopK.dense` expands rows when a consumer needs all K
columns (the rest is spread evenly over the K - k classes not kept, which keeps every row's
argmax). The argmax of a top-k row is its first index, taken from the float32 probabilities
before rounding, so metrics from the argmax are identical in both layouts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .config import BLOCK_BYTES, DENSE_MAX_CLASSES, TOP_K_STORE

__all__ = ["DENSE", "TOPK", "TopK", "Probs", "layout_for", "to_topk", "topk_of", "mean_topk",
           "dense_rows", "take", "load_topk", "save_topk", "BLOCK_ROWS", "block_rows"]

DENSE, TOPK = "dense", "topk"
BLOCK_ROWS = 8192  # rows densified at a time by dense_rows: (8192, 5600) float32 = 183 MB


def block_rows(n_classes: int, budget: int | None = None) -> int:
    """Rows of a (rows, ``n_classes``) float32 block that fit ``budget`` bytes (default
    :data:`fusion.config.BLOCK_BYTES`; at least 1 row): how many rows are predicted or ranked at
    a time, so the block's size does not grow with K."""
    budget = BLOCK_BYTES if budget is None else budget
    return max(1, int(budget) // (4 * max(1, int(n_classes))))


@dataclass
class TopK:
    """Top-k probabilities of ``(..., N)`` rows over ``n_classes`` classes.

    ``idx`` (..., k) int32 and ``p`` (..., k) float16, most probable first; ``rest`` (...,) float32
    is the mass of the classes not kept. Leading dimensions index like a NumPy array
    (``holdout_folds[f]`` is one fold's (N_holdout, ...) block).
    """

    idx: np.ndarray
    p: np.ndarray
    rest: np.ndarray
    n_classes: int

    @property
    def k(self) -> int:
        return int(self.idx.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.rest.shape, self.n_classes)

    @property
    def ndim(self) -> int:
        return self.rest.ndim + 1

    @property
    def nbytes(self) -> int:
        return int(self.idx.nbytes + self.p.nbytes + self.rest.nbytes)

    def __len__(self) -> int:
        return int(self.rest.shape[0])

    def __getitem__(self, key: Any) -> TopK:
        return TopK(np.asarray(self.idx[key]), np.asarray(self.p[key]),
                    np.asarray(self.rest[key]), self.n_classes)

    def __setitem__(self, key: Any, value: TopK) -> None:
        if value.k != self.k:
            raise ValueError(f"top-k block of k={value.k} assigned into one of k={self.k}")
        self.idx[key], self.p[key], self.rest[key] = value.idx, value.p, value.rest

    def argmax(self, axis: int = -1) -> np.ndarray:
        """The most probable class of each row (axis must be the class axis)."""
        if axis not in (-1, self.ndim - 1):
            raise ValueError("TopK.argmax works over the class axis only")
        return self.idx[..., 0].astype(np.int64)

    def max(self) -> np.ndarray:
        """The largest probability of each row (float32)."""
        return self.p[..., 0].astype(np.float32)

    def fill(self) -> np.ndarray:
        """(...,) float32: the probability given to each class not kept, ``rest / (K - k)``."""
        return self.rest / max(1, self.n_classes - self.k)

    def dense(self) -> np.ndarray:
        """(..., K) float32 rows (use on blocks of rows: this is the N x K array)."""
        out = np.empty(self.shape, np.float32)
        out[...] = self.fill()[..., None]
        np.put_along_axis(out, self.idx.astype(np.int64), self.p.astype(np.float32), axis=-1)
        return out

    def sums(self) -> np.ndarray:
        """Row sums (float64): 1 for well-formed rows."""
        return self.p.astype(np.float64).sum(-1) + self.rest

    def equals(self, other: Any) -> bool:
        return (isinstance(other, TopK) and self.n_classes == other.n_classes
                and np.array_equal(self.idx, other.idx) and np.array_equal(self.p, other.p)
                and np.array_equal(self.rest, other.rest))

    @classmethod
    def empty(cls, n: int, k: int, n_classes: int) -> TopK:
        return cls(np.zeros((n, k), np.int32), np.zeros((n, k), np.float16),
                   np.ones(n, np.float32), n_classes)


Probs = np.ndarray | TopK  # what Run.probs(split) returns


def layout_for(n_classes: int, top_k: int | None = None,
               dense_max_classes: int | None = None) -> dict[str, Any]:
    """``config.probs`` of a run with ``n_classes`` classes: ``{"layout": "dense"}`` when
    ``n_classes <= dense_max_classes`` (default :data:`fusion.config.DENSE_MAX_CLASSES`) or when
    ``top_k >= n_classes`` (with a ``note``), else ``{"layout": "topk", "k": top_k}``."""
    top_k = TOP_K_STORE if top_k is None else int(top_k)
    dense_max = DENSE_MAX_CLASSES if dense_max_classes is None else int(dense_max_classes)
    if top_k < 1:
        raise ValueError(f"--top-k-store must be >= 1, got {top_k}; e.g. 20")
    if n_classes <= dense_max:
        return {"layout": DENSE}
    if top_k >= n_classes:
        return {"layout": DENSE, "note": f"--top-k-store {top_k} >= {n_classes} classes: "
                "stored dense (every class kept)"}
    return {"layout": TOPK, "k": top_k}


def _rank_block(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx, p) of the k largest of each row of a dense float block, descending; ties by the
    lower class index (so idx[:, 0] == p.argmax(1))."""
    n, kk = p.shape
    if k < kk:
        part = np.argpartition(-p, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(kk), (n, kk))
    vals = np.take_along_axis(p, part, 1)
    order = np.lexsort((part, -vals), axis=1) if n else np.zeros((0, k), np.int64)
    idx = np.take_along_axis(part, order, 1)
    top = p.argmax(1)  # a tie at the boundary may leave the first maximum out of the partition
    bad = idx[:, 0] != top
    if bad.any():
        for i in np.flatnonzero(bad):
            row = np.lexsort((np.arange(kk), -p[i]))[:k]
            idx[i] = row
    return idx.astype(np.int32), np.take_along_axis(p, idx, 1)


def to_topk(dense: np.ndarray, k: int, block: int | None = None) -> TopK:
    """A dense (..., N, K) array as a :class:`TopK`, ranked ``block`` rows at a time (default
    :func:`block_rows` of K: ranking needs about 3 more blocks' worth of scratch)."""
    dense = np.asarray(dense)
    lead, kk = dense.shape[:-1], dense.shape[-1]
    flat = dense.reshape(-1, kk)
    k = min(k, kk)
    block = block_rows(kk) if block is None else block
    out = TopK.empty(len(flat), k, kk)
    for s in range(0, len(flat), block):
        d = np.asarray(flat[s:s + block], np.float32)
        idx, p = _rank_block(d, k)
        p16 = p.astype(np.float16)
        out.idx[s:s + block], out.p[s:s + block] = idx, p16
        out.rest[s:s + block] = np.clip(1.0 - p16.astype(np.float64).sum(1), 0.0, None)
    return TopK(out.idx.reshape(*lead, k), out.p.reshape(*lead, k),
                out.rest.reshape(lead), kk)


def topk_of(probs: Probs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(idx (N, k') int32, p (N, k') float32)``, k' = min(k, stored k or K), most probable
    first, from either layout (a dense block is ranked in blocks of rows)."""
    if isinstance(probs, TopK):
        k = min(k, probs.k)
        return probs.idx[..., :k], probs.p[..., :k].astype(np.float32)
    t = to_topk(probs, k)
    return t.idx, t.p.astype(np.float32)


def take(probs: Probs, rows: np.ndarray) -> Probs:
    """Rows ``rows`` of either layout (a copy)."""
    return probs[rows] if isinstance(probs, TopK) else np.asarray(probs)[rows]


def dense_rows(probs: Probs, block: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, (n, K) float32 block)`` over the rows of either layout, ``block`` at a time."""
    for s in range(0, len(probs), block):
        b = probs[s:s + block]
        yield s, (b.dense() if isinstance(b, TopK) else np.asarray(b, np.float32))


def mean_topk(blocks: Sequence[TopK], k: int | None = None) -> TopK:
    """The mean of several top-k blocks of the same rows (folds, seeds), as top-k: every class
    kept by some block gets its exact mean (a block that did not keep it contributes its
    ``fill``); the k largest are kept (default: the blocks' k) and the rest is the remainder."""
    n, kk = len(blocks[0]), blocks[0].n_classes
    k = min(k or blocks[0].k, kk)
    m = len(blocks)
    fill = sum(b.fill().astype(np.float64) for b in blocks)  # (N,)
    # a kept entry's excess over its fill, summed over blocks (one COO -> CSR conversion sums
    # duplicates and keeps explicit zeros, so every kept class stays a stored entry)
    data = np.concatenate([(b.p.astype(np.float64) - b.fill()[:, None]).ravel() for b in blocks])
    rows = np.concatenate([np.repeat(np.arange(n), b.k) for b in blocks])
    cls = np.concatenate([b.idx.ravel() for b in blocks])
    total = sp.coo_matrix((data, (rows, cls)), shape=(n, kk)).tocsr()
    total.sum_duplicates()
    total.sort_indices()
    width = int(np.diff(total.indptr).max(initial=0))
    vals = np.full((n, max(width, k)), -np.inf)
    cols = np.zeros((n, max(width, k)), np.int64)
    counts = np.diff(total.indptr)
    pos = np.arange(total.nnz) - np.repeat(total.indptr[:-1], counts)
    rr = np.repeat(np.arange(n), counts)
    vals[rr, pos] = (total.data + fill[rr]) / m
    cols[rr, pos] = total.indices
    order = np.lexsort((cols, -vals), axis=1)[:, :k]
    idx = np.take_along_axis(cols, order, 1)
    vals = np.take_along_axis(vals, order, 1)
    for i in np.flatnonzero((vals == -np.inf).any(1)):  # fewer than k kept (not for k-blocks)
        gap = vals[i] == -np.inf
        spare = np.setdiff1d(np.arange(kk), idx[i, ~gap])[: int(gap.sum())]
        idx[i, gap], vals[i, gap] = spare, fill[i] / m
    p = vals.astype(np.float16)
    rest = np.clip(1.0 - p.astype(np.float64).sum(1), 0.0, None).astype(np.float32)
    return TopK(idx.astype(np.int32), p, rest, kk)


def save_topk(path: Path, t: TopK) -> None:
    """``idx`` int32, ``p`` float16, ``rest`` float32 and ``n_classes`` in one .npz."""
    np.savez(path, idx=t.idx.astype(np.int32), p=t.p.astype(np.float16),
             rest=t.rest.astype(np.float32), n_classes=np.int64(t.n_classes))


def load_topk(path: Path) -> TopK:
    with np.load(path, allow_pickle=False) as z:
        return TopK(z["idx"], z["p"], z["rest"], int(z["n_classes"]))
