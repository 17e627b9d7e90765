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
first-rank count and the class frequency).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...errors import StackError
from ...probs import TopK
from .base import Stacker, available_cpus, construct, register_stacker

__all__ = ["CandidateStacker", "PER_RUN", "SHARED"]

PER_RUN = ("p", "rank", "logodds", "margin")  # features per source run and candidate
SHARED = ("n_first", "class_freq")  # features shared by the runs
_EPS = 1e-7
_BLOCK = 8192  # items whose candidate rows are built at a time


@register_stacker("candidate")
class CandidateStacker(Stacker):
    """LightGBM binary over (item, candidate) rows; ``depth`` (default 10) candidates per run."""

    attribution = True
    threads_param = "n_jobs"
    topk_input = True  # fed by candidate_matrix, not the per-class feature_matrix
    defaults: ClassVar[dict[str, Any]] = {
        "n_estimators": 300,
        "learning_rate": 0.1,
        "num_leaves": 31,
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
    depth_default: ClassVar[int] = 10
    # items whose candidate rows a model fits on (a seeded sample above it; every row is still
    # scored): caps the fit at O(max_fit_items x depth x runs), whatever N and K
    max_fit_items_default: ClassVar[int] = 20_000

    def __init__(self, **kw: Any):
        params = dict(kw.pop("params", None) or {})
        self.depth = int(params.pop("depth", self.depth_default))
        self.max_fit_items = int(params.pop("max_fit_items", self.max_fit_items_default))
        super().__init__(params=params, **kw)
        if self.depth < 1:
            raise StackError(f"candidate stacker: depth={self.depth} must be >= 1 (candidate "
                             "classes taken from each run's top; e.g. 10)")
        if self.max_fit_items < 1:
            raise StackError(f"candidate stacker: max_fit_items={self.max_fit_items} must be "
                             ">= 1 (items per model fit; e.g. 20000)")
        if self.n_sources is None:
            raise StackError("the candidate stacker needs n_sources (the number of source runs)")
        self.class_count = np.zeros(self.n_classes, np.int64)
        self.n_fit = 0
        self.covered = 1.0  # share of training items whose class was a candidate
        self.n_candidate_rows = 0  # rows of the last fit (the cost measure, tests)

    def procedure_params(self) -> dict[str, Any]:
        return {**super().procedure_params(), "depth": self.depth,
                "max_fit_items": self.max_fit_items}

    # -- the candidate rows ---------------------------------------------------------------------
    def _split(self, X: np.ndarray) -> tuple[int, list[tuple[np.ndarray, ...]]]:
        r = self.n_sources
        width = X.shape[1] // r
        k = (width - 1) // 2
        if X.shape[1] != r * (2 * k + 1) or k < 1:
            raise StackError(f"candidate stacker: {X.shape[1]} input columns are not "
                             f"{r} runs x (2k + 1); build them with candidate_matrix")
        runs = []
        for j in range(r):
            b = X[:, j * width:(j + 1) * width]
            runs.append((b[:, :k].astype(np.int64), b[:, k:2 * k], b[:, 2 * k]))
        return k, runs

    def candidates(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(item, class, features)`` of every candidate row of ``X``: item (M,) int64 row of X,
        class (M,) int64, features (M, 4 x runs + 2) float32. M <= N x depth x runs."""
        items, classes, feats = [], [], []
        for s in range(0, len(X), _BLOCK):
            i, c, f = self._block(X[s:s + _BLOCK])
            items.append(i + s)
            classes.append(c)
            feats.append(f)
        if not items:
            return (np.zeros(0, np.int64), np.zeros(0, np.int64),
                    np.zeros((0, self.n_features), np.float32))
        return np.concatenate(items), np.concatenate(classes), np.concatenate(feats)

    @property
    def n_features(self) -> int:
        return len(PER_RUN) * self.n_sources + len(SHARED)

    def _block(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k, runs = self._split(X)
        d = min(self.depth, k)
        cand = np.sort(np.hstack([idx[:, :d] for idx, _, _ in runs]), axis=1)  # (n, R*d)
        keep = np.ones(cand.shape, bool)
        keep[:, 1:] = cand[:, 1:] != cand[:, :-1]
        feats = self._features(k, runs, cand)
        item = np.broadcast_to(np.arange(len(X))[:, None], cand.shape)
        return item[keep], cand[keep], feats[keep]

    def _features(self, k: int, runs: list[tuple[np.ndarray, ...]], cand: np.ndarray
                  ) -> np.ndarray:
        """(n, C, F) float32 features of classes ``cand`` (n, C) of each item (any class: one
        a run did not keep gets its fill and rank k + 1)."""
        cols = []
        first = np.zeros(cand.shape, np.float32)
        for idx, p, rest in runs:
            eq = cand[:, :, None] == idx[:, None, :]  # (n, C, k)
            found = eq.any(2)
            pos = eq.argmax(2)
            fill = (rest / max(1, self.n_classes - k))[:, None]
            pc = np.where(found, np.take_along_axis(p, pos, 1), fill).astype(np.float32)
            pc = np.clip(pc, _EPS, 1.0 - _EPS)
            rank = np.where(found, pos + 1, k + 1).astype(np.float32)
            best = np.clip(p[:, :1], _EPS, 1.0)
            cols += [pc, rank, np.log(pc / (1.0 - pc)), np.log(best) - np.log(pc)]
            first += rank == 1
        freq = np.log1p(self.class_count[cand] / max(1, self.n_fit) * 1e4).astype(np.float32)
        return np.stack([*cols, first, freq], axis=2).astype(np.float32)  # (n, C, F)

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
        item, cls, F = self.candidates(X)
        target = (cls == y[item]).astype(np.float32)
        self.covered = float(np.bincount(item, weights=target, minlength=len(y)).clip(0, 1).mean())
        self.n_candidate_rows = len(item)
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
            vi, vc, vF = self.candidates(X_valid)
            vt = (vc == np.asarray(y_valid, np.int64)[vi]).astype(np.float32)
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

    def scores(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(item, class, raw score, features)`` of every candidate row of ``X``."""
        item, cls, F = self.candidates(X)
        raw = (self.booster.predict(F, raw_score=True, num_iteration=self.best_iteration)
               if len(F) else np.zeros(0))
        return item, cls, raw, F

    def predict_proba(self, X: np.ndarray) -> TopK:
        """Top-k probabilities (k = depth), the candidates' softmax times the covered share."""
        n, k = len(X), min(self.depth, self._split(X[:0])[0])
        if n == 0:
            return TopK.empty(0, k, self.n_classes)
        item, cls, raw, _ = self.scores(X)
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
        return TopK(np.take_along_axis(C, order, 1).astype(np.int32), p, rest, self.n_classes)

    def contributions(self, X: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(N, F + 1) TreeSHAP contributions to the score of class ``classes[i]`` for item i
        (F = 4 x runs + 2 candidate features; the last column is the bias); rows sum to the
        model's raw score of that (item, class) row."""
        classes = np.asarray(classes, np.int64)
        out = np.empty((len(X), self.n_features + 1))
        for s in range(0, len(X), _BLOCK):
            k, runs = self._split(X[s:s + _BLOCK])
            F = self._features(k, runs, classes[s:s + _BLOCK, None])[:, 0]
            out[s:s + len(F)] = self.booster.predict(F, pred_contrib=True,
                                                     num_iteration=self.best_iteration)
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
