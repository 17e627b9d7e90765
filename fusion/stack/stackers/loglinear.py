"""The class-wise log-linear pool: a product of the runs' probabilities with one exponent per
(run, class).

``score_c = sum_r a[r, c] * z[r, c] + b[c]`` and ``p = softmax(score)``, where ``z[r]`` is run
r's log-probabilities centred over the classes (log-probabilities are logits up to a constant
per run, the centring removes it). With every ``a[r, c] = 1 / R`` and ``b = 0`` it is the
geometric mean of the runs (the equal-weight log pool); fitting ``a`` says how far to trust
each run on each class, which is what a stacker is for on catalogues where text wins on some
categories and images on others, with runs x K + K parameters instead of logreg's
(runs x K) x K. Fitted by L-BFGS on the mean log-loss plus ``l2 * sum (a - 1/R)^2`` (shrinkage
toward the equal-weight pool); no inner split. Pooled columns, if any, are ignored.

When a run's logits are Gaussian around a per-class skill (``fusion.testing``'s synthetic runs),
this model family holds the Bayes-optimal combination, so read its synthetic scores as a ceiling;
on the real-pipeline cases it is one more candidate of `auto` (docs/stacking.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from ...errors import StackError
from .base import Stacker, register_stacker

__all__ = ["LogLinearStacker"]

_EPS = 1e-7  # the clip of log-probabilities, as every stacker's log_probs input


@register_stacker("loglinear")
class LogLinearStacker(Stacker):
    """One exponent per (run, class) and a bias per class over centred log-probabilities;
    L-BFGS on log-loss + ``l2`` shrinkage toward the equal-weight log pool."""

    uses_early_stopping = False
    log_probs_default = True
    defaults: ClassVar[dict[str, Any]] = {"l2": 0.01, "max_iter": 300}

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.require_known_params()
        if float(self.params["l2"]) < 0 or int(self.params["max_iter"]) < 1:
            raise StackError(f"loglinear: l2={self.params['l2']} must be >= 0 and max_iter="
                             f"{self.params['max_iter']} >= 1 (defaults 0.01, 300)")

    def z(self, X: np.ndarray) -> np.ndarray:
        """(N, R, C) centred log-probabilities of the R runs over the present classes."""
        blocks = self.run_columns(X)
        lp = blocks if self.log_probs else np.log(np.clip(blocks, _EPS, None))
        lp = lp[:, :, self.present].astype(np.float64)
        return lp - lp.mean(2, keepdims=True)

    def fit_local(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
        z = self.z(X)
        n, r, c = z.shape
        onehot = np.eye(c)[y]
        l2 = float(self.params["l2"])
        prior = 1.0 / r

        def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
            a, b = w[: r * c].reshape(r, c), w[r * c:]
            ls = log_softmax(np.einsum("nrc,rc->nc", z, a) + b, axis=1)
            g = (np.exp(ls) - onehot) / n
            loss = -(ls * onehot).sum() / n + l2 * ((a - prior) ** 2).sum()
            ga = np.einsum("nrc,nc->rc", z, g) + 2 * l2 * (a - prior)
            return float(loss), np.concatenate([ga.ravel(), g.sum(0)])

        w0 = np.concatenate([np.full(r * c, prior), np.zeros(c)])
        res = minimize(loss_grad, w0, jac=True, method="L-BFGS-B",
                       options={"maxiter": int(self.params["max_iter"])})
        self.a, self.b = res.x[: r * c].reshape(r, c), res.x[r * c:]
        self.best_iteration = int(res.nit)

    def margin_local(self, X):
        return np.einsum("nrc,rc->nc", self.z(X), self.a) + self.b

    def proba_local(self, X):
        return softmax(self.margin_local(X), axis=1)

    def save_model(self, path_stem):
        path = path_stem.with_suffix(".npz")
        np.savez(path, a=self.a, b=self.b, classes=self.present)
        return path

    def load_local(self, path_stem):
        with np.load(path_stem.with_suffix(".npz")) as z:
            self.a, self.b = z["a"], z["b"]
