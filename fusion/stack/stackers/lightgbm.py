"""The LightGBM stacker (the default): ``lightgbm.LGBMClassifier``, or
``lightgbm.dask.DaskLGBMClassifier`` on a Dask cluster, with per-class TreeSHAP."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from typing import Any, ClassVar

import numpy as np
from scipy.special import log_softmax

from ...errors import StackError
from ..dask import dask_array
from .base import Stacker, available_cpus, construct, register_stacker

__all__ = ["LightGBMStacker", "SavedBooster"]

log = logging.getLogger(__name__)


@register_stacker("lightgbm")
class LightGBMStacker(Stacker):
    """``lightgbm.LGBMClassifier`` (or ``lightgbm.dask.DaskLGBMClassifier`` with a client).

    Defaults follow the boosted late-fusion notebook's tuned values where they made sense and fix
    its bug: ``subsample`` only bags rows when ``subsample_freq`` > 0, so it is set to 1.
    """

    attribution = True
    supports_dask = True
    threads_param = "n_jobs"
    log_probs_default = True  # guard rail: log-probabilities, as logreg sees them
    defaults: ClassVar[dict[str, Any]] = {
        "n_estimators": 500,
        "learning_rate": 0.1,
        "num_leaves": 15,
        "min_child_samples": 20,
        "subsample": 0.8,
        "subsample_freq": 1,
        "colsample_bytree": 0.8,
        "reg_lambda": 1.0,
        "n_jobs": available_cpus(),  # the CPUs this process may use (docs/stacking.md)
        "deterministic": True,
        "force_row_wise": True,
        "max_bin": 63,  # inputs are probabilities: 63 bins lose nothing and halve histogram work
        "verbose": -1,
    }

    def model_params(self, n_classes: int, rounds: int | None) -> dict[str, Any]:
        p = {
            **self.params,
            "objective": "multiclass",
            "num_class": n_classes,
            "random_state": self.seed,
        }
        if rounds is not None:
            p["n_estimators"] = int(rounds)
        if self.client is not None and "n_jobs" not in self.user_params:
            p.pop("n_jobs")  # each Dask worker uses its own thread count
        return p

    def fit_local(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
        import lightgbm as lgb  # heavy: imported when a LightGBM stacker is fitted

        params = self.model_params(n_classes, rounds)
        self.per_class: list[Any] | None = None  # per-class boosters for TreeSHAP, built lazily
        if self.client is not None:
            self.fit_dask(X, y, X_valid, y_valid, params)
            return
        model = construct(lgb.LGBMClassifier, params, self.name)
        fit_kw: dict[str, Any] = {}
        if X_valid is not None:
            if "eval_X" in inspect.signature(model.fit).parameters:  # lightgbm >= 4.7
                fit_kw.update(eval_X=(X_valid,), eval_y=(y_valid,))
            else:  # pragma: no cover - older lightgbm
                fit_kw["eval_set"] = [(X_valid, y_valid)]
            fit_kw["callbacks"] = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        model.fit(X, y, **fit_kw)
        self.model = model
        best = int(model.best_iteration_ or 0)
        self.best_iteration = best if best > 0 else model.booster_.current_iteration()

    def fit_dask(self, X, y, X_valid, y_valid, params: dict[str, Any]) -> None:
        from lightgbm.dask import DaskLGBMClassifier

        model = construct(DaskLGBMClassifier, {**params, "client": self.client}, self.name)
        # lightgbm.dask warns that n_jobs is ignored (workers use their own thread count) and
        # prints its port search to stdout; route both to logging.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as out:
            warnings.filterwarnings("ignore", message="Parameter n_jobs will be ignored")
            model.fit(dask_array(X.astype(np.float64), self.client), dask_array(y, self.client))
        if out.getvalue().strip():
            log.debug("lightgbm.dask: %s", out.getvalue().strip())
        # LightGBM's Dask interface cannot early-stop (each worker would see its own slice of the
        # validation rows), so train all rounds and truncate at the round with the lowest
        # validation log-loss, computed here from per-round margins.
        self.model = model.to_local()
        self.best_iteration = (
            self.best_round(X_valid, y_valid) if X_valid is not None else params["n_estimators"]
        )

    def best_round(self, X_valid: np.ndarray, y_valid: np.ndarray) -> int:
        """1 + the round after which the validation log-loss is lowest."""
        booster = self.model.booster_
        n = booster.current_iteration()
        raw = np.zeros((len(X_valid), booster.params.get("num_class", 2)), dtype=np.float64)
        losses = np.empty(n)
        for i in range(n):
            raw += booster.predict(X_valid, start_iteration=i, num_iteration=1, raw_score=True)
            losses[i] = -log_softmax(raw, axis=1)[np.arange(len(y_valid)), y_valid].mean()
        return int(np.argmin(losses)) + 1

    def proba_local(self, X):
        return self.model.predict_proba(X, num_iteration=self.best_iteration)

    def margin_local(self, X):
        return self.model.predict(X, raw_score=True, num_iteration=self.best_iteration)

    def contrib_local(self, X, local):
        # LightGBM's pred_contrib explains every class (K times the work, ~half the stack's
        # time at 27 classes). A multiclass model is K interleaved one-class ensembles, so each
        # row is explained with the trees of its own class only: exactly the same numbers.
        out = np.empty((len(X), X.shape[1] + 1))
        boosters = self.class_boosters()
        for c in np.unique(local):
            rows = local == c
            out[rows] = boosters[c].predict(X[rows], pred_contrib=True)
        return out

    def class_boosters(self) -> list[Any]:
        """One single-output booster per class, cut from the model's text dump."""
        if self.per_class is not None:
            return self.per_class
        import lightgbm as lgb

        k = len(self.present)
        text = self.model.booster_.model_to_string(num_iteration=self.best_iteration)
        start = text.index("\nTree=0\n") + 1
        end = text.index("\nend of trees")
        head = text[:start]
        trees = [t for t in re.split(r"(?m)^(?=Tree=\d+$)", text[start:end]) if t.strip()]
        if len(trees) % k:
            raise StackError(f"unexpected LightGBM model dump: {len(trees)} trees for {k} classes")
        for key, value in (
            ("num_class", "1"),
            ("num_tree_per_iteration", "1"),
            ("objective", "regression"),
        ):
            head = re.sub(rf"(?m)^{key}=.*$", f"{key}={value}", head)
        head = re.sub(r"(?m)^tree_sizes=.*\n", "", head)  # sizes of the full model's trees
        self.per_class = []
        for c in range(k):
            own = [re.sub(r"^Tree=\d+", f"Tree={j}", t) for j, t in enumerate(trees[c::k])]
            self.per_class.append(lgb.Booster(model_str=head + "".join(own) + "end of trees\n"))
        return self.per_class

    def save_model(self, path_stem):
        path = path_stem.with_suffix(".lgb.txt")
        self.model.booster_.save_model(str(path), num_iteration=self.best_iteration)
        return path

    def load_local(self, path_stem):
        import lightgbm as lgb

        self.model = SavedBooster(lgb.Booster(model_file=str(path_stem.with_suffix(".lgb.txt"))))
        self.per_class = None


class SavedBooster:
    """A LightGBM model read back from its text file, answering the two
    ``LGBMClassifier`` calls the stackers make (the file holds the kept rounds only)."""

    def __init__(self, booster: Any):
        self.booster_ = booster

    def predict_proba(self, X: np.ndarray, num_iteration: int | None = None) -> np.ndarray:
        p = self.booster_.predict(X)
        return np.column_stack([1.0 - p, p]) if p.ndim == 1 else p

    def predict(self, X: np.ndarray, raw_score: bool = False, num_iteration: int | None = None,
                pred_contrib: bool = False) -> np.ndarray:
        return self.booster_.predict(X, raw_score=raw_score, pred_contrib=pred_contrib)
