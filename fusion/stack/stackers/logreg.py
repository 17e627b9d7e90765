"""The linear baseline stacker: multinomial logistic regression on standardised
log-probabilities."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from sklearn.preprocessing import StandardScaler

from .base import Stacker, construct, register_stacker

__all__ = ["LogRegStacker"]


@register_stacker("logreg")
class LogRegStacker(Stacker):
    """Multinomial ``sklearn.linear_model.LogisticRegression`` on standardised log-probabilities:
    a learned, per-class weighting of the source runs (the linear baseline every GBDT must beat).
    No early stopping, so no inner split: every training row is fitted."""

    uses_early_stopping = False
    log_probs_default = True
    defaults: ClassVar[dict[str, Any]] = {"C": 1.0, "max_iter": 2000}

    def fit_local(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
        from sklearn.linear_model import LogisticRegression  # slow import, used only here

        self.scaler = StandardScaler().fit(X)
        self.model = construct(
            LogisticRegression, {**self.params, "random_state": self.seed}, self.name
        )
        self.model.fit(self.scaler.transform(X), y)
        self.best_iteration = int(np.max(self.model.n_iter_))

    def proba_local(self, X):
        return self.model.predict_proba(self.scaler.transform(X))

    def margin_local(self, X):
        return self.model.decision_function(self.scaler.transform(X))

    def save_model(self, path_stem):
        path = path_stem.with_suffix(".npz")
        np.savez(
            path,
            coef=self.model.coef_,
            intercept=self.model.intercept_,
            mean=self.scaler.mean_,
            std=self.scaler.scale_,
            classes=self.present,
        )
        return path

    def load_local(self, path_stem):
        from sklearn.linear_model import LogisticRegression

        with np.load(path_stem.with_suffix(".npz")) as z:
            self.scaler = StandardScaler()
            self.scaler.mean_, self.scaler.scale_ = z["mean"], z["std"]
            self.scaler.n_features_in_ = len(z["mean"])
            model = LogisticRegression()
            model.coef_, model.intercept_ = z["coef"], z["intercept"]
            model.classes_ = np.arange(len(self.present))
        self.model = model
