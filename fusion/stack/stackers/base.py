"""The stacker contract and its registry.

A stacker is a K-class classifier over a feature matrix built from the source runs'
probability blocks. :mod:`fusion.stack.crossfit` does the cross-fitting and the leak
bookkeeping; a backend only fits one model and predicts. Register a new one with
``@register_stacker("name")`` (or the ``fusion.stackers`` entry-point group of an installed
package); ``create_stacker(name, ...)`` builds it and an unknown name lists what exists, through
the same :class:`embedstore.registry.Registry` as encoders and heads.

Every backend sees class indices ``0..K-1``. A training set that lacks some class (tiny folds) is
re-indexed to the classes present and the outputs are expanded back to K columns (probability
0 for an absent class), so the GBDT's tree layout never depends on which class was missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.decomposition import PCA

from embedstore.registry import Registry

from ...errors import StackError
from .tuning import GRIDS, tuned_fit

__all__ = [
    "STACKERS",
    "Stacker",
    "available_cpus",
    "construct",
    "create_stacker",
    "list_stackers",
    "register_stacker",
    "stacker_class",
]


def _check(name: str, obj: Any) -> None:
    if not (isinstance(obj, type) and issubclass(obj, Stacker)):
        raise StackError(f"stacker {name!r} is {obj!r}, not a fusion.stack.Stacker subclass")


STACKERS: Registry[type[Stacker]] = Registry(
    "stacker",
    error=StackError,
    entry_point_group="fusion.stackers",
    normalize=lambda name: name.strip().lower(),
    check=_check,
)


def available_cpus() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``: a container's or ``taskset``'s
    limit, not the machine's count), at least 1: the GBDTs' default thread count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def register_stacker(name: str) -> Callable[[type[Stacker]], type[Stacker]]:
    """Class decorator: make a :class:`Stacker` subclass available as ``name``."""

    def deco(cls: type[Stacker]) -> type[Stacker]:
        cls.name = STACKERS.normalize(name)
        return STACKERS.register(name)(cls)

    return deco


def list_stackers() -> list[str]:
    """Names of the available stackers, sorted."""
    return STACKERS.names()


def stacker_class(name: str) -> type[Stacker]:
    """The class registered as ``name`` (an unknown name lists what exists)."""
    return STACKERS.get(name)


def create_stacker(
    name: str,
    *,
    n_classes: int,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    client: Any = None,
    n_sources: int | None = None,
    pooled_dims: int | None = None,
) -> Stacker:
    """Build a stacker by name; ``client`` is a ``distributed.Client`` for the GBDT backends;
    ``n_sources`` the number of source runs (the first ``n_sources * n_classes`` columns of X
    are their probability blocks; the columns after them are pooled features, reduced to
    ``pooled_dims`` by a PCA fitted on each model's own training rows when given)."""
    cls = stacker_class(name)
    if client is not None and not cls.supports_dask:
        dask_ok = [n for n in list_stackers() if stacker_class(n).supports_dask]
        raise StackError(f"stacker {name!r} cannot train on Dask; use one of {dask_ok} or drop --dask")
    return cls(n_classes=n_classes, params=params, seed=seed, client=client, n_sources=n_sources,
               pooled_dims=pooled_dims)


def construct(cls: Any, params: dict[str, Any], stacker: str) -> Any:
    """``cls(**params)``; a bad keyword becomes one StackError naming the stacker."""
    try:
        return cls(**params)
    except TypeError as e:
        raise StackError(
            f"bad --params for stacker {stacker!r}: {e}; check the names against "
            f"{cls.__module__}.{cls.__name__}"
        ) from None


class Stacker:
    """One K-class model. Subclasses implement ``fit_local`` / ``proba_local`` (and, for GBDTs,
    ``margin_local`` / ``contrib_local``) in the local class indices of :attr:`present`, and
    ``save_model``.

    Options that belong to the procedure rather than the model (popped from ``params``):
    ``early_stopping_rounds``, ``valid_fraction`` (inner early-stopping split of the training
    rows), ``log_probs`` (feed log-probabilities instead of probabilities), ``tune`` (GBDTs:
    choose the regularisation on the inner split, :mod:`.tuning`) and ``explain``
    (GBDTs: write TreeSHAP contributions, default true).
    """

    name: ClassVar[str] = "?"
    attribution: ClassVar[bool] = False  # has TreeSHAP contributions
    supports_dask: ClassVar[bool] = False
    uses_early_stopping: ClassVar[bool] = True
    log_probs_default: ClassVar[bool] = False
    early_stopping_default: ClassVar[int] = 30
    threads_param: ClassVar[str | None] = None  # the model parameter `--threads` sets
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        *,
        n_classes: int,
        params: dict[str, Any] | None = None,
        seed: int = 0,
        client: Any = None,
        n_sources: int | None = None,
        pooled_dims: int | None = None,
    ):
        params = dict(params or {})
        self.n_classes = n_classes
        self.n_sources = n_sources
        if pooled_dims is not None and (pooled_dims < 1 or n_sources is None):
            raise StackError(f"pooled_dims={pooled_dims} needs n_sources and must be >= 1; "
                             "16-32 is the usual size")
        self.pooled_dims = pooled_dims
        self.reducer: PCA | _Projection | None = None  # fitted in fit() on this model's training rows only
        self.seed = seed
        self.client = client
        self.early_stopping_rounds = int(
            params.pop("early_stopping_rounds", self.early_stopping_default)
        )
        self.valid_fraction = float(params.pop("valid_fraction", 0.1))
        self.log_probs = bool(params.pop("log_probs", self.log_probs_default))
        self.tune = bool(params.pop("tune", False))
        if self.tune and self.name not in GRIDS:
            raise StackError(f"tune=true: stacker {self.name!r} has no tuning grid; use it with "
                             f"{' or '.join(sorted(GRIDS))}, or drop -p tune")
        self.tuning: dict[str, Any] | None = None  # what tune=true tried and chose
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
        self.present = np.arange(n_classes)  # the classes seen in training, ascending

    def require_known_params(self) -> None:
        """For stackers that take only their own ``defaults`` as ``--params``: one line
        naming the unknown keys and the known ones."""
        unknown = set(self.params) - set(self.defaults)
        if unknown:
            raise StackError(f"unknown --params for stacker {self.name!r}: {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")

    def run_columns(self, X: np.ndarray) -> np.ndarray:
        """(N, M, K): the K probability (or log-probability) columns of each of the M source
        runs at the front of ``X`` (pooled columns after them are left out)."""
        k = self.n_classes
        m = self.n_sources or X.shape[1] // k
        if m < 1 or X.shape[1] < m * k:
            raise StackError(f"the {self.name} stacker needs {k} probability columns per run; "
                             f"got {X.shape[1]} columns")
        return X[:, : m * k].reshape(len(X), m, k)

    def procedure_params(self) -> dict[str, Any]:
        return {
            "explain": self.explain,
            "early_stopping_rounds": self.early_stopping_rounds,
            "valid_fraction": self.valid_fraction,
            "log_probs": self.log_probs,
            **({"tune": True, "tune_grid": list(GRIDS[self.name])} if self.tune else {}),
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
        self.present = present
        if self.pooled_dims is not None:
            cut = self.n_sources * self.n_classes
            dims = min(self.pooled_dims, X.shape[1] - cut, len(X))
            self.reducer = PCA(n_components=dims, random_state=self.seed).fit(X[:, cut:])
            X = self.reduce(X)
            X_valid = None if X_valid is None else self.reduce(X_valid)
        remap = np.full(self.n_classes, -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        if X_valid is not None and y_valid is not None:
            keep = remap[y_valid] >= 0  # a class unseen in training cannot be early-stopped on
            X_valid, y_valid = X_valid[keep], remap[y_valid[keep]]
            if len(y_valid) == 0:
                X_valid = y_valid = None
        if self.tune:  # the regularisation chosen on the inner split (.tuning)
            tuned_fit(self, X, remap[y], X_valid, y_valid, len(present), rounds)
        else:
            self.fit_local(X, remap[y], X_valid, y_valid, len(present), rounds)
        return self

    def reduce(self, X: np.ndarray) -> np.ndarray:
        """X with its pooled columns replaced by their PCA projection (``pooled_dims``); X as
        it is without a reducer."""
        if self.reducer is None:
            return X
        cut = self.n_sources * self.n_classes
        return np.hstack([X[:, :cut], self.reducer.transform(X[:, cut:])])

    def save_reducer(self, path_stem: Path) -> Path | None:
        """The PCA of the pooled columns (``path_stem`` + ``.pca.npz``); None without one."""
        if self.reducer is None:
            return None
        path = path_stem.with_suffix(".pca.npz")
        np.savez(path, mean=self.reducer.mean_, components=self.reducer.components_)
        return path

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, K) probabilities; classes absent from training get 0."""
        X = self.reduce(X)
        out = np.zeros((len(X), self.n_classes), dtype=np.float64)
        out[:, self.present] = self.proba_local(X)
        return out

    def margin(self, X: np.ndarray) -> np.ndarray:
        """(N, K) raw margins (log-odds before softmax); absent classes get -inf."""
        X = self.reduce(X)
        out = np.full((len(X), self.n_classes), -np.inf, dtype=np.float64)
        out[:, self.present] = self.margin_local(X)
        return out

    def contributions(self, X: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(N, F + 1) TreeSHAP contributions to the margin of ``classes[i]`` for row i; the last
        column is the bias (expected margin). Rows sum to ``margin(X)[i, classes[i]]``."""
        local = np.searchsorted(self.present, classes)
        if np.any(self.present[np.minimum(local, len(self.present) - 1)] != classes):
            raise StackError("contributions asked for a class the stacker never saw in training")
        return self.contrib_local(self.reduce(X), local)

    # -- backend hooks (local class indices 0..len(present)-1) ---------------------------------
    def fit_local(self, X, y, X_valid, y_valid, n_classes: int, rounds: int | None) -> None:
        raise NotImplementedError

    def proba_local(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def margin_local(self, X: np.ndarray) -> np.ndarray:
        raise StackError(f"stacker {self.name!r} has no raw margin")

    def contrib_local(self, X: np.ndarray, local: np.ndarray) -> np.ndarray:
        """(N, F + 1) contributions to the margin of local class ``local[i]`` for row i."""
        raise StackError(f"stacker {self.name!r} has no TreeSHAP contributions")

    def save_model(self, path_stem: Path) -> Path | None:
        """Write the fitted model (``path_stem`` + the backend's suffix); None if it has none."""
        return None

    def load_local(self, path_stem: Path) -> None:
        """Restore what :meth:`save_model` wrote, enough for ``proba_local`` (and, for GBDTs,
        ``margin_local`` / ``contrib_local``)."""
        raise StackError(f"stacker {self.name!r} cannot load a saved model")

    # -- persistence: model + PCA + a JSON sidecar; loading never unpickles ----------------------
    def save(self, path_stem: Path) -> None:
        """The model (:meth:`save_model`), the pooled-feature PCA and ``<stem>.json`` with the
        classes seen in training and the rounds used: everything :meth:`load` needs besides
        the stack's config."""
        self.save_model(path_stem)
        self.save_reducer(path_stem)
        meta = {"stacker": self.name, "present": [int(c) for c in self.present],
                "best_iteration": self.best_iteration, "n_classes": self.n_classes,
                "tuning": self.tuning}
        path_stem.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path_stem: Path, *, params: dict[str, Any], n_sources: int | None,
             pooled_dims: int | None, seed: int = 0) -> Stacker:
        """A fitted stacker from what :meth:`save` wrote at ``path_stem`` (``params``,
        ``n_sources`` and ``pooled_dims`` as the stack run's config records them)."""
        meta_path = path_stem.with_suffix(".json")
        if not meta_path.is_file():
            raise StackError(f"{meta_path} is missing: the stack was written before stack "
                             "models could be reloaded; re-run `fusion stack` to predict with it")
        meta = json.loads(meta_path.read_text())
        model = create_stacker(meta["stacker"], n_classes=int(meta["n_classes"]), params=params,
                               seed=seed, n_sources=n_sources, pooled_dims=pooled_dims)
        model.present = np.asarray(meta["present"], dtype=np.int64)
        model.best_iteration = meta["best_iteration"]
        pca = path_stem.with_suffix(".pca.npz")
        if pca.is_file():
            with np.load(pca) as z:
                model.reducer = _Projection(z["mean"], z["components"])
        model.load_local(path_stem)
        return model


class _Projection:
    """A fitted PCA's ``transform`` from its saved mean and components (no pickle)."""

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        self.mean_, self.components_ = mean, components

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) @ self.components_.T
