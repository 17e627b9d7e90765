"""Regularisation chosen by inner validation for the GBDT stackers (issue 17): ``-p tune=true``.

Each fitted model (every fold model, and the refit) tries the few parameter sets of
:data:`GRIDS` for its stacker, each early-stopped on the inner split of **its own training
rows** (the split the stacker early-stops on anyway; the rows it scores are never seen), and
keeps the one with the lowest inner-split log-loss at its best round. The candidates are
ordered from the stacker's defaults to stronger regularisation; a tie keeps the earlier one.
The refit of the ``refit`` holdout scheme has no inner split of its own: it draws one
(stratified, ``valid_fraction`` of its rows, ``seed``), chooses there, then trains every row
for the chosen candidate's best round count.

Cost: ``len(grid)`` early-stopped fits per model instead of one; the stronger candidates are
smaller trees, so about 2-3x one default fit. What each model tried and chose is its
``tuning`` (written to the stack run's ``config.json["tuning"]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["GRIDS", "tuned_fit"]

GRIDS: dict[str, tuple[dict[str, Any], ...]] = {
    "lightgbm": (
        {},  # the defaults: num_leaves 15, min_child_samples 20, reg_lambda 1
        {"num_leaves": 7, "min_child_samples": 40, "reg_lambda": 5.0},
        {"num_leaves": 4, "min_child_samples": 80, "reg_lambda": 20.0},
    ),
    "xgboost": (
        {},  # the defaults: max_depth 4, min_child_weight 1, reg_lambda 1
        {"max_depth": 3, "min_child_weight": 5.0, "reg_lambda": 5.0},
        {"max_depth": 2, "min_child_weight": 10.0, "reg_lambda": 20.0},
    ),
}


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def stratified_split(y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, valid)`` positions of ``y``: about ``frac`` of each class with 2+ rows in valid."""
    rng = np.random.default_rng(seed)
    valid = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) >= 2:
            valid.extend(rng.choice(rows, max(1, int(round(frac * len(rows)))), replace=False))
    is_valid = np.zeros(len(y), dtype=bool)
    is_valid[np.asarray(valid, dtype=np.int64)] = True
    return np.flatnonzero(~is_valid), np.flatnonzero(is_valid)


def tuned_fit(model: Any, X: np.ndarray, y: np.ndarray, X_valid: np.ndarray | None,
              y_valid: np.ndarray | None, n_classes: int, rounds: int | None) -> None:
    """``model.fit_local`` once per candidate of ``GRIDS[model.name]`` on ``(X, y)``,
    early-stopped on ``(X_valid, y_valid)``; ``model`` is left as the candidate with the lowest
    validation log-loss, and ``model.tuning`` says what was tried. Without validation rows (the
    refit) an inner split of ``(X, y)`` chooses, then every row is fitted for the chosen
    candidate's best round count (``rounds`` is ignored: it came from other candidates)."""
    grid = GRIDS[model.name]
    base = dict(model.params)
    refit = X_valid is None or y_valid is None or len(y_valid) == 0
    if refit:
        fit, valid = stratified_split(y, model.valid_fraction, model.seed)
        Xf, yf, Xv, yv = X[fit], y[fit], X[valid], y[valid]
    else:
        Xf, yf, Xv, yv = X, y, X_valid, y_valid
    trials: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, Any]] | None = None
    for i, cand in enumerate(grid):
        model.params = {**base, **cand}
        model.fit_local(Xf, yf, Xv, yv, n_classes, None)
        loss = _log_loss(model.proba_local(Xv), yv)
        trials.append({"params": cand, "valid_log_loss": round(loss, 5),
                       "best_iteration": model.best_iteration})
        if best is None or loss < best[0] - 1e-9:
            best = (loss, i, dict(model.__dict__))
    assert best is not None  # every grid has at least the defaults
    _, chosen, state = best
    model.__dict__.update(state)  # the chosen candidate's fitted model and params
    if refit:
        model.fit_local(X, y, None, None, n_classes, trials[chosen]["best_iteration"])
    model.tuning = {"by": "log-loss on the inner split of the model's own training rows",
                    "valid_rows": len(yv), "trials": trials, "chosen": chosen,
                    "params": grid[chosen]}
