"""The XGBoost stacker: ``xgboost.XGBClassifier`` (``hist`` trees), or
``xgboost.dask.DaskXGBClassifier`` on a Dask cluster, with TreeSHAP."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..dask import dask_array
from .base import Stacker, available_cpus, construct, register_stacker

__all__ = ["XGBoostStacker"]


@register_stacker("xgboost")
class XGBoostStacker(Stacker):
    """``xgboost.XGBClassifier`` (or ``xgboost.dask.DaskXGBClassifier`` with a client),
    ``hist`` trees of depth 4 (at most 16 leaves, like LightGBM's 15)."""

    attribution = True
    supports_dask = True
    threads_param = "n_jobs"
    log_probs_default = True  # guard rail: log-probabilities, as logreg sees them
    defaults: ClassVar[dict[str, Any]] = {
        "n_estimators": 500,
        "learning_rate": 0.1,
        "max_depth": 4,
        "min_child_weight": 1.0,
        "subsample": 0.8,
        "colsample_bytree": 0.8,
        "reg_lambda": 1.0,
        "tree_method": "hist",
        "n_jobs": available_cpus(),  # the CPUs this process may use (docs/stacking.md)
    }

    def fit_local(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
        params = {
            **self.params,
            "objective": "multi:softprob",
            "num_class": n_classes,
            "random_state": self.seed,
            "eval_metric": "mlogloss",
        }
        if rounds is not None:
            params["n_estimators"] = int(rounds)
        if X_valid is not None:
            params["early_stopping_rounds"] = self.early_stopping_rounds
        if self.client is not None:
            from xgboost.dask import DaskXGBClassifier  # heavy and optional: only with --dask

            if "n_jobs" not in self.user_params:
                params.pop("n_jobs")  # each Dask worker uses its own thread count
            model = construct(DaskXGBClassifier, params, self.name)
            model.client = self.client
            ev = (
                [(dask_array(X_valid, self.client), dask_array(y_valid, self.client))]
                if X_valid is not None
                else None
            )
            model.fit(
                dask_array(X, self.client), dask_array(y, self.client), eval_set=ev, verbose=False
            )
        else:
            import xgboost as xgb  # heavy: imported when an XGBoost stacker is fitted

            model = construct(xgb.XGBClassifier, params, self.name)
            ev = [(X_valid, y_valid)] if X_valid is not None else None
            model.fit(X, y, eval_set=ev, verbose=False)
        self.booster = model.get_booster()
        if X_valid is not None:
            self.best_iteration = int(model.best_iteration) + 1
        else:
            self.best_iteration = int(self.booster.num_boosted_rounds())

    def predict(self, X: np.ndarray, **kw: Any) -> np.ndarray:
        """The booster's output over its first ``best_iteration`` rounds (``kw`` as in
        ``xgboost.Booster.predict``), in local class indices."""
        import xgboost as xgb

        dm = xgb.DMatrix(X, nthread=int(self.params.get("n_jobs") or available_cpus()))
        return self.booster.predict(dm, iteration_range=(0, self.best_iteration), **kw)

    def proba_local(self, X):
        return self.predict(X)

    def margin_local(self, X):
        return self.predict(X, output_margin=True)

    def contrib_local(self, X, local):
        contrib = self.predict(X, pred_contribs=True)  # (N, K_local, F + 1)
        return contrib[np.arange(len(X)), local]

    def save_model(self, path_stem):
        path = path_stem.with_suffix(".xgb.json")
        self.booster[: self.best_iteration].save_model(str(path))
        return path

    def load_local(self, path_stem):
        import xgboost as xgb

        self.booster = xgb.Booster(model_file=str(path_stem.with_suffix(".xgb.json")))
        self.best_iteration = self.booster.num_boosted_rounds()  # the file holds the kept rounds
