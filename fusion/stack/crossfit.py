"""The cross-fitting loop: the only place where a stacker is fitted and where rows are scored.

For each fold f the stacker is fitted on the other folds' rows (early-stopping on a stratified
``valid_fraction`` of *those* rows, never of the scored ones) and scores fold f; the fold models'
predictions are the stack's out-of-fold probabilities. The holdout is scored in one of two
schemes (recorded as ``holdout_scheme``):

- ``"per_fold"`` (every source run has ``holdout_folds``): fold model f scores the holdout from
  the source runs' fold-f models (``X_ho_folds[f]``), the same kind of input it was fitted on
  (each OOF row also comes from one fold model), and the k outputs are averaged. No refit.
- ``"refit"`` (older runs): a refit on every trainable row, for the median best round count of
  the fold models, scores the fold-averaged holdout probabilities.

The store rows of every split are returned as ``cv`` (written to ``cv_indices.npz``).

A stacker whose ``predict_proba`` returns top-k blocks (:class:`fusion.probs.TopK`, the
candidate stacker) gets top-k ``oof`` / ``hold``: the per-fold holdout mean is then
:func:`fusion.probs.mean_topk`, so no N x K array is built.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import classification_metrics
from ..probs import Probs, TopK, mean_topk
from .stackers import Stacker

__all__ = ["CrossFit", "cross_fit", "explain", "inner_split"]


def inner_split(
    idx: np.ndarray, y: np.ndarray, frac: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified early-stopping split of the TRAINING rows ``idx`` (never the scored rows):
    ``(fit, valid)``, both sorted subsets of ``idx``. Only ``y[idx]`` is read."""
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit  # slow import

    dummy = np.zeros(len(idx))
    try:
        fit, val = next(
            StratifiedShuffleSplit(1, test_size=frac, random_state=seed).split(dummy, y[idx])
        )
    except ValueError:  # a class with a single row, or fewer valid rows than classes
        fit, val = next(ShuffleSplit(1, test_size=frac, random_state=seed).split(dummy))
    return np.sort(idx[fit]), np.sort(idx[val])


@dataclass
class CrossFit:
    """What the loop produced; rows of ``oof`` follow ``trainable``, rows of ``hold`` follow
    ``holdout`` (the store rows passed to :func:`cross_fit`)."""

    oof: Probs  # (N_trainable, K) out-of-fold probabilities (dense, or TopK)
    hold: Probs  # (N_holdout, K) holdout probabilities
    contrib: np.ndarray | None  # (N_trainable + N_holdout, G) grouped TreeSHAP, or None
    cv: dict[str, np.ndarray]  # store rows of fold{f}_fit/_valid/_scored, refit_fit/_scored
    folds: list[dict[str, Any]]  # per fold: sizes, scores, best_iteration, seconds
    models: list[tuple[str, Stacker]]  # ("fold0", model), ..., (+ ("refit", model))
    rounds: int  # rounds / epochs / iterations the refit trained (per_fold: median of the folds)
    refit_seconds: float  # 0 for per_fold
    train_seconds: float  # all fits, folds and refit
    holdout_scheme: str = "refit"  # "per_fold" or "refit"
    # per_fold: each fold model's holdout probabilities (their mean is ``hold``); a blend of
    # stackers (fusion.stack.blend) weighs them fold by fold
    hold_folds: list[Probs] | None = None


def cross_fit(
    new_model: Callable[[], Stacker],
    X: np.ndarray,
    y: np.ndarray,
    X_ho: np.ndarray,
    fold_of: np.ndarray,
    *,
    n_folds: int,
    trainable: np.ndarray,
    holdout: np.ndarray,
    seed: int,
    group: np.ndarray | None = None,
    say: Callable[[str], None] = lambda _msg: None,
    X_ho_folds: np.ndarray | None = None,
) -> CrossFit:
    """Fit one model per fold on the other folds and score the fold; refit and score ``X_ho``.

    ``X`` (N_trainable, F), ``y`` and ``fold_of`` describe the trainable rows (store rows
    ``trainable``), ``X_ho`` the holdout rows (store rows ``holdout``). With ``group`` (F + 1, G)
    the per-row TreeSHAP contributions to the predicted class are summed into G groups.
    ``X_ho_folds`` (n_folds, N_holdout, F): each fold model's input for the holdout; given, the
    holdout is the mean of fold model f applied to ``X_ho_folds[f]`` (scheme ``per_fold``),
    and holdout contributions are the mean of the fold models' (they sum to the mean margin).
    """
    probe = new_model()
    k, uses_early_stopping = probe.n_classes, probe.uses_early_stopping
    oof: Probs | None = None  # allocated at the first fold, in the stacker's output layout
    cv: dict[str, np.ndarray] = {}
    folds: list[dict[str, Any]] = []
    models: list[tuple[str, Stacker]] = []
    train_seconds = 0.0
    per_fold = X_ho_folds is not None and len(X_ho) > 0
    hold_parts: list[Probs] = []  # per_fold: each fold model's holdout probabilities
    for f in range(n_folds):
        scored = np.flatnonzero(fold_of == f)
        if len(scored) == 0:
            continue
        train = np.flatnonzero(fold_of != f)
        t0 = time.perf_counter()
        model = new_model()
        if uses_early_stopping:
            fit, valid = inner_split(train, y, model.valid_fraction, seed + f)
            model.fit(X[fit], y[fit], X[valid], y[valid])
        else:
            fit, valid = train, train[:0]
            model.fit(X[fit], y[fit])
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        probs = model.predict_proba(X[scored])
        if oof is None:
            oof = (TopK.empty(len(y), probs.k, k) if isinstance(probs, TopK)
                   else np.zeros((len(y), k)))
        oof[scored] = probs
        cv[f"fold{f}_fit"] = trainable[fit]
        cv[f"fold{f}_valid"] = trainable[valid]
        cv[f"fold{f}_scored"] = trainable[scored]
        s = classification_metrics(y[scored], probs)
        folds.append({
            "fold": f,
            "n_fit": len(fit),
            "n_valid": len(valid),
            "n_scored": len(scored),
            "accuracy": s["accuracy"],
            "macro_f1": s["macro_f1"],
            "best_iteration": model.best_iteration,
            "seconds": round(seconds, 4),
        })
        models.append((f"fold{f}", model))
        if per_fold:
            hold_parts.append(model.predict_proba(X_ho_folds[f]))
        say(
            f"fold {f + 1}/{n_folds}: fit {len(fit)} rows (+{len(valid)} early-stopping), "
            f"scored {len(scored)}, macro-F1 {s['macro_f1']:.4f} ({seconds:.1f} s)"
        )

    if per_fold:
        out = _per_fold_result(oof, hold_parts, cv, folds, models, holdout, train_seconds,
                               uses_early_stopping, say)
        if group is not None:
            out.contrib = explain(out, X, X_ho, fold_of, group, X_ho_folds)
        return out
    # Refit on every trainable row for the median best round count of the fold models.
    rounds = None
    if uses_early_stopping:
        rounds = max(1, int(round(statistics.median(m["best_iteration"] for m in folds))))
    t0 = time.perf_counter()
    final = new_model().fit(X, y, rounds=rounds)
    seconds = time.perf_counter() - t0
    train_seconds += seconds
    hold = final.predict_proba(X_ho) if len(X_ho) else np.zeros((0, k))
    cv["refit_fit"] = trainable.copy()
    cv["refit_scored"] = holdout.copy()
    models.append(("refit", final))
    say(
        f"refit on {len(y)} rows for {rounds or final.best_iteration} rounds, scored "
        f"{len(X_ho)} holdout rows ({seconds:.1f} s)"
    )
    out = CrossFit(oof=oof, hold=hold, contrib=None, cv=cv, folds=folds, models=models,
                   rounds=rounds or final.best_iteration, refit_seconds=seconds,
                   train_seconds=train_seconds)
    if group is not None:
        out.contrib = explain(out, X, X_ho, fold_of, group)
    return out


def explain(fit: CrossFit, X: np.ndarray, X_ho: np.ndarray, fold_of: np.ndarray,
            group: np.ndarray, X_ho_folds: np.ndarray | None = None) -> np.ndarray:
    """(N_trainable + N_holdout, G) grouped TreeSHAP contributions to the predicted class of
    every row, from ``fit``'s own models (the inputs of :func:`cross_fit`): each OOF row by the
    fold model that scored it; the holdout by the refit, or (scheme ``per_fold``) as the mean
    of the fold models' contributions, each on its own fold's inputs ``X_ho_folds[f]``, for the
    class the averaged prediction picks (they sum to the fold models' mean margin). Called
    after the fit, so `auto` explains only the stacker it keeps."""
    contrib_oof = np.zeros((len(fold_of), group.shape[1]))
    fold_models = [(int(tag[4:]), m) for tag, m in fit.models if tag.startswith("fold")]
    for f, model in fold_models:
        scored = np.flatnonzero(fold_of == f)
        contrib_oof[scored] = model.contributions(X[scored], fit.oof[scored].argmax(1)) @ group
    if len(X_ho) == 0:
        return np.vstack([contrib_oof, np.zeros((0, group.shape[1]))])
    pred = fit.hold.argmax(1)
    if fit.holdout_scheme == "per_fold":
        contrib_ho = sum(m.contributions(X_ho_folds[f], pred) @ group
                         for f, m in fold_models) / len(fold_models)
    else:
        final = dict(fit.models)["refit"]
        contrib_ho = final.contributions(X_ho, pred) @ group
    return np.vstack([contrib_oof, contrib_ho])


def _per_fold_result(oof, hold_parts, cv, folds, models, holdout, train_seconds,
                     uses_early_stopping, say) -> CrossFit:
    """Scheme ``per_fold``: the holdout is the mean of the fold models' outputs, each on its own
    fold's holdout inputs."""
    hold = (mean_topk(hold_parts) if isinstance(hold_parts[0], TopK)
            else sum(hold_parts) / len(models))
    cv["holdout_scored"] = holdout.copy()  # by every fold model, each on its own inputs
    rounds = (max(1, int(round(statistics.median(m["best_iteration"] for m in folds))))
              if uses_early_stopping else int(folds[0]["best_iteration"] or 1))
    say(f"holdout: mean of the {len(models)} fold models, each on its fold's holdout "
        f"probabilities ({len(hold)} rows)")
    return CrossFit(oof=oof, hold=hold, contrib=None, cv=cv, folds=folds, models=models,
                    rounds=rounds, refit_seconds=0.0, train_seconds=train_seconds,
                    holdout_scheme="per_fold", hold_folds=hold_parts)
