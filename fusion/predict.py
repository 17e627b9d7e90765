"""`fusion predict`: apply a finished head run to items of a store.

A head run keeps one model per (seed, fold) in ``weights/``; the prediction for an item is the
mean of their softmax outputs, exactly how the run's ``holdout.npy`` was made, so predicting a
run's own holdout rows reproduces its holdout probabilities. Before any work the run's feature
identity (what it was trained on: feature-set name, encoder weights, layers, preprocessing,
widths) is compared with the store's sets, and a head that is user code (a file, a module, an
entry point) is refused unless the caller trusts it (``trust_code``, the convention of
transformers' ``trust_remote_code``). Weights are safetensors: loading never unpickles.

A stack run is applied the way it scored its own holdout: its source runs are predicted first
(per fold model for the ``per_fold`` scheme), then its saved stackers
(:mod:`fusion.stack.apply`). Fine-tuned runs are refused with one line (their encoders are
part of the model: export a bundle, docs/runs.md §3).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from embedstore import Store, open_store
from embedstore.identity import feature_identity

from .batch import Batch
from .device import resolve_device, torch_threads
from .errors import FusionError
from .heads import create_head
from .heads.registry import HEADS
from .probs import TOPK, Probs, TopK, block_rows, layout_for, mean_topk, to_topk, topk_of
from .rundir import Run, load_run
from .stack.apply import PER_FOLD, apply_stack, holdout_scheme, load_stack_models, source_path

__all__ = ["PredictError", "Predictions", "ROW_CHOICES", "DEFAULT_TOP_K", "predict",
           "select_rows", "check_features", "feature_record", "is_builtin_head",
           "load_fold_models", "run_head_config", "weight_files", "mean_probs", "fold_of"]

ROW_CHOICES = ("all", "unlabelled", "holdout")
DEFAULT_TOP_K = 5


class PredictError(FusionError, ValueError):
    """A run cannot be applied to these items (the message names the value and the fix)."""


@dataclass
class Predictions:
    """A run's probabilities for some store rows: dense (N, K) float32 up to
    ``DENSE_MAX_CLASSES`` classes (the run layout rule), else a :class:`~fusion.probs.TopK` block (the ``keep``
    largest per row and the remaining mass: never an N x K array at the papers' K)."""

    ids: np.ndarray  # (N,) the items' ids
    rows: np.ndarray  # (N,) their store rows
    probs: Probs  # (N, K) float32 rows summing to 1, or TopK
    classes: list[Any]

    def top_k(self, k: int = DEFAULT_TOP_K) -> tuple[np.ndarray, np.ndarray]:
        """(class indices (N, k), probabilities (N, k)), most probable first (k at most the
        number kept by a top-k block)."""
        if isinstance(self.probs, TopK):
            return topk_of(self.probs, k)
        k = min(k, self.probs.shape[1])
        idx = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(self.probs, idx, 1)

    def write_csv(self, path: str | os.PathLike, k: int = DEFAULT_TOP_K) -> Path:
        """``id, class_1, prob_1, ..., class_k, prob_k`` (one row per item)."""
        idx, p = self.top_k(k)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        with tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id"] + [f"{c}_{j}" for j in range(1, idx.shape[1] + 1)
                                 for c in ("class", "prob")])
            for i in range(len(self.ids)):
                w.writerow([self.ids[i]] + [v for j in range(idx.shape[1]) for v in
                                            (self.classes[idx[i, j]], f"{p[i, j]:.6f}")])
        tmp.replace(path)  # a reader never sees half a file
        return path


def is_builtin_head(spec: str) -> bool:
    """A head that ships with this package (registered in-process by ``fusion.heads``), as
    opposed to user code: a ``file.py:Class``, a ``module:Class`` or an entry point."""
    obj = HEADS.registered(spec) if ":" not in spec else None
    return obj is not None and getattr(obj, "__module__", "").startswith("fusion.heads.")


def check_features(run: Run, store: Store) -> dict[str, str | None]:
    """The store's feature set for each modality the run used, after comparing the identity
    recorded in the run with the store's, field by field (the first difference is the error)."""
    chosen: dict[str, str | None] = {"text": None, "image": None}
    for mod, rec in (run.config.get("features") or {}).items():
        if rec is None:
            continue
        name = rec["name"]
        if name not in store.features:
            raise PredictError(
                f"run {run.path.name!r} was trained on feature set {name!r}, which store "
                f"{store.url!r} lacks (it has {sorted(store.features)}); extract it with the "
                "run's encoder (its provenance is in the run's config.json)")
        fs = store.features[name]
        fs.require_complete()
        want = feature_identity({**rec, "modality": mod}, tuple(k for k in (
            "modality", "dim", "layers", "prefix_tokens", "preprocess", "encoder") if k in
            {**rec, "modality": mod}))
        have = feature_identity(feature_record(fs), tuple(want))
        for key, value in want.items():
            if have.get(key) != value:
                raise PredictError(
                    f"feature set {name!r} of store {store.url!r} differs from the one run "
                    f"{run.path.name!r} was trained on in {key!r}: run {_short(value)}, store "
                    f"{_short(have.get(key))}; predict on features extracted like the run's")
        chosen[mod] = name
    return chosen


def feature_record(fs: Any) -> dict[str, Any]:
    """What a run records of a feature set it trains on (config.json ``features``)."""
    return {"modality": fs.modality, "name": fs.name, "dim": fs.dim, "layers": fs.layers,
            "encoder": fs.encoder, "preprocess": fs.meta.get("preprocess"),
            "catalog": fs.meta.get("catalog"), "prefix_tokens": fs.prefix_tokens}


def _short(v: Any, n: int = 120) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + "..."


def select_rows(store: Store, rows: str | Sequence[int] | np.ndarray = "all",
                ids: Sequence[str] | None = None) -> np.ndarray:
    """Store rows to predict: ``ids`` (in that order), or ``rows``: "all", "holdout" (fold -1),
    "unlabelled" (no label: every row of a store without labels), or explicit row indices."""
    n = store.n_items
    if ids is not None:
        index = {v: i for i, v in enumerate(store.ids.tolist())}
        missing = [v for v in ids if v not in index]
        if missing:
            raise PredictError(f"{len(missing)} id(s) are not in store {store.url!r}, e.g. "
                               f"{missing[0]!r}; extract them into the store first")
        if len(set(ids)) != len(ids):
            raise PredictError("the ids to predict hold duplicates; list each item once")
        return np.array([index[v] for v in ids], np.int64)
    if not isinstance(rows, str):
        out = np.asarray(rows, np.int64)
        if out.size and (out.min() < 0 or out.max() >= n):
            raise PredictError(f"row {int(out.max())} is outside the store's {n} rows")
        if len(np.unique(out)) != len(out):
            raise PredictError("the rows to predict hold duplicates; list each row once")
        return out
    if rows == "all":
        return np.arange(n, dtype=np.int64)
    if rows == "holdout":
        return np.flatnonzero(store.folds == -1).astype(np.int64)
    if rows == "unlabelled":
        labels = store.labels
        return (np.arange(n, dtype=np.int64) if labels is None
                else np.flatnonzero(np.asarray(labels) < 0).astype(np.int64))
    raise PredictError(f"--rows {rows!r} is not one of {', '.join(ROW_CHOICES)}")


def load_fold_models(head_config: dict[str, Any], files: Sequence[Path], device: torch.device,
                     *, trust_code: bool, what: str) -> list[torch.nn.Module]:
    """The head of ``head_config`` ({"head", "dims", "options"}) once per weights file, in
    eval mode. A head that is user code is refused unless ``trust_code``."""
    spec = head_config["head"]
    if not trust_code and not is_builtin_head(spec):
        raise PredictError(
            f"{what} uses head {spec!r}, which is code outside this package; predicting would "
            "run it. Read it first, then pass --trust-code (trust_code=True)")
    if not files:
        raise PredictError(f"{what} has no weights/fold*.safetensors; it was trained without "
                           "an output directory or its weights were removed")
    models = []
    for f in files:
        model = create_head(spec, **head_config["dims"], **head_config.get("options", {}))
        model.load_state_dict(load_file(str(f)), strict=True)
        models.append(model.to(device).eval())
    return models


def run_head_config(run: Run) -> dict[str, Any]:
    """``{"head", "dims", "options"}`` of a head run (``config.head_config``)."""
    hc = dict(run.config.get("head_config") or {})
    hc.setdefault("head", run.config.get("head"))
    return hc


def weight_files(root: Path) -> list[Path]:
    """Every fold model's weights under ``root`` (``fold{i}`` or ``seed{s}/fold{i}``)."""
    return sorted(root.rglob("fold*.safetensors"))


def mean_probs(models: Sequence[torch.nn.Module], batch: Batch) -> torch.Tensor:
    """The mean of the models' softmax outputs (how a run's holdout.npy is made)."""
    return sum(torch.softmax(m(batch).float(), -1) for m in models) / len(models)


def fold_of(path: Path) -> int:
    """The fold index of a weights file ``fold{i}.safetensors`` (any seed directory)."""
    return int(path.stem.removeprefix("fold"))


def predict(run: Run | str | os.PathLike, store: Store | str | os.PathLike,
            rows: str | Sequence[int] | np.ndarray = "all", *, ids: Sequence[str] | None = None,
            batch_size: int = 256, device: str = "auto", threads: int | None = None,
            trust_code: bool = False, keep: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> Predictions:
    """The run's probabilities for ``rows`` (or ``ids``) of ``store``: a head run's fold models'
    mean, or a stack run applied to its source runs' predictions. Where a run would store
    top-k (:func:`fusion.probs.layout_for`: above ``DENSE_MAX_CLASSES`` classes) the result is
    top-k too (``keep`` per row, default ``TOP_K_STORE``), computed a block of rows at a time
    so no N x K array is held.
    ``progress(done, total)`` is called after each batch (total counts every head run's pass
    over the rows)."""
    run = run if isinstance(run, Run) else load_run(run)
    store = store if isinstance(store, Store) else open_store(store)
    sel = select_rows(store, rows, ids)
    classes = list(run.config["classes"])
    lay = layout_for(len(classes), keep)  # the runs' own rule: dense, or top-k above a K
    large = lay["layout"] == TOPK
    job = _Job(store, sel, batch_size, resolve_device(device), trust_code, progress)
    stacked = run.config.get("kind") == "stack"
    job.total = len(sel) * (_count_head_runs(run, job) if stacked else 1)
    # rows per block: one (rows, K) float32 block per fold model within BLOCK_BYTES
    step = block_rows(len(classes)) if large else max(1, len(sel))
    parts = []
    with torch_threads(threads):
        for s in range(0, max(1, len(sel)), step):
            job.sel = sel[s:s + step]
            if stacked:
                p = _stack_probs(run, job)
                p = to_topk(p, lay["k"]) if large and not isinstance(p, TopK) else p
            elif large:  # each fold model's top-k, then their mean: how a top-k run is made
                p = mean_topk([to_topk(f, lay["k"]) for f in _head_fold_probs(run, job)])
            else:
                p = _mean(_head_fold_probs(run, job))
            parts.append(p)
    probs = (parts[0] if len(parts) == 1 else
             TopK(*(np.concatenate([getattr(t, f) for t in parts]) for f in ("idx", "p", "rest")),
                  len(classes)))
    return Predictions(ids=np.asarray(store.ids)[sel], rows=sel, probs=probs, classes=classes)


@dataclass
class _Job:
    """What every run of one prediction shares: the rows, the device and the progress count."""

    store: Store
    sel: np.ndarray
    batch_size: int
    device: torch.device
    trust_code: bool
    progress: Callable[[int, int], None] | None
    total: int = 0
    done: int = 0
    models: dict = field(default_factory=dict)  # loaded runs / models, kept across row blocks


def _mean(fold_probs: np.ndarray) -> np.ndarray:
    probs = fold_probs.mean(0)
    return probs / np.maximum(probs.sum(1, keepdims=True), 1e-12)


def _sources(run: Run, job: _Job) -> list[Run]:
    """The stack's source runs, loaded once per prediction (kept across row blocks)."""
    key = ("sources", str(run.path.resolve()))
    if key not in job.models:
        job.models[key] = [load_run(source_path(run, s)) for s in run.config["sources"]]
    return job.models[key]


def _count_head_runs(run: Run, job: _Job) -> int:
    if run.config.get("kind") != "stack":
        return 1
    return sum(_count_head_runs(r, job) for r in _sources(run, job))


def _stack_probs(run: Run, job: _Job) -> np.ndarray:
    """A stack run's probabilities: its sources predicted first, then its saved stackers."""
    key = ("stackers", str(run.path.resolve()))
    if key not in job.models:
        job.models[key] = load_stack_models(run)
    models = job.models[key]
    per_fold: list[np.ndarray] = []
    mean: list[np.ndarray] = []
    for src in _sources(run, job):
        if list(src.config["classes"]) != list(run.config["classes"]):
            raise PredictError(f"source run {src.path.name!r} of stack {run.path.name!r} has "
                               "other classes than the stack; it was replaced after stacking")
        if src.config.get("kind") == "stack":
            if holdout_scheme(run) == PER_FOLD:
                raise PredictError(f"stack {run.path.name!r} takes stack run "
                                   f"{src.path.name!r} per fold, which a stack has no models "
                                   "for; re-run the outer stack")
            mean.append(_stack_probs(src, job))
            continue
        fp = _head_fold_probs(src, job)
        per_fold.append(fp)
        mean.append(_mean(fp))
    pooled = None
    if run.config.get("features") == "probs+pooled":
        names = run.config.get("pooled_sets")
        if not names:
            raise PredictError(f"stack {run.path.name!r} used pooled features but does not "
                               "record which sets (written by an older version); re-run "
                               "`fusion stack`")
        pooled = np.hstack([job.store.features[n].pooled_rows(job.sel) for n in names])
    return apply_stack(run, models, per_fold=per_fold, mean=mean, pooled=pooled)


def _head_fold_probs(run: Run, job: _Job) -> np.ndarray:
    """(F, N, K) float32: per fold, the mean over seeds of its models' probabilities for the
    job's rows, rows normalised (how the run's ``holdout_folds.npy`` was made)."""
    kind = run.config.get("kind")
    if kind != "train":
        raise PredictError(
            f"run {run.path.name!r} is a {kind!r} run; `fusion predict` applies head runs "
            "(`fusion train`) and stacks of them: a fine-tuned run's encoders are part of its "
            "model, which predict does not run yet; use the head trained on the cache")
    names = check_features(run, job.store)
    classes = list(run.config["classes"])
    files = weight_files(run.path / "weights")
    folds = sorted({fold_of(f) for f in files})
    slot = np.array([folds.index(fold_of(f)) for f in files])
    per_fold = np.bincount(slot, minlength=len(folds)).astype(np.float32)
    key = ("folds", str(run.path.resolve()))
    if key not in job.models:
        job.models[key] = load_fold_models(run_head_config(run), files, job.device,
                                           trust_code=job.trust_code,
                                           what=f"run {run.path.name!r}")
    models = job.models[key]
    needs = frozenset(getattr(models[0], "needs", ()))
    layers = (run.config.get("train") or {}).get("layers")
    out = np.zeros((len(folds), len(job.sel), len(classes)), np.float32)
    pos = {int(r): i for i, r in enumerate(job.sel)}
    if len(job.sel):
        ld = job.store.loader(job.sel, text=names["text"], image=names["image"],
                              batch_size=job.batch_size,
                              layers=layers if names["text"] else None, fields=needs)
        with torch.no_grad():
            for d in ld:
                b = Batch(**d).to(job.device)
                at = [pos[int(r)] for r in b.rows.cpu().numpy()]
                for m, s in zip(models, slot, strict=True):
                    out[s, at] += torch.softmax(m(b).float(), -1).cpu().numpy()
                job.done += b.size
                if job.progress:
                    job.progress(job.done, job.total)
    out /= per_fold[:, None, None]
    return out / np.maximum(out.sum(2, keepdims=True), 1e-12)
