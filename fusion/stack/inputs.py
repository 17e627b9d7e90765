"""A stack's inputs: load the source runs, check that they can be combined, align their rows.

Every refusal is one :class:`~fusion.errors.StackError` naming the run and the fix
(docs/stacking.md lists them). Rows are aligned by store row index (``oof_rows.npy``,
``holdout_rows.npy``), never by file position.

Runs may store dense or top-k probabilities (docs/runs.md section 2.3), mixed freely: each
block stays in its run's layout here (``run.probs(split)``). :func:`feature_matrix` (the
per-class stackers) expands top-k blocks to dense columns, refused in one line past
:data:`DENSE_FEATURES_MAX_BYTES`; :func:`candidate_matrix` (the candidate stacker) reads only
each run's top k, ranking a dense block in blocks of rows, so no N x K array is built for it.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..compat import check_same_split, label
from ..config import TOP_K_STORE
from ..errors import StackError
from ..probs import Probs, TopK, topk_of
from ..rundir import Run, load_run

__all__ = ["DENSE_FEATURES_MAX_BYTES", "PROB_FLOOR", "ROW_SUM_TOL", "StackInputs",
           "candidate_columns", "candidate_matrix", "feature_matrix", "input_block", "fingerprint",
           "label", "modalities", "same_probs"]

ROW_SUM_TOL = 1e-3
# the largest (N, runs x K) float64 matrix the per-class stackers may build (the candidate
# stacker never builds one)
DENSE_FEATURES_MAX_BYTES = 4 * 2**30
# columns of contributions.csv that a source run's name must not shadow
_RESERVED = {"id", "split", "fold", "true", "predicted", "bias", "pooled", "shared"}


def modalities(run: Run) -> list[str]:
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
    if run.head in ("text", "image"):
        return [run.head]
    return ["image", "text"]


def fingerprint(*arrays: Probs) -> str:
    """16 hex digits identifying the float32 values of ``arrays`` (a top-k block: its indices,
    probabilities and rest)."""
    h = hashlib.sha256()
    for a in arrays:
        parts = (a.idx, a.p, a.rest) if isinstance(a, TopK) else (a,)
        for x in parts:
            h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def same_probs(a: Probs, b: Probs) -> bool:
    """Whether two blocks hold identical probabilities (in the same layout)."""
    if isinstance(a, TopK) or isinstance(b, TopK):
        return isinstance(a, TopK) and a.equals(b)
    return np.array_equal(a, b)


def _check_topk(run: Run, t: TopK, which: str, k: int) -> TopK:
    if t.n_classes != k or t.idx.ndim != 2 or t.p.shape != t.idx.shape:
        raise StackError(f"run {label(run)}: {which}.topk.npz holds {t.n_classes} classes "
                         f"(idx {t.idx.shape}), expected {k}; re-run it")
    if len(t) and (t.idx.min() < 0 or t.idx.max() >= k):
        raise StackError(f"run {label(run)}: {which}.topk.npz has class indices outside "
                         f"[0, {k}); re-run it")
    p = t.p.astype(np.float32)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(t.rest))) or (
            p.size and min(p.min(), t.rest.min()) < -ROW_SUM_TOL):
        raise StackError(f"run {label(run)}: {which}.topk.npz holds NaN/inf or negative "
                         "values; re-run it")
    sums = t.sums()
    bad = np.abs(sums - 1.0) > ROW_SUM_TOL
    if bad.any():
        i = int(np.argmax(bad))
        raise StackError(f"run {label(run)}: {int(bad.sum())} rows of {which}.topk.npz do not "
                         f"sum to 1 with their rest (row {i} sums to {sums[i]:.4f}); re-run it")
    return t


def _check_block(run: Run, arr: Probs, which: str, k: int) -> Probs:
    if isinstance(arr, TopK):
        return _check_topk(run, arr, which, k)
    if arr.size == 0 and which == "holdout":  # a store without a holdout
        return arr.reshape(0, k)
    if arr.ndim != 2 or arr.shape[1] != k:
        raise StackError(
            f"run {label(run)}: {which}.npy has shape {arr.shape}, expected "
            f"(N, {k}) for its {k} classes; re-run it"
        )
    if not np.all(np.isfinite(arr)) or (arr.size and arr.min() < -ROW_SUM_TOL):
        raise StackError(
            f"run {label(run)}: {which}.npy holds NaN/inf or negative values; "
            "stack probabilities, not logits"
        )
    sums = arr.sum(1, dtype=np.float64)
    bad = np.abs(sums - 1.0) > ROW_SUM_TOL
    if bad.any():
        i = int(np.argmax(bad))
        raise StackError(
            f"run {label(run)}: {int(bad.sum())} rows of {which}.npy do not sum to 1 (row {i} "
            f"sums to {sums[i]:.4f}); a block summing to 2 is two models' probabilities aliased "
            "into one, logits need a softmax; fix the run that wrote it"
        )
    return arr


def _aligned(run: Run, block: Probs, rows: np.ndarray, expected: np.ndarray,
             which: str) -> Probs:
    """``block`` reordered so that its row i is store row ``expected[i]`` (refusing gaps,
    extras and repeats)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(block) != len(rows):
        raise StackError(
            f"run {label(run)}: {which}.npy and {which}_rows.npy differ in length; re-run it"
        )
    if len(np.unique(rows)) != len(rows):
        raise StackError(f"run {label(run)}: {which}_rows.npy repeats store rows; re-run it")
    if not np.array_equal(np.sort(rows), expected):
        missing = np.setdiff1d(expected, rows)
        extra = np.setdiff1d(rows, expected)
        what = "trainable (fold >= 0)" if which == "oof" else "holdout (fold -1)"
        raise StackError(
            f"run {label(run)}: its {which} rows do not match the store's {len(expected)} "
            f"{what} rows ({len(missing)} missing e.g. {missing[:3].tolist()}, {len(extra)} "
            f"extra e.g. {extra[:3].tolist()}); re-train it with `fusion train` on this store"
        )
    return block[np.argsort(rows, kind="stable")]


def _item_ids(run: Run, n_store: int) -> list[str]:
    """Item id per store row: config "ids" if present, else the run's predictions.csv (whose rows
    follow oof_rows then holdout_rows, as `fusion.rundir.write_run` writes them), else the row
    index."""
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


def _load(runs: Sequence[str | os.PathLike | Run]) -> list[Run]:
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
            raise StackError(f"run {label(r)} is given twice; each source run may appear once")
        if (p / "DONE").exists():  # an in-memory Run (train(out=None)) has no directory
            seen.add(p)
        missing = [k for k in ("store", "classes", "folds", "labels") if k not in r.config]
        if missing or not r.store_fingerprint or not r.folds_fingerprint:
            raise StackError(
                f"run {label(r)}: config.json lacks {missing or ['store']} "
                "(store fingerprints, classes, folds, labels); only runs "
                "written by `fusion train`/`fusion stack` can be stacked"
            )
    return loaded


class StackInputs:
    """The checked, aligned inputs of one stack.

    ``oof[i]`` (N_trainable, K) and ``hold[i]`` (N_holdout, K) are run i's probabilities in
    store-row order of ``trainable`` / ``holdout``, each a dense array or a
    :class:`fusion.probs.TopK` as the run stored it; ``labels``, ``assignment`` and ``ids`` are
    indexed by store row; ``names`` are the runs' unique names (the feature-group names).
    """

    def __init__(self, runs: Sequence[str | os.PathLike | Run]):
        self.runs = _load(runs)
        ref = self.runs[0]
        for r in self.runs[1:]:
            check_same_split(ref, r)
        self.classes = list(ref.classes)
        self.k = len(self.classes)
        self.store = dict(ref.config["store"])
        self.folds = dict(ref.config["folds"])
        self.assignment = np.asarray(self.folds.get("assignment", []), dtype=np.int64)
        self.labels = np.asarray(ref.config["labels"], dtype=np.int64)
        self.n_folds = int(self.folds.get("k", 0))
        if self.assignment.ndim != 1 or len(self.assignment) != len(self.labels):
            raise StackError(
                f"run {label(ref)}: folds.assignment ({self.assignment.shape}) and "
                f"labels ({self.labels.shape}) must be one entry per store row"
            )
        if self.n_folds < 2 or self.assignment.max(initial=-1) >= self.n_folds:
            raise StackError(
                f"run {label(ref)}: folds.k={self.n_folds} does not fit the fold "
                f"assignment (max {self.assignment.max(initial=-1)}); re-run it"
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
        self.oof = [
            _aligned(r, _check_block(r, r.probs("oof"), "oof", self.k), r.oof_rows,
                     self.trainable, "oof")
            for r in self.runs
        ]
        self.hold = [
            _aligned(r, _check_block(r, r.probs("holdout"), "holdout", self.k), r.holdout_rows,
                     self.holdout, "holdout")
            for r in self.runs
        ]
        for i in range(len(self.runs)):
            for j in range(i):
                if same_probs(self.oof[i], self.oof[j]) and same_probs(
                    self.hold[i], self.hold[j]
                ):
                    raise StackError(
                        f"runs {label(self.runs[j])} and {label(self.runs[i])} hold "
                        "identical probabilities (a copied run?); drop one"
                    )
        self.names = _unique_names([r.name for r in self.runs])
        # Each fold model's holdout probabilities (docs/runs.md section 2.7), aligned like
        # ``hold``: used only when every run has them for every fold, else None (older runs).
        self.lacking_holdout_folds = [
            r.name for r in self.runs
            if r.holdout_folds is None or r.holdout_folds.shape[0] != self.n_folds
        ]
        self.hold_folds: list[list[Probs]] | None = None  # [run][fold] (N_holdout, K) blocks
        if not self.lacking_holdout_folds and len(self.holdout):
            self.hold_folds = [
                [
                    _aligned(r, _check_block(r, _fold(r.probs("holdout_folds"), f),
                                             f"holdout_folds[{f}]", self.k),
                             r.holdout_rows, self.holdout, "holdout")
                    for f in range(self.n_folds)
                ]
                for r in self.runs
            ]

    @property
    def source_k(self) -> int:
        """The k of the candidate stacker's inputs: the smallest stored k of the top-k runs
        (:data:`fusion.config.TOP_K_STORE` when every run is dense), at most K."""
        ks = [b.k for b in self.oof if isinstance(b, TopK)]
        return min([*ks, self.k] if ks else [TOP_K_STORE, self.k])

    def check_pooled(self, features: str, pooled: np.ndarray | None) -> np.ndarray | None:
        """The pooled embeddings (N_store, D) as float64 when ``features`` asks for them."""
        if features != "probs+pooled":
            if pooled is not None:
                raise StackError(
                    "pooled embeddings were given but features='probs'; pass "
                    "features='probs+pooled' to use them"
                )
            return None
        if pooled is None:
            raise StackError(
                "features='probs+pooled' needs the pooled embeddings (N_store, D); "
                "the CLI reads them from the store with --pooled FEATURE_SET"
            )
        pooled = np.asarray(pooled, dtype=np.float64)
        n_store = len(self.labels)
        if pooled.ndim != 2 or len(pooled) != n_store or not np.all(np.isfinite(pooled)):
            raise StackError(
                f"pooled has shape {pooled.shape}, expected finite ({n_store}, D): "
                "one row per store row"
            )
        return pooled


PROB_FLOOR = 1e-7  # log-probability inputs clip probabilities here first


def input_block(p: Probs, log: bool) -> np.ndarray:
    """One source run's K stacker columns from its (N, K) probabilities: float64, and
    log-probabilities (clipped at ``PROB_FLOOR``) when ``log``. The one rule for fitting a stack
    and for applying it to new items (`fusion predict`). A top-k block is expanded to K columns
    (the rest spread evenly over the classes it did not keep)."""
    p = (p.dense() if isinstance(p, TopK) else p).astype(np.float64)
    return np.log(np.clip(p, PROB_FLOOR, 1.0)) if log else p


def _fold(holdout_folds: Probs, f: int) -> Probs:
    """Fold ``f``'s (N_holdout, K) block of a run's holdout_folds (read from the memory map)."""
    return holdout_folds[f] if isinstance(holdout_folds, TopK) else np.asarray(holdout_folds[f])


def feature_matrix(
    inp: StackInputs, log: bool, pooled: np.ndarray | None, stacker: str = "?"
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """``(X_trainable, X_holdout, feature_names, X_holdout_folds)``: one block of K columns per
    run, in run order (log-probabilities clipped at 1e-7 when ``log``), then the ``pooled``
    columns. ``X_holdout_folds`` (F, N_holdout, columns) is the same for each fold model's
    holdout probabilities, or None when a run lacks them. Top-k blocks are expanded to K
    columns; a matrix past :data:`DENSE_FEATURES_MAX_BYTES` is refused in one line naming the
    candidate stacker."""
    n = len(inp.trainable) + len(inp.holdout) * (1 + (inp.n_folds if inp.hold_folds else 0))
    need = n * len(inp.runs) * inp.k * 8
    if need > DENSE_FEATURES_MAX_BYTES:
        raise StackError(
            f"stacker {stacker!r} needs a dense (N, runs x K) = ({n}, {len(inp.runs)} x "
            f"{inp.k}) feature matrix of {need / 2**30:.1f} GiB (limit "
            f"{DENSE_FEATURES_MAX_BYTES / 2**30:.0f} GiB); use --stacker candidate, whose cost "
            "does not grow with K (or the default, auto, which picks it at this K)")

    def tf(p: np.ndarray) -> np.ndarray:
        return input_block(p, log)

    X_tr = np.hstack([tf(b) for b in inp.oof])  # (N_trainable, M*K)
    X_ho = np.hstack([tf(b) for b in inp.hold])  # (N_holdout, M*K)
    names = [f"{n}:{c}" for n in inp.names for c in inp.classes]
    if pooled is not None:
        X_tr = np.hstack([X_tr, pooled[inp.trainable]])
        X_ho = np.hstack([X_ho, pooled[inp.holdout]])
        names += [f"pooled:{j}" for j in range(pooled.shape[1])]
    X_hf = None
    if inp.hold_folds is not None:
        X_hf = np.stack([
            np.hstack([tf(b[f]) for b in inp.hold_folds]
                      + ([pooled[inp.holdout]] if pooled is not None else []))
            for f in range(inp.n_folds)
        ])
    return X_tr, X_ho, names, X_hf


def candidate_columns(blocks: Sequence[Probs], k: int) -> np.ndarray:
    """The candidate stacker's input from the source runs' (N, K) blocks, in run order:
    (N, runs x (2k + 1)) float32, per run its top-k class indices (exact in float32 below 2**24
    classes), their probabilities and the rest; dense blocks ranked in blocks of rows. The one
    rule for fitting a candidate stack and for applying it to new items."""
    parts = []
    for b in blocks:
        idx, p = topk_of(b, k)
        rest = np.clip(1.0 - p.astype(np.float64).sum(1), 0.0, None)
        parts += [idx.astype(np.float32), p.astype(np.float32), rest[:, None].astype(np.float32)]
    return np.hstack(parts) if parts else np.zeros((0, 0), np.float32)


def candidate_matrix(inp: StackInputs, k: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """The candidate stacker's input, shaped like :func:`feature_matrix`'s: per run the top
    ``k`` (default :attr:`StackInputs.source_k`) class indices, probabilities and the rest,
    (N, runs x (2k + 1)) float32, never an N x K array."""
    k = min(k or inp.source_k, inp.k)
    X_tr, X_ho = candidate_columns(inp.oof, k), candidate_columns(inp.hold, k)
    names = [f"{n}:{what}" for n in inp.names
             for what in [*(f"idx{j}" for j in range(k)), *(f"p{j}" for j in range(k)), "rest"]]
    X_hf = None
    if inp.hold_folds is not None:
        X_hf = np.stack([candidate_columns([b[f] for b in inp.hold_folds], k)
                         for f in range(inp.n_folds)])
    return X_tr, X_ho, names, X_hf
