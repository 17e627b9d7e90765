"""``lightgbm-monotone``: one binary LightGBM booster per class, each with monotone constraints
so that a run's probability for class c can only raise the score (margin) of class c.

LightGBM's (and XGBoost's) ``monotone_constraints`` bind a feature for every tree of a model, and
a multiclass model's trees for class c and for class c' share them, so a per-class constraint
needs one model per class: booster c is fitted one-vs-rest with +1 on the columns ``<run>:c``
of every run and no constraint elsewhere. Class probabilities are the softmax of the K margins.
"""

from __future__ import annotations

import inspect
import re
import statistics
from typing import Any, ClassVar

import numpy as np
from scipy.special import softmax

from .base import Stacker, available_cpus, construct, register_stacker
from .lightgbm import SavedBooster

__all__ = ["MonotoneLightGBMStacker"]


@register_stacker("lightgbm-monotone")
class MonotoneLightGBMStacker(Stacker):
    """K one-vs-rest ``lightgbm.LGBMClassifier`` with per-class monotone constraints, on
    log-probabilities, with the stronger regularisation of a guard-railed stacker."""

    attribution = True
    threads_param = "n_jobs"
    log_probs_default = True
    defaults: ClassVar[dict[str, Any]] = {
        "n_estimators": 300,
        "learning_rate": 0.05,
        "num_leaves": 7,
        "min_child_samples": 40,
        "subsample": 0.8,
        "subsample_freq": 1,
        "colsample_bytree": 0.8,
        "reg_lambda": 5.0,
        "n_jobs": available_cpus(),
        "deterministic": True,
        "force_row_wise": True,
        "max_bin": 63,
        "monotone_constraints_method": "advanced",
        "verbose": -1,
    }

    def constraints(self, n_columns: int, c_store: int) -> list[int]:
        """+1 on every run's column for store class ``c_store``, 0 elsewhere."""
        out = [0] * n_columns
        for m in range(self.n_sources or n_columns // self.n_classes):
            out[m * self.n_classes + c_store] = 1
        return out

    def fit_local(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
        import lightgbm as lgb  # heavy: imported when a LightGBM stacker is fitted

        self.models = []
        best = []
        for c in range(n_classes):
            params = {**self.params, "objective": "binary", "random_state": self.seed,
                      "monotone_constraints": self.constraints(X.shape[1], int(self.present[c]))}
            if rounds is not None:
                params["n_estimators"] = int(rounds)
            model = construct(lgb.LGBMClassifier, params, self.name)
            fit_kw: dict[str, Any] = {}
            if X_valid is not None:
                yv = (y_valid == c).astype(int)
                if "eval_X" in inspect.signature(model.fit).parameters:  # lightgbm >= 4.7
                    fit_kw.update(eval_X=(X_valid,), eval_y=(yv,))
                else:  # pragma: no cover - older lightgbm
                    fit_kw["eval_set"] = [(X_valid, yv)]
                fit_kw["callbacks"] = [lgb.early_stopping(self.early_stopping_rounds,
                                                          verbose=False)]
            model.fit(X, (y == c).astype(int), **fit_kw)
            b = int(model.best_iteration_ or 0)
            best.append(b if b > 0 else model.booster_.current_iteration())
            self.models.append(model)
        self.best = best
        self.best_iteration = max(1, int(round(statistics.median(best))))

    def margin_local(self, X):
        return np.column_stack([m.predict(X, raw_score=True, num_iteration=b)
                                for m, b in zip(self.models, self.best, strict=True)])

    def proba_local(self, X):
        return softmax(self.margin_local(X), axis=1)

    def contrib_local(self, X, local):
        out = np.empty((len(X), X.shape[1] + 1))
        for c in np.unique(local):
            rows = local == c
            out[rows] = self.models[c].predict(X[rows], pred_contrib=True,
                                               num_iteration=self.best[c])
        return out

    def save_model(self, path_stem):
        path = path_stem.with_suffix(".lgb-ovr.txt")
        path.write_text("".join(
            f"# class {int(k)}\n" + m.booster_.model_to_string(num_iteration=b)
            for k, m, b in zip(self.present, self.models, self.best, strict=True)))
        return path

    def load_local(self, path_stem):
        import lightgbm as lgb

        text = path_stem.with_suffix(".lgb-ovr.txt").read_text()
        parts = [p for p in re.split(r"(?m)^# class -?\d+\n", text) if p.strip()]
        self.models = [SavedBooster(lgb.Booster(model_str=p)) for p in parts]
        self.best = [None] * len(parts)  # each file holds the kept rounds only
