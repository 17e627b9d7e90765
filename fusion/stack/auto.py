"""The default stacker, ``auto``: which candidates it cross-fits and how it records its choice
(the one place this rule lives; :func:`fusion.stack.procedure.stack` runs it)."""

from __future__ import annotations

from typing import Any

__all__ = ["AUTO", "AUTO_CANDIDATES", "AUTO_GBDT", "AUTO_GBDT_MAX_WORK", "AUTO_MAX_PER_CLASS_K",
           "AUTO_PARAMS", "AUTO_TOLERANCE", "DEFAULT_STACKER", "LARGE_K_STACKER",
           "auto_candidates", "by_k", "candidate_rule", "selection_record"]

AUTO = "auto"  # choose the stacker by the candidates' out-of-fold macro-F1
DEFAULT_STACKER = AUTO
# fastest first; ties: the earlier. After them `auto` also weighs a blend of them (.blend).
AUTO_CANDIDATES = ("ensemble", "loglinear", "logreg", "mlp", "lightgbm")
AUTO_TOLERANCE = 0.001  # a later candidate must beat the chosen one's OOF macro-F1 by more
# the GBDT candidate's work per boosting round grows as K trees over runs x K columns: `auto`
# leaves it out above this many trainable rows x runs x K^2 (issue 15: 10,000 items x 5 runs x
# 27 classes, 29M, cost 125-170 s of LightGBM under load; the demo catalogs, 1,600 x 5 x 24^2 =
# 4.6M, keep it)
AUTO_GBDT_MAX_WORK = 10_000_000
AUTO_GBDT = "lightgbm"
# what `auto` changes in a candidate's defaults (none today; tests shorten the fits here)
AUTO_PARAMS: dict[str, dict[str, Any]] = {}
# above this many classes `auto` picks the candidate stacker alone: the per-class stackers grow
# with K (K trees per round over runs x K columns; LightGBM did not finish 10,000 x 4 runs at
# K=200 in 600 s), the candidate stacker's cost is O(N x k x runs) (issue 15)
AUTO_MAX_PER_CLASS_K = 64
LARGE_K_STACKER = "candidate"


def auto_candidates(k: int, n_rows: int = 0, n_runs: int = 1) -> tuple[str, ...]:
    """What ``auto`` cross-fits at ``k`` classes over ``n_rows`` trainable rows of ``n_runs``
    runs: :data:`AUTO_CANDIDATES` up to :data:`AUTO_MAX_PER_CLASS_K` classes, less the GBDT
    above :data:`AUTO_GBDT_MAX_WORK` (rows x runs x K^2); else the candidate stacker alone."""
    if k > AUTO_MAX_PER_CLASS_K:
        return (LARGE_K_STACKER,)
    if n_rows * n_runs * k * k > AUTO_GBDT_MAX_WORK:
        return tuple(c for c in AUTO_CANDIDATES if c != AUTO_GBDT)
    return AUTO_CANDIDATES


def candidate_rule(k: int, n_rows: int, n_runs: int) -> dict[str, Any]:
    """Why ``auto`` tried the candidates it tried (config/metrics ``selection``)."""
    work = n_rows * n_runs * k * k
    kept = work <= AUTO_GBDT_MAX_WORK
    return {"gbdt_work": work, "gbdt_max_work": AUTO_GBDT_MAX_WORK,
            "why": f"{n_rows} rows x {n_runs} runs x K^2 = {work:,} "
                   f"{'<=' if kept else '>'} {AUTO_GBDT_MAX_WORK:,}: {AUTO_GBDT} "
                   f"{'is' if kept else 'is not'} a candidate (its cost per boosting round is "
                   "K trees over runs x K columns)"}


def by_k(tried: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """config/metrics ``selection`` when ``auto`` picked by the number of classes."""
    return {"by": "number of classes", "max_per_class_k": AUTO_MAX_PER_CLASS_K,
            "candidates": tried, "chosen": LARGE_K_STACKER,
            "why": f"K={k} > {AUTO_MAX_PER_CLASS_K}: the per-class stackers grow with K "
                   f"(K trees per round over runs x K columns); {LARGE_K_STACKER!r} scores "
                   "(item, candidate class) rows, O(N x k x runs) whatever K"}


def selection_record(tried: list[dict[str, Any]], chosen: str) -> dict[str, Any]:
    """config/metrics ``selection`` of an auto stack: every candidate's score and the reason."""
    top = max(tried, key=lambda t: t["oof_macro_f1"])
    mine = next(t for t in tried if t["stacker"] == chosen)
    why = (f"highest out-of-fold macro-F1 ({mine['oof_macro_f1']:.4f})" if top is mine else
           f"out-of-fold macro-F1 {mine['oof_macro_f1']:.4f} within {AUTO_TOLERANCE} of "
           f"{top['stacker']}'s {top['oof_macro_f1']:.4f}; the faster candidate wins ties")
    return {"by": "out-of-fold macro-F1 of each candidate's cross-fit (holdout unused)",
            "tolerance": AUTO_TOLERANCE, "candidates": tried, "chosen": chosen, "why": why}
