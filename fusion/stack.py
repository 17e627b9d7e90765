"""`fusion stack`: cross-fitted stackers over the out-of-fold probabilities of several runs.

Leak-freedom is the whole point, so the procedure is fixed (docs/stacking.md):

1. Every source run was trained on the store's canonical folds, so its ``oof.npy`` row for item i
   came from a model that never saw i. The runs are checked to agree on store, folds, classes
   and labels, and every probability block is checked to be row-normalised.
2. For each fold f the stacker trains on the other folds' rows (early-stopping on a stratified
   10 % of *those* rows) and scores fold f: the stack's own out-of-fold predictions. The row
   indices of every split are written to ``cv_indices.npz``.
3. A refit on all trainable rows (for the median best round count of the fold models) scores the
   holdout from the source runs' holdout probabilities.
4. GBDT stackers also write per-item TreeSHAP contributions of each source run.

The output is a run directory (kind ``"stack"``) in the format of :mod:`fusion.rundir`, so a
stack can itself be stacked or compared with heads.
"""

from __future__ import annotations

import csv
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StackError
from .rundir import Run, RunWriter, load_run
from .stackers import create_stacker, list_stackers, stacker_class

__all__ = [
    "FEATURES",
    "list_stackers",
    "parse_params",
    "stack",
    "summarize_contributions",
    "plot_contributions",
    "make_synthetic_runs",
    "bench_stackers",
]

FEATURES = ("probs", "probs+pooled")
ROW_SUM_TOL = 1e-3
DASK_CONNECT_TIMEOUT = "20s"
_RESERVED = {"id", "split", "fold", "true", "predicted", "bias", "pooled"}


# ---------------------------------------------------------------------------------------------
# --param key=value parsing
# ---------------------------------------------------------------------------------------------
def _coerce(value: str) -> Any:
    low = value.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["num_leaves=31", "learning_rate=0.05", "deterministic=true"]`` -> typed dict
    (true/false/yes/no/on/off -> bool, none/null -> None, then int, then float, else str)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise StackError(f"--param {item!r} is not key=value; write e.g. --param num_leaves=31")
        out[key] = _coerce(value.strip())
    return out


# ---------------------------------------------------------------------------------------------
# inputs: load, check, align
# ---------------------------------------------------------------------------------------------
def _label(run: Run) -> str:
    return f"{run.name!r} ({run.path})"


def _modalities(run: Run) -> list[str]:
    """Which inputs a run saw: config "modalities" (stacks, custom runs), else the feature sets
    `fusion train` records under config "features", else the head name."""
    mods = run.config.get("modalities")
    if mods:
        return sorted(set(mods))
    feats = run.config.get("features")
    if isinstance(feats, dict) and feats.keys() <= {"text", "image"}:
        used = sorted(m for m, fs in feats.items() if fs)
        if used:
            return used
    head = run.head
    if head in ("text", "image"):
        return [head]
    return ["image", "text"]


def _check_block(run: Run, arr: np.ndarray, which: str, k: int) -> np.ndarray:
    if arr.size == 0 and which == "holdout":  # a store without a holdout
        return arr.reshape(0, k)
    if arr.ndim != 2 or arr.shape[1] != k:
        raise StackError(
            f"run {_label(run)}: {which}.npy has shape {arr.shape}, expected "
            f"(N, {k}) for its {k} classes; re-run it"
        )
    if not np.all(np.isfinite(arr)) or (arr.size and arr.min() < -ROW_SUM_TOL):
        raise StackError(
            f"run {_label(run)}: {which}.npy holds NaN/inf or negative values; "
            "stack probabilities, not logits"
        )
    sums = arr.sum(1, dtype=np.float64)
    bad = np.abs(sums - 1.0) > ROW_SUM_TOL
    if bad.any():
        i = int(np.argmax(bad))
        raise StackError(
            f"run {_label(run)}: {int(bad.sum())} rows of {which}.npy do not sum to 1 (row {i} "
            f"sums to {sums[i]:.4f}); a block summing to 2 is two models' probabilities aliased "
            "into one, logits need a softmax; fix the run that wrote it"
        )
    return arr


def _positions(run: Run, rows: np.ndarray, expected: np.ndarray, which: str) -> np.ndarray:
    """Index into ``run.<which>`` for each row of ``expected`` (refusing gaps and extras)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(np.unique(rows)) != len(rows):
        raise StackError(f"run {_label(run)}: {which}_rows.npy repeats store rows; re-run it")
    if not np.array_equal(np.sort(rows), expected):
        missing = np.setdiff1d(expected, rows)
        extra = np.setdiff1d(rows, expected)
        what = "trainable (fold >= 0)" if which == "oof" else "holdout (fold -1)"
        raise StackError(
            f"run {_label(run)}: its {which} rows do not match the store's {len(expected)} "
            f"{what} rows ({len(missing)} missing e.g. {missing[:3].tolist()}, {len(extra)} "
            f"extra e.g. {extra[:3].tolist()}); re-train it with `fusion train` on this store"
        )
    order = np.argsort(rows, kind="stable")
    return order  # rows[order] == expected


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


class _Inputs:
    """The checked, aligned inputs of one stack."""

    def __init__(self, runs: Sequence[str | os.PathLike | Run]):
        if len(runs) < 2:
            raise StackError(
                f"stacking needs at least 2 runs, got {len(runs)}; pass several "
                "--runs trained on the same store"
            )
        loaded = [r if isinstance(r, Run) else load_run(r) for r in runs]
        seen: set[Path] = set()
        for r in loaded:
            p = r.path.resolve()
            if p in seen:
                raise StackError(f"run {_label(r)} is given twice; each source run may appear once")
            if (p / "DONE").exists():  # an in-memory Run (train(out=None)) has no directory
                seen.add(p)
        self.runs = loaded
        ref = loaded[0]
        for r in loaded:
            missing = [k for k in ("store", "classes", "folds", "labels") if k not in r.config]
            if missing or not r.store_fingerprint or not r.folds_fingerprint:
                raise StackError(
                    f"run {_label(r)}: config.json lacks {missing or ['store']} "
                    "(store fingerprints, classes, folds, labels); only runs "
                    "written by `fusion train`/`fusion stack` can be stacked"
                )
        for r in loaded[1:]:
            if r.store_fingerprint != ref.store_fingerprint:
                raise StackError(
                    f"run {_label(r)} comes from store fingerprint {r.store_fingerprint!r} but "
                    f"{_label(ref)} from {ref.store_fingerprint!r}; stack only runs trained on "
                    "the same store"
                )
            if r.folds_fingerprint != ref.folds_fingerprint:
                raise StackError(
                    f"run {_label(r)} uses folds {r.folds_fingerprint!r} but {_label(ref)} uses "
                    f"{ref.folds_fingerprint!r}; re-train it on the store's canonical folds"
                )
            if list(r.classes) != list(ref.classes):
                raise StackError(
                    f"run {_label(r)} has classes {r.classes[:6]}... but "
                    f"{_label(ref)} has {ref.classes[:6]}...; runs must share the "
                    "store's class list"
                )
        self.classes = list(ref.classes)
        self.k = len(self.classes)
        self.store = dict(ref.config["store"])
        self.folds = dict(ref.config["folds"])
        self.assignment = np.asarray(self.folds.get("assignment", []), dtype=np.int64)
        self.labels = np.asarray(ref.config["labels"], dtype=np.int64)
        self.n_folds = int(self.folds.get("k", 0))
        if self.assignment.ndim != 1 or len(self.assignment) != len(self.labels):
            raise StackError(
                f"run {_label(ref)}: folds.assignment ({self.assignment.shape}) and "
                f"labels ({self.labels.shape}) must be one entry per store row"
            )
        if self.n_folds < 2 or self.assignment.max(initial=-1) >= self.n_folds:
            raise StackError(
                f"run {_label(ref)}: folds.k={self.n_folds} does not fit the fold "
                f"assignment (max {self.assignment.max(initial=-1)}); re-run it"
            )
        for r in loaded[1:]:
            if not np.array_equal(
                np.asarray(r.config["folds"].get("assignment", [])), self.assignment
            ):
                raise StackError(
                    f"run {_label(r)} has a different fold assignment than "
                    f"{_label(ref)}; re-train it on the store's canonical folds"
                )
            if not np.array_equal(np.asarray(r.config["labels"]), self.labels):
                raise StackError(
                    f"run {_label(r)} has different labels than {_label(ref)}; "
                    "were they trained on the same store?"
                )
        self.trainable = np.flatnonzero(self.assignment >= 0)
        self.holdout = np.flatnonzero(self.assignment == -1)
        y = self.labels[self.trainable]
        if y.size == 0 or y.min() < 0 or y.max() >= self.k:
            raise StackError(
                f"labels of the trainable rows must lie in [0, {self.k}); found "
                f"[{y.min(initial=0)}, {y.max(initial=0)}]; every non-holdout row "
                "needs a label"
            )
        self.ids = _item_ids(ref, len(self.labels))

        self.oof: list[np.ndarray] = []  # each (N_trainable, K), store-row order
        self.hold: list[np.ndarray] = []  # each (N_holdout, K)
        for r in loaded:
            oof = _check_block(r, r.oof, "oof", self.k)
            hold = _check_block(r, r.holdout, "holdout", self.k)
            if len(oof) != len(r.oof_rows) or len(hold) != len(r.holdout_rows):
                raise StackError(
                    f"run {_label(r)}: probabilities and *_rows.npy differ in length; re-run it"
                )
            self.oof.append(oof[_positions(r, r.oof_rows, self.trainable, "oof")])
            self.hold.append(hold[_positions(r, r.holdout_rows, self.holdout, "holdout")])
        for i in range(len(loaded)):
            for j in range(i):
                if np.array_equal(self.oof[i], self.oof[j]) and np.array_equal(
                    self.hold[i], self.hold[j]
                ):
                    raise StackError(
                        f"runs {_label(loaded[j])} and {_label(loaded[i])} hold "
                        "identical probabilities (a copied run?); drop one"
                    )
        self.names = _unique_names([r.name for r in loaded])


def _item_ids(run: Run, n_store: int) -> list[str]:
    """Item id per store row: config "ids" if present, else the run's predictions.csv (whose rows
    follow oof_rows then holdout_rows, as every RunWriter user writes them), else the row index."""
    ids = run.config.get("ids")
    if ids is not None and len(ids) == n_store:
        return [str(i) for i in ids]
    out = [str(i) for i in range(n_store)]
    f = run.path / "predictions.csv"
    if (run.path / "DONE").exists() and f.exists():
        with f.open(newline="") as fh:
            col = [r["id"] for r in csv.DictReader(fh)]
        rows = np.concatenate([run.oof_rows, run.holdout_rows]).astype(np.int64)
        if len(col) == len(rows) and (len(rows) == 0 or rows.max() < n_store):
            for r, i in zip(rows.tolist(), col, strict=True):
                out[r] = i
    return out


def _unique_names(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        base = f"{n}-run" if n in _RESERVED else n
        cand, i = base, 2
        while cand in out:
            cand, i = f"{base}-{i}", i + 1
        out.append(cand)
    return out


# ---------------------------------------------------------------------------------------------
# metrics and helpers
# ---------------------------------------------------------------------------------------------
def _scores(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score

    keep = y >= 0
    if not keep.any():
        return {"accuracy": None, "macro_f1": None, "n": 0}
    y, pred = y[keep], pred[keep]
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=np.unique(y), zero_division=0)),
        "n": int(keep.sum()),
    }


def _inner_split(
    idx: np.ndarray, y: np.ndarray, frac: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified early-stopping split of the TRAINING rows ``idx`` (never the scored rows)."""
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    dummy = np.zeros(len(idx))
    try:
        fit, val = next(
            StratifiedShuffleSplit(1, test_size=frac, random_state=seed).split(dummy, y[idx])
        )
    except ValueError:  # a class with a single row, or fewer valid rows than classes
        fit, val = next(ShuffleSplit(1, test_size=frac, random_state=seed).split(dummy))
    return np.sort(idx[fit]), np.sort(idx[val])


def _group_matrix(n_runs: int, k: int, n_pooled: int) -> np.ndarray:
    """(F + 1, G) 0/1 matrix summing feature contributions into [runs..., pooled?, bias]."""
    n_groups = n_runs + (1 if n_pooled else 0) + 1
    g = np.zeros((n_runs * k + n_pooled + 1, n_groups))
    for r in range(n_runs):
        g[r * k : (r + 1) * k, r] = 1.0
    if n_pooled:
        g[n_runs * k : n_runs * k + n_pooled, n_runs] = 1.0
    g[-1, -1] = 1.0
    return g


# ---------------------------------------------------------------------------------------------
# stack
# ---------------------------------------------------------------------------------------------
def stack(
    runs: Sequence[str | os.PathLike | Run],
    *,
    stacker: str = "lightgbm",
    features: str = "probs",
    params: dict[str, Any] | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    dask: str | None = None,
    pooled: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
) -> Run:
    """Cross-fit ``stacker`` on the source runs' out-of-fold probabilities and write a stack run.

    ``features="probs+pooled"`` appends ``pooled`` (N_store, D) embedding columns. ``dask`` is a
    scheduler address (``tcp://host:8786``): the GBDT then trains on that cluster. Returns the
    written run; ``run.extra["cv_indices"]`` holds the store rows of every fit/valid/scored split.
    ``out=None`` writes into a fresh temporary directory.
    """
    say = progress or (lambda _msg: None)
    cls = stacker_class(stacker)
    if dask is not None and not cls.supports_dask:
        raise StackError(
            f"stacker {stacker!r} cannot train on Dask; use lightgbm or xgboost, or drop --dask"
        )
    if features not in FEATURES:
        raise StackError(f"features={features!r} is not one of {list(FEATURES)}")
    inp = _Inputs(runs)
    n_store = len(inp.labels)
    if features == "probs+pooled":
        if pooled is None:
            raise StackError(
                "features='probs+pooled' needs the pooled embeddings (N_store, D); "
                "the CLI reads them from the store with --pooled FEATURE_SET"
            )
        pooled = np.asarray(pooled, dtype=np.float64)
        if pooled.ndim != 2 or len(pooled) != n_store or not np.all(np.isfinite(pooled)):
            raise StackError(
                f"pooled has shape {pooled.shape}, expected finite ({n_store}, D): "
                "one row per store row"
            )
    elif pooled is not None:
        raise StackError(
            "pooled embeddings were given but features='probs'; pass "
            "features='probs+pooled' to use them"
        )
    n_pooled = pooled.shape[1] if pooled is not None else 0
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="fusion-stack-")) / f"stack-{stacker}"
    out = Path(out)
    for r in inp.runs:
        if out.resolve() == r.path.resolve():
            raise StackError(
                f"--out {str(out)!r} is the source run {_label(r)}; choose another directory"
            )

    client = None
    if dask is not None:
        client = _dask_client(dask)
    try:
        probe = create_stacker(stacker, n_classes=inp.k, params=params, seed=seed, client=client)
        return _stack(
            inp,
            probe,
            stacker=stacker,
            features=features,
            params=params,
            seed=seed,
            out=out,
            client=client,
            pooled=pooled,
            n_pooled=n_pooled,
            say=say,
        )
    finally:
        if client is not None:
            client.close()


def _dask_client(address: str) -> Any:
    try:
        from distributed import Client
    except ImportError:
        raise StackError(
            "dask=... needs dask.distributed; install it with pip install 'embedstore-fusion[dask]'"
        ) from None
    try:
        return Client(address, timeout=DASK_CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise StackError(
            f"cannot reach the Dask scheduler at {address!r} ({e}); start one "
            "(`dask scheduler` + `dask worker`) or drop --dask"
        ) from None


def _features(
    inp: _Inputs, log: bool, pooled: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    def tf(p: np.ndarray) -> np.ndarray:
        p = p.astype(np.float64)
        return np.log(np.clip(p, 1e-7, 1.0)) if log else p

    X_tr = np.hstack([tf(b) for b in inp.oof])  # (N_trainable, M*K)
    X_ho = np.hstack([tf(b) for b in inp.hold])  # (N_holdout, M*K)
    names = [f"{n}:{c}" for n in inp.names for c in inp.classes]
    if pooled is not None:
        X_tr = np.hstack([X_tr, pooled[inp.trainable]])
        X_ho = np.hstack([X_ho, pooled[inp.holdout]])
        names += [f"pooled:{j}" for j in range(pooled.shape[1])]
    return X_tr, X_ho, names


def _stack(
    inp: _Inputs,
    probe: Any,
    *,
    stacker: str,
    features: str,
    params: dict[str, Any] | None,
    seed: int,
    out: Path,
    client: Any,
    pooled: np.ndarray | None,
    n_pooled: int,
    say: Callable[[str], None],
) -> Run:
    X, X_ho, feature_names = _features(inp, probe.log_probs, pooled)
    y = inp.labels[inp.trainable]  # (N_trainable,)
    y_ho = inp.labels[inp.holdout]  # (N_holdout,), -1 = unlabelled
    fold_of = inp.assignment[inp.trainable]
    k = inp.k
    attribution = probe.explain
    group = _group_matrix(len(inp.runs), k, n_pooled)
    oof = np.zeros((len(y), k))
    contrib_oof = np.zeros((len(y), group.shape[1]))
    cv: dict[str, np.ndarray] = {}
    fold_metrics: list[dict[str, Any]] = []
    models: list[tuple[str, Any]] = []
    train_seconds = 0.0
    t_all = time.perf_counter()

    def new() -> Any:
        return create_stacker(stacker, n_classes=k, params=params, seed=seed, client=client)

    for f in range(inp.n_folds):
        scored = np.flatnonzero(fold_of == f)
        if len(scored) == 0:
            continue
        train = np.flatnonzero(fold_of != f)
        t0 = time.perf_counter()
        model = new()
        if model.uses_early_stopping:
            fit, valid = _inner_split(train, y, model.valid_fraction, seed + f)
            model.fit(X[fit], y[fit], X[valid], y[valid])
        else:
            fit, valid = train, train[:0]
            model.fit(X[fit], y[fit])
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        oof[scored] = model.predict_proba(X[scored])
        pred = oof[scored].argmax(1)
        if attribution:
            contrib_oof[scored] = model.contributions(X[scored], pred) @ group
        cv[f"fold{f}_fit"] = inp.trainable[fit]
        cv[f"fold{f}_valid"] = inp.trainable[valid]
        cv[f"fold{f}_scored"] = inp.trainable[scored]
        s = _scores(y[scored], pred, k)
        fold_metrics.append(
            {
                "fold": f,
                "n_fit": len(fit),
                "n_valid": len(valid),
                "n_scored": len(scored),
                "accuracy": s["accuracy"],
                "macro_f1": s["macro_f1"],
                "best_iteration": model.best_iteration,
                "seconds": round(seconds, 4),
            }
        )
        models.append((f"fold{f}", model))
        say(
            f"fold {f + 1}/{inp.n_folds}: fit {len(fit)} rows (+{len(valid)} early-stopping), "
            f"scored {len(scored)}, macro-F1 {s['macro_f1']:.4f} ({seconds:.1f} s)"
        )

    # Refit on every trainable row for the median best round count of the fold models.
    rounds = None
    if probe.uses_early_stopping:
        rounds = max(1, int(round(statistics.median(m["best_iteration"] for m in fold_metrics))))
    t0 = time.perf_counter()
    final = new()
    final.fit(X, y, rounds=rounds)
    seconds = time.perf_counter() - t0
    train_seconds += seconds
    hold = final.predict_proba(X_ho) if len(X_ho) else np.zeros((0, k))
    pred_ho = hold.argmax(1) if len(hold) else np.zeros(0, dtype=np.int64)
    contrib_ho = (
        final.contributions(X_ho, pred_ho) @ group
        if attribution and len(X_ho)
        else np.zeros((len(X_ho), group.shape[1]))
    )
    cv["refit_fit"] = inp.trainable.copy()
    cv["refit_scored"] = inp.holdout.copy()
    models.append(("refit", final))
    say(
        f"refit on {len(y)} rows for {rounds or final.best_iteration} rounds, scored "
        f"{len(X_ho)} holdout rows ({seconds:.1f} s)"
    )

    # -- write ------------------------------------------------------------------------------
    oof32 = oof.astype(np.float32)
    hold32 = hold.astype(np.float32)
    pred_oof = oof.argmax(1)
    s_oof = _scores(y, pred_oof, k)
    s_ho = _scores(y_ho, pred_ho, k)
    sources = []
    for name, r, b, h in zip(inp.names, inp.runs, inp.oof, inp.hold, strict=True):
        so, sh = _scores(y, b.argmax(1), k), _scores(y_ho, h.argmax(1), k)
        sources.append(
            {
                "name": name,
                "path": str(r.path.resolve()),
                "head": r.head,
                "kind": r.config.get("kind"),
                "modalities": _modalities(r),
                "fingerprint": _fingerprint(b, h),
                "accuracy": so["accuracy"],
                "macro_f1": so["macro_f1"],
                "holdout": {"accuracy": sh["accuracy"], "macro_f1": sh["macro_f1"]},
            }
        )
    from sklearn.metrics import f1_score

    head = f"stack-{stacker}"
    model_params = {**probe.params, **probe.procedure_params()}
    config: dict[str, Any] = {
        "kind": "stack",
        "head": head,
        "name": out.name,
        "stacker": stacker,
        "features": features,
        "feature_names": feature_names,
        "n_pooled": n_pooled,
        "params": model_params,
        "user_params": dict(params or {}),
        "seed": seed,
        "dask": client is not None,
        "sources": sources,
        "modalities": sorted({m for s in sources for m in s["modalities"]}),
        "store": inp.store,
        "classes": inp.classes,
        "folds": inp.folds,
        "labels": inp.labels.tolist(),
    }
    metrics: dict[str, Any] = {
        "head": head,
        "kind": "stack",
        "stacker": stacker,
        "accuracy": s_oof["accuracy"],
        "macro_f1": s_oof["macro_f1"],
        "per_class_f1": f1_score(
            y, pred_oof, average=None, labels=np.arange(k), zero_division=0
        ).tolist(),
        "holdout": {"accuracy": s_ho["accuracy"], "macro_f1": s_ho["macro_f1"], "n": s_ho["n"]},
        "folds": fold_metrics,
        "refit": {"rounds": rounds or final.best_iteration, "seconds": round(seconds, 4)},
        "train_seconds": round(train_seconds, 4),
        "total_seconds": round(time.perf_counter() - t_all, 4),
        "sources": sources,
        "attribution": (
            {
                "method": "treeshap",
                "file": "contributions.csv",
                "target": "margin of the predicted class",
            }
            if attribution
            else {
                "method": None,
                "reason": (
                    f"{stacker} has no TreeSHAP; contributions are written only by the "
                    "lightgbm and xgboost stackers"
                    if not probe.attribution
                    else "explain=false was set"
                ),
            }
        ),
    }
    group_names = list(inp.names) + (["pooled"] if n_pooled else []) + ["bias"]
    with RunWriter(out) as w:
        w.write_json("config.json", config)
        w.write_json("metrics.json", metrics)
        w.write_array("oof", oof32)
        w.write_array("oof_rows", inp.trainable.astype(np.int64))
        w.write_array("holdout", hold32)
        w.write_array("holdout_rows", inp.holdout.astype(np.int64))
        np.savez(w.file("cv_indices.npz"), **cv)
        rows = np.concatenate([inp.trainable, inp.holdout])
        all_probs = np.vstack([oof32, hold32]) if len(hold32) else oof32
        splits = ["oof"] * len(y) + ["holdout"] * len(y_ho)
        folds = fold_of.tolist() + [-1] * len(y_ho)
        true = [inp.classes[v] if v >= 0 else "" for v in inp.labels[rows]]
        w.write_predictions([inp.ids[i] for i in rows], splits, folds, true, all_probs, inp.classes)
        if attribution:
            contrib = np.vstack([contrib_oof, contrib_ho])
            preds = np.concatenate([pred_oof, pred_ho])
            with w.file("contributions.csv").open("w", newline="") as fh:
                cw = csv.writer(fh)
                cw.writerow(["id", "split", "fold", "true", "predicted", *group_names])
                for i, row in enumerate(rows):
                    cw.writerow(
                        [
                            inp.ids[row],
                            splits[i],
                            folds[i],
                            true[i],
                            inp.classes[preds[i]],
                            *(f"{v:.9g}" for v in contrib[i]),
                        ]
                    )
        for tag, m in models:
            m.save(w.file(f"weights/{tag}"))
        path = w.finish()
    run = load_run(path)
    run.extra["cv_indices"] = cv
    return run


# ---------------------------------------------------------------------------------------------
# attribution summaries
# ---------------------------------------------------------------------------------------------
def _read_contributions(run_dir: str | os.PathLike) -> tuple[Run, list[str], list[dict]]:
    run = load_run(run_dir)
    f = run.path / "contributions.csv"
    if not f.exists():
        reason = (run.metrics.get("attribution") or {}).get("reason") or "not a GBDT stack"
        raise StackError(
            f"{str(run.path)!r} has no contributions.csv ({reason}); use "
            "--stacker lightgbm or xgboost for per-run attribution"
        )
    with f.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    groups = [s["name"] for s in run.config.get("sources", [])]
    if run.config.get("n_pooled"):
        groups.append("pooled")
    return run, groups, rows


def summarize_contributions(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Which source run drove each decision of a GBDT stack.

    Returns ``mean_abs`` (mean |TreeSHAP| per source run, overall and ``by_split``),
    ``decided_by`` (how often each run made the largest positive contribution to the predicted
    class) and ``non_text_decided``: the items whose deciding run is not a text-only run.
    """
    run, groups, rows = _read_contributions(run_dir)
    if not rows:
        raise StackError(f"{str(run.path)!r}: contributions.csv is empty")
    values = np.array([[float(r[g]) for g in groups] for r in rows])  # (N, G)
    splits = np.array([r["split"] for r in rows])
    mods = {s["name"]: s.get("modalities", []) for s in run.config.get("sources", [])}
    text_runs = [n for n, m in mods.items() if list(m) == ["text"]]
    top = values.argmax(1)
    non_text = []
    for i in np.flatnonzero([groups[t] in mods and groups[t] not in text_runs for t in top]):
        r = rows[i]
        non_text.append(
            {
                "id": r["id"],
                "split": r["split"],
                "true": r["true"],
                "predicted": r["predicted"],
                "run": groups[top[i]],
                "contribution": float(values[i, top[i]]),
            }
        )
    return {
        "n_items": len(rows),
        "runs": groups,
        "text_runs": text_runs,
        "mean_abs": {g: float(np.abs(values[:, j]).mean()) for j, g in enumerate(groups)},
        "by_split": {
            s: {g: float(np.abs(values[splits == s, j]).mean()) for j, g in enumerate(groups)}
            for s in sorted(set(splits.tolist()))
        },
        "decided_by": {g: int((top == j).sum()) for j, g in enumerate(groups)},
        "non_text_decided": non_text,
    }


def plot_contributions(run_dir: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Bar chart of mean |TreeSHAP contribution| per source run and split (PNG, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = summarize_contributions(run_dir)
    groups = summary["runs"]
    splits = list(summary["by_split"])
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) + 2), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(splits))
    x = np.arange(len(groups))
    for i, s in enumerate(splits):
        ax.bar(
            x + i * width - 0.4 + width / 2,
            [summary["by_split"][s][g] for g in groups],
            width,
            label=s,
        )
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel("mean |contribution| (margin)")
    ax.set_title(f"{load_run(run_dir).head}: which run drives the prediction")
    ax.legend()
    fig.tight_layout()
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return png


# ---------------------------------------------------------------------------------------------
# synthetic inputs and the benchmark
# ---------------------------------------------------------------------------------------------
def make_synthetic_runs(
    out_dir: str | os.PathLike,
    *,
    n_items: int = 600,
    n_classes: int = 6,
    n_runs: int = 3,
    n_folds: int = 5,
    holdout: float = 0.2,
    seed: int = 0,
) -> list[Path]:
    """Write ``n_runs`` fake `fusion train` runs sharing one fake store: a "text" run confident on
    the first half of the classes, an "image" run confident on the other half, a "fusion" run
    moderately good everywhere (and more "fusion-i" runs with random per-class skill). Used by
    the tests, the docs and :func:`bench_stackers`."""
    if n_runs < 2:
        raise StackError(f"n_runs={n_runs}: need at least 2 runs to stack")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_items) % n_classes)
    assignment = np.empty(n_items, dtype=np.int64)
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_ho = int(round(holdout * len(idx)))
        assignment[idx[:n_ho]] = -1
        assignment[idx[n_ho:]] = np.arange(len(idx) - n_ho) % n_folds
    classes = [f"c{c}" for c in range(n_classes)]
    store = {
        "url": f"synthetic://{n_items}x{n_classes}/{seed}",
        "fingerprint": f"synthetic-{n_items}-{n_classes}-{seed}",
        "folds_fingerprint": f"synthetic-folds-{n_folds}-{holdout}-{seed}",
    }
    folds = {"k": n_folds, "assignment": assignment.tolist(), "seed": seed, "holdout": holdout}
    half = np.arange(n_classes) < n_classes // 2
    skills = [
        ("text", ["text"], np.where(half, 4.0, 0.3)),
        ("image", ["image"], np.where(half, 0.3, 3.5)),
        ("fusion", ["image", "text"], np.full(n_classes, 1.6)),
    ]
    for i in range(3, n_runs):
        skills.append((f"fusion-{i - 2}", ["image", "text"], rng.uniform(0.5, 2.5, n_classes)))
    out = Path(out_dir)
    paths = []
    trainable = np.flatnonzero(assignment >= 0)
    hold_rows = np.flatnonzero(assignment == -1)
    for name, mods, skill in skills[:n_runs]:
        logits = rng.normal(0.0, 1.0, (n_items, n_classes))
        logits[np.arange(n_items), labels] += skill[labels]
        z = np.exp(logits - logits.max(1, keepdims=True))
        probs = (z / z.sum(1, keepdims=True)).astype(np.float32)
        head = name if name in ("text", "image") else "concat"
        with RunWriter(out / name) as w:
            w.write_json(
                "config.json",
                {
                    "kind": "train",
                    "head": head,
                    "name": name,
                    "modalities": mods,
                    "store": store,
                    "classes": classes,
                    "folds": folds,
                    "labels": labels.tolist(),
                },
            )
            acc = float((probs[trainable].argmax(1) == labels[trainable]).mean())
            w.write_json("metrics.json", {"head": head, "kind": "train", "accuracy": acc})
            w.write_array("oof", probs[trainable])
            w.write_array("oof_rows", trainable)
            w.write_array("holdout", probs[hold_rows])
            w.write_array("holdout_rows", hold_rows)
            rows = np.concatenate([trainable, hold_rows])
            w.write_predictions(
                [f"item-{i:05d}" for i in rows],
                ["oof"] * len(trainable) + ["holdout"] * len(hold_rows),
                assignment[rows].tolist(),
                [classes[c] for c in labels[rows]],
                probs[rows],
                classes,
            )
            paths.append(w.finish())
    return paths


def bench_stackers(
    n_items: int = 10_000,
    n_runs: int = 5,
    n_classes: int = 27,
    repeats: int = 3,
    stackers: Sequence[str] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every stacker on a synthetic problem (5 folds + refit, default params, 2 threads).

    One dict per stacker: ``median_seconds`` is the wall time of one whole :func:`stack` call
    (5 fold fits + refit + prediction + attribution + writing), ``median_fit_seconds`` its
    model-fitting part, both medians over ``repeats`` runs.
    """
    if repeats < 1:
        raise StackError(f"repeats={repeats}: need at least 1")
    say = progress or (lambda _msg: None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        srcs = make_synthetic_runs(
            Path(tmp) / "runs", n_items=n_items, n_classes=n_classes, n_runs=n_runs, seed=0
        )
        best_src = max(load_run(p).metrics.get("accuracy", 0.0) for p in srcs)
        for name in stackers or list_stackers():
            walls, fits, run = [], [], None
            for i in range(repeats):
                t0 = time.perf_counter()
                run = stack(
                    srcs,
                    stacker=name,
                    seed=0,
                    out=Path(tmp) / f"{name}-{i}",
                    params=(params or {}).get(name),
                )
                walls.append(time.perf_counter() - t0)
                fits.append(run.metrics["train_seconds"])
                say(
                    f"{name} #{i + 1}: {walls[-1]:.1f} s (fit {fits[-1]:.1f} s), holdout "
                    f"macro-F1 {run.metrics['holdout']['macro_f1']:.4f}"
                )
            assert run is not None  # repeats >= 1
            rows.append(
                {
                    "stacker": name,
                    "n_items": n_items,
                    "n_runs": n_runs,
                    "n_classes": n_classes,
                    "n_folds": len(run.metrics["folds"]),
                    "repeats": repeats,
                    "median_seconds": round(statistics.median(walls), 3),
                    "median_fit_seconds": round(statistics.median(fits), 3),
                    "all_seconds": [round(s, 3) for s in walls],
                    "rounds": [m["best_iteration"] for m in run.metrics["folds"]],
                    "oof_macro_f1": run.metrics["macro_f1"],
                    "holdout_macro_f1": run.metrics["holdout"]["macro_f1"],
                    "best_source_oof_accuracy": best_src,
                    "best_source_holdout_macro_f1": max(
                        s["holdout"]["macro_f1"] for s in run.metrics["sources"]
                    ),
                }
            )
    return rows
