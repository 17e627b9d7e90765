"""The candidate stacker: one LightGBM binary model over (item, candidate class) rows, so its cost
is O(N x k x runs) whatever the number of classes K (issue 15).

For each item the candidates are the union of the source runs' top ``depth`` classes. Each
(item, candidate) row gets, per source run, the run's probability of the candidate (its
``fill``, rest / (K - k), when the run did not keep it), its rank (k + 1 when not kept), its
log-odds and its margin to the run's best class (log p_best - log p); then how many runs rank
the candidate first and the class's frequency among the model's own training rows. A binary
LightGBM model scores whether the candidate is the item's class; an item's probabilities are
the softmax of its candidates' scores times the share of training items whose class was among
their candidates (the rest is the remaining mass). Outputs are top-k blocks
(:class:`fusion.probs.TopK`), never N x K.

Input ``X`` is :func:`fusion.stack.inputs.candidate_matrix`: per run its top-k class indices,
probabilities and rest. Cross-fitting, early stopping and the holdout schemes are those of
:mod:`fusion.stack.crossfit`, like every stacker. TreeSHAP of the predicted candidate's row,
summed over each run's four features, gives per-run attributions (plus ``shared``: the
first-rank count and the class frequency), for a seeded sample of at most ``explain_rows`` items
of each scored block. The rows are built and scored in blocks of items by
:mod:`fusion.stack.candidates`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...errors import StackError
from ...probs import TopK
from ..candidates import PER_RUN, SHARED, candidate_pairs, features, item_blocks, split_columns
from .base import Stacker, available_cpus, construct, register_stacker

__all__ = ["CandidateStacker", "PER_RUN", "SHARED"]


@register_stacker("candidate")
class CandidateStacker(Stacker):
    """LightGBM binary over (item, candidate) rows; ``depth`` (default 10) candidates per run."""

    attribution = True
    threads_param = "n_jobs"
    topk_input = True  # fed by candidate_matrix, not the per-class feature_matrix
    defaults: ClassVar[dict[str, Any]] = {
        "n_estimators": 300,
        "learning_rate": 0.15,
        "num_leaves": 15,
        "min_child_samples": 20,
        "subsample": 0.8,
        "subsample_freq": 1,
        "reg_lambda": 1.0,
        "n_jobs": available_cpus(),
        "deterministic": True,
        "force_row_wise": True,
        "max_bin": 63,
        "verbose": -1,
    }
    # 15 leaves, learning rate 0.15 and a patience of 10 rounds (were 31, 0.1 and 30): about
    # 100 shallow trees, cheaper to fit, score and explain; OOF accuracy old -> new: 0.8626 ->
    # 0.8626 at 150,000 x 5,600, 0.8375 -> 0.8388 at 50,000 x 5,600, 0.8817 -> 0.8825 at
    # 10,000 x 27, but 0.7451 -> 0.7376 at 10,000 x 5,600 (docs/stacking.md, "Speed")
    early_stopping_default: ClassVar[int] = 10
    depth_default: ClassVar[int] = 10
    # items whose candidate rows a model fits on (a seeded sample above it; every row is still
    # scored): caps the fit at O(max_fit_items x depth x runs), whatever N and K
    max_fit_items_default: ClassVar[int] = 20_000
    # items of each scored block (a fold, the holdout) explained by TreeSHAP, a seeded sample
    # above it: TreeSHAP of every row cost more than the fit (issue 15)
    explain_rows_default: ClassVar[int] = 1_000
    # opt-in cap on the candidate rows a model fits on: above it, every positive row and a
    # seeded sample of the negatives (candidate != the item's class), the early-stopping rows at
    # the same rate. Sampling negatives uniformly adds the same constant to every candidate's
    # log-odds, which the per-item softmax cancels. 150,000 halved the fit at 150,000 x 5,600
    # at the same accuracy but cost 0.006 OOF accuracy at 50,000 x 5,600: off by default
    max_fit_rows_default: ClassVar[int | None] = None

    def __init__(self, **kw: Any):
        params = dict(kw.pop("params", None) or {})
        self.depth = int(params.pop("depth", self.depth_default))
        self.max_fit_items = int(params.pop("max_fit_items", self.max_fit_items_default))
        self.explain_rows = int(params.pop("explain_rows", self.explain_rows_default))
        cap = params.pop("max_fit_rows", self.max_fit_rows_default)
        self.max_fit_rows = None if cap is None else int(cap)
        super().__init__(params=params, **kw)
        if self.depth < 1:
            raise StackError(f"candidate stacker: depth={self.depth} must be >= 1 (candidate "
                             "classes taken from each run's top; e.g. 10)")
        if self.max_fit_items < 1:
            raise StackError(f"candidate stacker: max_fit_items={self.max_fit_items} must be "
                             ">= 1 (items per model fit; e.g. 20000)")
        if self.explain_rows < 1:
            raise StackError(f"candidate stacker: explain_rows={self.explain_rows} must be >= 1 "
                             "(items explained by TreeSHAP per scored block; e.g. 1000, or "
                             "explain=false for none)")
        if self.max_fit_rows is not None and self.max_fit_rows < 1:
            raise StackError(f"candidate stacker: max_fit_rows={self.max_fit_rows} must be >= 1 "
                             "(candidate rows per model fit; e.g. 150000)")
        if self.n_sources is None:
            raise StackError("the candidate stacker needs n_sources (the number of source runs)")
        self.class_count = np.zeros(self.n_classes, np.int64)
        self.n_fit = 0
        self.covered = 1.0  # share of training items whose class was a candidate
        self.n_candidate_rows = 0  # rows of the last fit (the cost measure, tests)

    def procedure_params(self) -> dict[str, Any]:
        return {**super().procedure_params(), "depth": self.depth,
                "max_fit_items": self.max_fit_items, "explain_rows": self.explain_rows,
                "max_fit_rows": self.max_fit_rows}

    # -- the candidate rows (fusion.stack.candidates) -------------------------------------------
    @property
    def n_features(self) -> int:
        return len(PER_RUN) * self.n_sources + len(SHARED)

    def _class_freq(self) -> np.ndarray:
        """(K,) float32 class-frequency feature: log1p(10^4 x the class's share of fit rows)."""
        return np.log1p(self.class_count / max(1, self.n_fit) * 1e4).astype(np.float32)

    def candidates(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(item, class, features)`` of every candidate row of ``X``: item (M,) int64 row of X,
        class (M,) int64, features (M, 4 x runs + 2) float32. M <= N x depth x runs."""
        parts = [(b.start, *self._rows(X[b])) for b in item_blocks(len(X))]
        if not parts:
            return (np.zeros(0, np.int64), np.zeros(0, np.int64),
                    np.zeros((0, self.n_features), np.float32))
        return (np.concatenate([i + s for s, i, _, _ in parts]),
                np.concatenate([c for _, _, c, _ in parts]),
                np.concatenate([f for *_, f in parts]))

    def _rows(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tops = split_columns(X, self.n_sources)
        item, cls = candidate_pairs(tops, self.depth)
        return item, cls, features(tops, item, cls, self.n_classes, self._class_freq())

    def _predict(self, F: np.ndarray, **kw: Any) -> np.ndarray:
        """The booster on feature rows ``F``, with this stacker's thread count (LightGBM's
        predict would otherwise take OpenMP's default, every CPU)."""
        threads = self.params.get("n_jobs")
        if isinstance(threads, int) and threads > 0:
            kw["num_threads"] = threads
        return self.booster.predict(F, num_iteration=self.best_iteration, **kw)

    # -- fit / predict --------------------------------------------------------------------------
    def fit(self, X, y, X_valid=None, y_valid=None, *, rounds=None) -> CandidateStacker:
        import lightgbm as lgb  # heavy: imported when the stacker is fitted

        y = np.asarray(y, np.int64)
        self.class_count = np.bincount(y, minlength=self.n_classes)
        self.n_fit = len(y)
        self.present = np.flatnonzero(self.class_count)
        rng = np.random.default_rng(self.seed)
        if len(y) > self.max_fit_items:  # the class counts above still use every fit row
            keep = np.sort(rng.choice(len(y), self.max_fit_items, replace=False))
            X, y = X[keep], y[keep]
        if X_valid is not None and y_valid is not None and len(y_valid) > self.max_fit_items // 4:
            keep = np.sort(rng.choice(len(y_valid), self.max_fit_items // 4, replace=False))
            X_valid, y_valid = X_valid[keep], np.asarray(y_valid)[keep]
        item, target, F, self.n_candidate_rows, frac = self._fit_rows(X, y, rng)
        self.covered = float(np.bincount(item, weights=target, minlength=len(y)).clip(0, 1).mean())
        if target.min(initial=1) == target.max(initial=0):
            raise StackError("candidate stacker: every candidate row has the same target (no "
                             "item's class, or only its class, is among its candidates); the "
                             "sources are unusable or depth is too small")
        params = {**self.params, "objective": "binary", "random_state": self.seed}
        if rounds is not None:
            params["n_estimators"] = int(rounds)
        model = construct(lgb.LGBMClassifier, params, self.name)
        fit_kw: dict[str, Any] = {}
        if X_valid is not None and y_valid is not None and len(y_valid):
            _, vt, vF, _, _ = self._fit_rows(X_valid, np.asarray(y_valid, np.int64), rng, frac)
            if "eval_X" in inspect.signature(model.fit).parameters:  # lightgbm >= 4.7
                fit_kw.update(eval_X=(vF,), eval_y=(vt,))
            else:  # pragma: no cover - older lightgbm
                fit_kw["eval_set"] = [(vF, vt)]
            fit_kw["callbacks"] = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        model.fit(F, target, **fit_kw)
        self.booster = model.booster_
        best = int(model.best_iteration_ or 0)
        self.best_iteration = best if best > 0 else self.booster.current_iteration()
        return self

    def _fit_rows(self, X: np.ndarray, y: np.ndarray, rng: np.random.Generator,
                  frac: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
        """``(item, target, features, candidate rows, frac)`` of the rows a model fits on:
        every positive candidate row and a seeded share ``frac`` of the negative ones (by
        default what brings the rows down to ``max_fit_rows``, 1.0 below it); the fourth is the
        number of candidate rows before that sample."""
        item, cls, F = self.candidates(X)
        target = (cls == y[item]).astype(np.float32)
        n_rows, n_pos = len(item), int(target.sum())
        if frac is None:
            frac = (1.0 if self.max_fit_rows is None or n_rows <= self.max_fit_rows else
                    max(self.max_fit_rows - n_pos, 1) / max(n_rows - n_pos, 1))
        if frac < 1.0:
            keep = np.flatnonzero((target == 1) | (rng.random(n_rows) < frac))
            item, target, F = item[keep], target[keep], np.asfortranarray(F[keep])
        return item, target, F, n_rows, frac

    def scores(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(item, class, raw score, features)`` of every candidate row of ``X``."""
        item, cls, F = self.candidates(X)
        raw = self._predict(F, raw_score=True) if len(F) else np.zeros(0)
        return item, cls, raw, F

    def predict_proba(self, X: np.ndarray) -> TopK:
        """Top-k probabilities (k = depth), the candidates' softmax times the covered share;
        built and scored :data:`~fusion.stack.candidates.BLOCK_ITEMS` items at a time."""
        n, k = len(X), min(self.depth, split_columns(X[:0], self.n_sources).k)
        out = TopK.empty(n, k, self.n_classes)
        for b in item_blocks(n):
            item, cls, F = self._rows(X[b])
            raw = self._predict(F, raw_score=True) if len(F) else np.zeros(0)
            out.idx[b], out.p[b], out.rest[b] = self._top(b.stop - b.start, k, item, cls, raw)
        return out

    def _top(self, n: int, k: int, item: np.ndarray, cls: np.ndarray, raw: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(idx, p, rest)`` of n items' top k from their candidate rows' raw scores."""
        counts = np.bincount(item, minlength=n)
        width = int(counts.max(initial=k))
        pos = np.arange(len(item)) - np.repeat(np.cumsum(counts) - counts, counts)
        S = np.full((n, width), -np.inf)
        C = np.zeros((n, width), np.int64)
        S[item, pos], C[item, pos] = raw, cls
        S -= S.max(1, keepdims=True)
        P = np.exp(S)
        P *= self.covered / P.sum(1, keepdims=True)
        order = np.lexsort((C, -P), axis=1)[:, :k]
        p = np.take_along_axis(P, order, 1).astype(np.float16)
        rest = np.clip(1.0 - p.astype(np.float64).sum(1), 0.0, None).astype(np.float32)
        return np.take_along_axis(C, order, 1).astype(np.int32), p, rest

    def contributions(self, X: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(N, F + 1) TreeSHAP contributions to the score of class ``classes[i]`` for item i
        (F = 4 x runs + 2 candidate features; the last column is the bias); rows sum to the
        model's raw score of that (item, class) row. TreeSHAP costs far more than scoring, so
        above ``explain_rows`` items only a seeded sample of that many is explained (the same
        rows for every model of a stack, which share the seed); the other rows are NaN."""
        classes = np.asarray(classes, np.int64)
        out = np.full((len(X), self.n_features + 1), np.nan)
        rows = np.arange(len(X))
        if len(X) > self.explain_rows:
            rng = np.random.default_rng(self.seed)
            rows = np.sort(rng.choice(len(X), self.explain_rows, replace=False))
        for b in item_blocks(len(rows)):
            r = rows[b]
            tops = split_columns(X[r], self.n_sources)
            F = features(tops, np.arange(len(r)), classes[r], self.n_classes, self._class_freq())
            out[r] = self._predict(F, pred_contrib=True)
        return out

    def group_matrix(self) -> np.ndarray:
        """(F + 1, runs + 2) 0/1 matrix summing contributions into [runs..., shared, bias]."""
        r, per = self.n_sources, len(PER_RUN)
        g = np.zeros((self.n_features + 1, r + 2))
        for j in range(r):
            g[j * per:(j + 1) * per, j] = 1.0  # features are ordered run by run
        g[per * r:per * r + len(SHARED), r] = 1.0
        g[-1, -1] = 1.0
        return g

    def feature_names(self, runs: list[str]) -> list[str]:
        return [f"{n}:{f}" for n in runs for f in PER_RUN] + list(SHARED)

    # -- persistence ----------------------------------------------------------------------------
    def save_model(self, path_stem: Path) -> Path:
        path = path_stem.with_suffix(".lgb.txt")
        self.booster.save_model(str(path), num_iteration=self.best_iteration)
        np.savez(path_stem.with_suffix(".candidate.npz"), class_count=self.class_count,
                 n_fit=np.int64(self.n_fit), covered=np.float64(self.covered),
                 depth=np.int64(self.depth))
        return path

    def load_local(self, path_stem: Path) -> None:
        import lightgbm as lgb

        self.booster = lgb.Booster(model_file=str(path_stem.with_suffix(".lgb.txt")))
        with np.load(path_stem.with_suffix(".candidate.npz")) as z:
            self.class_count, self.n_fit = z["class_count"], int(z["n_fit"])
            self.covered, self.depth = float(z["covered"]), int(z["depth"])
