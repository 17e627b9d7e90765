"""Stacker backends: LightGBM, XGBoost, logistic regression and a small MLP.

A stacker is a K-class classifier over a feature matrix built from the source runs'
probability blocks. :mod:`fusion.stack` does the cross-fitting, the leak bookkeeping and the
output; a backend only fits one model and predicts. Register a new one with
``@register_stacker("name")``; ``create_stacker(name, ...)`` builds it and an unknown name lists
what exists (the same pattern as the head and encoder registries).

Every backend sees class indices ``0..K-1``. A training set that lacks some class (tiny folds) is
re-indexed to the classes present and the outputs are expanded back to K columns (probability
0 for an absent class), so the GBDT's tree layout never depends on which class was missing.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import StackError

__all__ = [
    "Stacker",
    "register_stacker",
    "create_stacker",
    "list_stackers",
    "stacker_class",
    "LightGBMStacker",
    "XGBoostStacker",
    "LogRegStacker",
    "MLPStacker",
]

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Stacker]] = {}


def register_stacker(name: str) -> Callable[[type[Stacker]], type[Stacker]]:
    """Class decorator: make a :class:`Stacker` subclass available as ``name``."""

    def deco(cls: type[Stacker]) -> type[Stacker]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_stackers() -> list[str]:
    """Names of the registered stackers, in registration order."""
    return list(_REGISTRY)


def stacker_class(name: str) -> type[Stacker]:
    """The registered class for ``name`` (an unknown name lists what exists)."""
    if name not in _REGISTRY:
        raise StackError(f"unknown stacker {name!r}; available: {', '.join(list_stackers())}")
    return _REGISTRY[name]


def create_stacker(
    name: str,
    *,
    n_classes: int,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    client: Any = None,
) -> Stacker:
    """Build a stacker by name; ``client`` is a ``distributed.Client`` for the GBDT backends."""
    cls = stacker_class(name)
    if client is not None and not cls.supports_dask:
        raise StackError(
            f"stacker {name!r} cannot train on Dask; use one of "
            f"{[n for n, c in _REGISTRY.items() if c.supports_dask]} or drop --dask"
        )
    return cls(n_classes=n_classes, params=params, seed=seed, client=client)


class Stacker:
    """One K-class model. Subclasses implement ``_fit`` / ``_proba`` (and, for GBDTs,
    ``_margin`` / ``_contrib`` / ``_save``).

    Options that belong to the procedure rather than the model (popped from ``params``):
    ``early_stopping_rounds``, ``valid_fraction`` (inner early-stopping split of the training
    rows), ``log_probs`` (feed log-probabilities instead of probabilities) and ``explain``
    (GBDTs: write TreeSHAP contributions, default true).
    """

    name: ClassVar[str] = "?"
    attribution: ClassVar[bool] = False  # has TreeSHAP contributions
    supports_dask: ClassVar[bool] = False
    log_probs_default: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        *,
        n_classes: int,
        params: dict[str, Any] | None = None,
        seed: int = 0,
        client: Any = None,
    ):
        params = dict(params or {})
        self.n_classes = n_classes
        self.seed = seed
        self.client = client
        self.early_stopping_rounds = int(params.pop("early_stopping_rounds", 30))
        self.valid_fraction = float(params.pop("valid_fraction", 0.1))
        self.log_probs = bool(params.pop("log_probs", self.log_probs_default))
        # TreeSHAP costs about as much as the fit at 27 classes (all classes are explained);
        # explain=false skips contributions.csv
        self.explain = bool(params.pop("explain", True)) and self.attribution
        if not 0.0 < self.valid_fraction < 0.5:
            raise StackError(
                f"valid_fraction={self.valid_fraction} must lie in (0, 0.5); "
                "0.1-0.15 is the usual inner early-stopping split"
            )
        self.user_params = params
        self.params = {**self.defaults, **params}
        self.best_iteration: int | None = None  # rounds / epochs used by the fitted model
        self._present = np.arange(n_classes)

    # -- the contract used by fusion.stack -------------------------------------------------
    @property
    def uses_early_stopping(self) -> bool:
        return True

    def procedure_params(self) -> dict[str, Any]:
        return {
            "explain": self.explain,
            "early_stopping_rounds": self.early_stopping_rounds,
            "valid_fraction": self.valid_fraction,
            "log_probs": self.log_probs,
        }

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        X_valid: np.ndarray | None = None,
        y_valid: np.ndarray | None = None,
        *,
        rounds: int | None = None,
    ) -> Stacker:
        """Fit on ``(X, y)``; early-stop on ``(X_valid, y_valid)`` when given, else train exactly
        ``rounds`` rounds/epochs (the refit on all rows)."""
        present = np.unique(y)
        if len(present) < 2:
            raise StackError(
                f"the stacker's training rows hold only class {present.tolist()}; "
                "a stacker needs at least 2 classes (more labelled rows or fewer folds)"
            )
        self._present = present
        remap = np.full(self.n_classes, -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        y_local = remap[y]
        if X_valid is not None and y_valid is not None:
            keep = remap[y_valid] >= 0  # a class unseen in training cannot be early-stopped on
            X_valid, y_valid = X_valid[keep], remap[y_valid[keep]]
            if len(y_valid) == 0:
                X_valid = y_valid = None
        self._fit(X, y_local, X_valid, y_valid, len(present), rounds)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, K) probabilities; classes absent from training get 0."""
        out = np.zeros((len(X), self.n_classes), dtype=np.float64)
        out[:, self._present] = self._proba(X)
        return out

    def margin(self, X: np.ndarray) -> np.ndarray:
        """(N, K) raw margins (log-odds before softmax); absent classes get -inf."""
        out = np.full((len(X), self.n_classes), -np.inf, dtype=np.float64)
        out[:, self._present] = self._margin(X)
        return out

    def contributions(self, X: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(N, F + 1) TreeSHAP contributions to the margin of ``classes[i]`` for row i; the last
        column is the bias (expected margin). Rows sum to ``margin(X)[i, classes[i]]``."""
        local = np.searchsorted(self._present, classes)
        if np.any(self._present[np.minimum(local, len(self._present) - 1)] != classes):
            raise StackError("contributions asked for a class the stacker never saw in training")
        return self._contrib(X, local)

    def save(self, path_stem: Path) -> Path | None:
        """Write the fitted model next to the run (``path_stem`` + backend suffix)."""
        return self._save(path_stem)

    # -- backend hooks ------------------------------------------------------------------------
    def _fit(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:  # pragma: no cover
        raise NotImplementedError

    def _proba(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _margin(self, X: np.ndarray) -> np.ndarray:
        raise StackError(f"stacker {self.name!r} has no raw margin")

    def _contrib(self, X: np.ndarray, local: np.ndarray) -> np.ndarray:
        """(N, F + 1) contributions to the margin of local class ``local[i]`` for row i."""
        raise StackError(f"stacker {self.name!r} has no TreeSHAP contributions")

    def _save(self, path_stem: Path) -> Path | None:
        return None


def _dask_array(X: np.ndarray, client: Any):
    import dask.array as da

    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    rows = max(1, math.ceil(len(X) / n_workers))
    chunks = (rows,) if X.ndim == 1 else (rows, X.shape[1])
    return da.from_array(X, chunks=chunks)


def _construct(cls: Any, params: dict[str, Any], stacker: str) -> Any:
    try:
        return cls(**params)
    except TypeError as e:
        raise StackError(
            f"bad --param for stacker {stacker!r}: {e}; check the names against "
            f"{cls.__module__}.{cls.__name__}"
        ) from None


@register_stacker("lightgbm")
class LightGBMStacker(Stacker):
    """``lightgbm.LGBMClassifier`` (or ``lightgbm.dask.DaskLGBMClassifier`` with a client).

    Defaults follow the boosted late-fusion notebook's tuned values where they made sense and fix
    its bug: ``subsample`` only bags rows when ``subsample_freq`` > 0, so it is set to 1.
    """

    attribution = True
    supports_dask = True
    defaults: ClassVar[dict[str, Any]] = {
        "n_estimators": 500,
        "learning_rate": 0.1,
        "num_leaves": 15,
        "min_child_samples": 20,
        "subsample": 0.8,
        "subsample_freq": 1,
        "colsample_bytree": 0.8,
        "reg_lambda": 1.0,
        "n_jobs": 2,
        "deterministic": True,
        "force_row_wise": True,
        "max_bin": 63,  # inputs are probabilities: 63 bins lose nothing and halve histogram work
        "verbose": -1,
    }

    def _model_params(self, n_classes: int, rounds: int | None) -> dict[str, Any]:
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

    def _fit(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
        import lightgbm as lgb

        params = self._model_params(n_classes, rounds)
        self._per_class: list[Any] | None = None  # per-class boosters for TreeSHAP, built lazily
        if self.client is not None:
            from lightgbm.dask import DaskLGBMClassifier

            model = _construct(DaskLGBMClassifier, {**params, "client": self.client}, self.name)
            # lightgbm.dask warns that n_jobs is ignored (workers use their own thread count)
            # and prints its port search to stdout; route both to logging.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as out:
                warnings.filterwarnings("ignore", message="Parameter n_jobs will be ignored")
                model.fit(
                    _dask_array(X.astype(np.float64), self.client), _dask_array(y, self.client)
                )
            if out.getvalue().strip():
                log.debug("lightgbm.dask: %s", out.getvalue().strip())
            # LightGBM's Dask interface cannot early-stop (each worker would see its own slice
            # of the validation rows), so train all rounds and truncate at the round with the
            # lowest validation log-loss, computed here from per-round margins.
            self.model = model.to_local()
            self.best_iteration = (
                self._best_round(X_valid, y_valid)
                if X_valid is not None
                else params["n_estimators"]
            )
            return
        model = _construct(lgb.LGBMClassifier, params, self.name)
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

    def _best_round(self, X_valid: np.ndarray, y_valid: np.ndarray) -> int:
        booster = self.model.booster_
        n = booster.current_iteration()
        raw = np.zeros((len(X_valid), booster.params.get("num_class", 2)), dtype=np.float64)
        losses = np.empty(n)
        for i in range(n):
            raw += booster.predict(X_valid, start_iteration=i, num_iteration=1, raw_score=True)
            z = raw - raw.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            losses[i] = -logp[np.arange(len(y_valid)), y_valid].mean()
        return int(np.argmin(losses)) + 1

    def _proba(self, X):
        return self.model.predict_proba(X, num_iteration=self.best_iteration)

    def _margin(self, X):
        return self.model.predict(X, raw_score=True, num_iteration=self.best_iteration)

    def _contrib(self, X, local):
        # LightGBM's pred_contrib explains every class (K times the work, ~half the stack's
        # time at 27 classes). A multiclass model is K interleaved one-class ensembles, so each
        # row is explained with the trees of its own class only: exactly the same numbers.
        out = np.empty((len(X), X.shape[1] + 1))
        boosters = self._class_boosters()
        for c in np.unique(local):
            rows = local == c
            out[rows] = boosters[c].predict(X[rows], pred_contrib=True)
        return out

    def _class_boosters(self) -> list[Any]:
        """One single-output booster per class, cut from the model's text dump."""
        if self._per_class is not None:
            return self._per_class
        import lightgbm as lgb

        k = len(self._present)
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
        self._per_class = []
        for c in range(k):
            own = [re.sub(r"^Tree=\d+", f"Tree={j}", t) for j, t in enumerate(trees[c::k])]
            self._per_class.append(lgb.Booster(model_str=head + "".join(own) + "end of trees\n"))
        return self._per_class

    def _save(self, path_stem):
        path = path_stem.with_suffix(".lgb.txt")
        self.model.booster_.save_model(str(path), num_iteration=self.best_iteration)
        return path


@register_stacker("xgboost")
class XGBoostStacker(Stacker):
    """``xgboost.XGBClassifier`` (or ``xgboost.dask.DaskXGBClassifier`` with a client),
    ``hist`` trees of depth 4 (at most 16 leaves, like LightGBM's 15)."""

    attribution = True
    supports_dask = True
    defaults: ClassVar[dict[str, Any]] = {
        "n_estimators": 500,
        "learning_rate": 0.1,
        "max_depth": 4,
        "min_child_weight": 1.0,
        "subsample": 0.8,
        "colsample_bytree": 0.8,
        "reg_lambda": 1.0,
        "tree_method": "hist",
        "n_jobs": 2,
    }

    def _fit(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
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
            from xgboost.dask import DaskXGBClassifier

            if "n_jobs" not in self.user_params:
                params.pop("n_jobs")
            model = _construct(DaskXGBClassifier, params, self.name)
            model.client = self.client
            ev = (
                [(_dask_array(X_valid, self.client), _dask_array(y_valid, self.client))]
                if X_valid is not None
                else None
            )
            model.fit(
                _dask_array(X, self.client), _dask_array(y, self.client), eval_set=ev, verbose=False
            )
        else:
            import xgboost as xgb

            model = _construct(xgb.XGBClassifier, params, self.name)
            ev = [(X_valid, y_valid)] if X_valid is not None else None
            model.fit(X, y, eval_set=ev, verbose=False)
        self.booster = model.get_booster()
        if X_valid is not None:
            self.best_iteration = int(model.best_iteration) + 1
        else:
            self.best_iteration = int(self.booster.num_boosted_rounds())

    def _predict(self, X, **kw):
        import xgboost as xgb

        return self.booster.predict(xgb.DMatrix(X), iteration_range=(0, self.best_iteration), **kw)

    def _proba(self, X):
        return self._predict(X)

    def _margin(self, X):
        return self._predict(X, output_margin=True)

    def _contrib(self, X, local):
        contrib = self._predict(X, pred_contribs=True)  # (N, K_local, F + 1)
        return contrib[np.arange(len(X)), local]

    def _save(self, path_stem):
        path = path_stem.with_suffix(".xgb.json")
        self.booster[: self.best_iteration].save_model(str(path))
        return path


def _standardize_fit(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(0)
    std = X.std(0)
    return mean, np.where(std > 1e-12, std, 1.0)


@register_stacker("logreg")
class LogRegStacker(Stacker):
    """Multinomial ``sklearn.linear_model.LogisticRegression`` on standardised log-probabilities:
    a learned, per-class weighting of the source runs (the linear baseline every GBDT must beat).
    """

    log_probs_default = True
    defaults: ClassVar[dict[str, Any]] = {"C": 1.0, "max_iter": 2000}

    @property
    def uses_early_stopping(self) -> bool:
        return False

    def _fit(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
        from sklearn.linear_model import LogisticRegression

        self.mean, self.std = _standardize_fit(X)
        self.model = _construct(
            LogisticRegression, {**self.params, "random_state": self.seed}, self.name
        )
        self.model.fit((X - self.mean) / self.std, y)
        self.best_iteration = int(np.max(self.model.n_iter_))

    def _proba(self, X):
        return self.model.predict_proba((X - self.mean) / self.std)

    def _margin(self, X):
        return self.model.decision_function((X - self.mean) / self.std)

    def _save(self, path_stem):
        path = path_stem.with_suffix(".npz")
        np.savez(
            path,
            coef=self.model.coef_,
            intercept=self.model.intercept_,
            mean=self.mean,
            std=self.std,
            classes=self._present,
        )
        return path


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@register_stacker("mlp")
class MLPStacker(Stacker):
    """The stacking feed-forward net of Chordia & Kumar (2020): one hidden layer over the
    concatenated probability blocks, softmax output, cross-entropy; early-stopped on the inner
    split (patience ``early_stopping_rounds`` epochs), refit for the median best epoch.
    Seeded through a private RNG state, so the global torch seed is left alone."""

    defaults: ClassVar[dict[str, Any]] = {
        "hidden": 64,
        "dropout": 0.1,
        "lr": 3e-3,
        "weight_decay": 1e-4,
        "batch_size": 128,
        "max_epochs": 100,
        "threads": 1,  # a net this small runs fastest on one thread; more only add contention
    }

    def __init__(self, **kw: Any):
        params = dict(kw.get("params") or {})
        params.setdefault("early_stopping_rounds", 10)
        super().__init__(**{**kw, "params": params})
        unknown = set(self.params) - set(self.defaults)
        if unknown:
            raise StackError(
                f"unknown --param for stacker 'mlp': {sorted(unknown)}; "
                f"known: {sorted(self.defaults)}"
            )

    def _fit(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
        import torch
        from torch import nn

        p = self.params
        self.mean, self.std = _standardize_fit(X)
        Xt = torch.as_tensor((X - self.mean) / self.std, dtype=torch.float32)  # (N, F)
        yt = torch.as_tensor(y, dtype=torch.long)  # (N,)
        Xv = yv = None
        if X_valid is not None:
            Xv = torch.as_tensor((X_valid - self.mean) / self.std, dtype=torch.float32)
            yv = torch.as_tensor(y_valid, dtype=torch.long)
        epochs = int(rounds) if rounds is not None else int(p["max_epochs"])
        with _torch_threads(int(p["threads"])), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = nn.Sequential(
                nn.Linear(X.shape[1], int(p["hidden"])),
                nn.ReLU(),
                nn.Dropout(float(p["dropout"])),
                nn.Linear(int(p["hidden"]), n_classes),
            )
            opt = torch.optim.AdamW(
                net.parameters(), lr=float(p["lr"]), weight_decay=float(p["weight_decay"])
            )
            gen = torch.Generator().manual_seed(self.seed)
            loss_fn = nn.CrossEntropyLoss()
            best_loss, best_epoch, best_state, stale = math.inf, epochs, None, 0
            bs = int(p["batch_size"])
            for epoch in range(1, epochs + 1):
                net.train()
                for idx in torch.randperm(len(Xt), generator=gen).split(bs):
                    opt.zero_grad()
                    loss_fn(net(Xt[idx]), yt[idx]).backward()
                    opt.step()
                if Xv is None:
                    continue
                net.eval()
                with torch.no_grad():
                    v = float(loss_fn(net(Xv), yv))
                if v < best_loss - 1e-6:
                    best_loss, best_epoch, stale = v, epoch, 0
                    best_state = {k: t.clone() for k, t in net.state_dict().items()}
                else:
                    stale += 1
                    if stale >= self.early_stopping_rounds:
                        break
            if best_state is not None:
                net.load_state_dict(best_state)
        net.eval()
        self.net = net
        self.best_iteration = best_epoch

    def _logits(self, X):
        import torch

        with torch.no_grad(), _torch_threads(int(self.params["threads"])):
            x = torch.as_tensor((X - self.mean) / self.std, dtype=torch.float32)
            return self.net(x).double().numpy()

    def _proba(self, X):
        z = self._logits(X)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def _margin(self, X):
        return self._logits(X)

    def _save(self, path_stem):
        from safetensors.torch import save_file

        path = path_stem.with_suffix(".safetensors")
        state = {k: t.contiguous() for k, t in self.net.state_dict().items()}
        save_file(state, str(path), metadata={"classes": ",".join(map(str, self._present))})
        return path
