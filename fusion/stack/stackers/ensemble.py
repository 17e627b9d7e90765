"""Greedy ensemble selection with replacement (Caruana et al. 2004; AutoGluon's
``WeightedEnsemble``): a weighted average of the source runs' probabilities.

Starting from an empty ensemble, each step adds (again, if it is already in) the source run whose
addition gives the lowest log-loss on the training rows; after ``ensemble_size`` steps the best
prefix is kept, and the weights are how often each run was added. The first step picks the best
single run, so on the rows it is fitted on the ensemble is never worse than its best source (the
floor the tests check out of fold); a near-noise run is added only if it lowers the loss.
Pooled columns, if any, are ignored: the ensemble only weighs runs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ...errors import StackError
from .base import Stacker, register_stacker

__all__ = ["EnsembleStacker", "greedy_selection"]

_EPS = 1e-12


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], _EPS, None)).mean())


def greedy_selection(blocks: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, list[float]]:
    """Caruana's selection with replacement over ``blocks`` (M, N, C) probabilities for labels
    ``y``: ``(weights (M,) summing to 1, the log-loss after each step)``; the weights are those of
    the best prefix (the first one reaching the lowest loss)."""
    m = len(blocks)
    total = np.zeros(blocks.shape[1:])
    counts = np.zeros((size, m))
    losses: list[float] = []
    for t in range(size):
        cand = [_log_loss((total + blocks[j]) / (t + 1), y) for j in range(m)]
        j = int(np.argmin(cand))  # ties: the earlier run
        total += blocks[j]
        counts[t] = (counts[t - 1] if t else 0) + np.eye(m)[j]
        losses.append(cand[j])
    best = int(np.argmin(losses))
    return counts[best] / counts[best].sum(), losses


@register_stacker("ensemble")
class EnsembleStacker(Stacker):
    """Weighted average of the runs' probabilities, weights by greedy selection with replacement
    on log-loss (``ensemble_size`` steps, default 25 as AutoGluon's). No inner split: the
    selection sees every training row of the fold."""

    uses_early_stopping = False
    defaults: ClassVar[dict[str, Any]] = {"ensemble_size": 25}

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.require_known_params()
        if int(self.params["ensemble_size"]) < 1:
            raise StackError(f"ensemble_size={self.params['ensemble_size']} must be >= 1; "
                             "25 is AutoGluon's default")

    def blocks(self, X: np.ndarray) -> np.ndarray:
        """(M, N, C) probabilities of the M runs over the present classes, rows renormalised."""
        p = self.run_columns(X).transpose(1, 0, 2)
        if self.log_probs:
            p = np.exp(p)
        p = p[:, :, self.present]
        return p / np.clip(p.sum(2, keepdims=True), _EPS, None)

    def fit_local(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
        self.weights, self.losses = greedy_selection(self.blocks(X), y,
                                                     int(self.params["ensemble_size"]))
        self.best_iteration = int(np.argmin(self.losses)) + 1

    def proba_local(self, X):
        return np.tensordot(self.weights, self.blocks(X), axes=1)

    def margin_local(self, X):
        return np.log(np.clip(self.proba_local(X), _EPS, None))

    def save_model(self, path_stem):
        path = path_stem.with_suffix(".npz")
        np.savez(path, weights=self.weights, losses=np.asarray(self.losses), classes=self.present)
        return path

    def load_local(self, path_stem):
        with np.load(path_stem.with_suffix(".npz")) as z:
            self.weights, self.losses = z["weights"], z["losses"].tolist()
