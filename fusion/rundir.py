"""The run directory: the one output format shared by `fusion train`, `fusion stack` and
`fusion train --finetune`, so `fusion compare` ranks them together and a stack can be stacked.

Layout (see docs/runs.md)::

    RUN_DIR/
      config.json       everything needed to re-run; always has "kind", "head", "store", "classes"
      metrics.json      {"head", "kind", "accuracy", "macro_f1", "holdout": {...}, "folds": [...],
                         "train_seconds", "epoch_seconds", ...}
      oof.npy           (N_trainable, K) float32 out-of-fold probabilities, rows sum to 1
      oof_rows.npy      (N_trainable,) int64 store row index of each oof row
      holdout.npy       (N_holdout, K) float32 mean holdout probabilities over folds
      holdout_rows.npy  (N_holdout,) int64 store row index of each holdout row
      holdout_folds.npy (F, N_holdout, K) float32 holdout probabilities of each fold model,
                        rows in holdout_rows order (optional: older runs lack it)
      oof.topk.npz, holdout.topk.npz, holdout_folds.topk.npz   instead of the three above when
                        config.probs.layout is "topk" (K > dense_max_classes): idx int32,
                        p float16, rest float32 (fusion.probs.TopK)
      predictions.csv   id, split, fold, true, predicted, probability
      weights/fold{i}.safetensors
      DONE              written last: a run without it is incomplete and is refused by readers

Store identity lives in ``config["store"] = {"url", "fingerprint", "folds_fingerprint"}``;
stackers refuse runs whose fingerprints differ.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RunDirError
from .metrics import classification_metrics
from .probs import DENSE, TOPK, Probs, TopK, layout_for, load_topk, save_topk, to_topk

__all__ = ["Run", "load_run", "RunWriter", "write_run", "PREDICTION_COLUMNS"]

#: The columns of every run's predictions.csv (docs/runs.md).
PREDICTION_COLUMNS = ("id", "split", "fold", "true", "predicted", "probability")


@dataclass
class Run:
    """A finished run directory, loaded."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    oof: Probs  # (N_trainable, K): dense float32, or TopK (config.probs.layout "topk")
    oof_rows: np.ndarray  # (N_trainable,)
    holdout: Probs  # (N_holdout, K)
    holdout_rows: np.ndarray  # (N_holdout,)
    extra: dict[str, Any] = field(default_factory=dict)
    holdout_folds: Probs | None = None  # (F, N_holdout, K) per fold model, or None (old runs)

    def probs(self, split: str) -> Probs:
        """The probabilities of ``split`` ("oof", "holdout" or "holdout_folds"), in the run's
        layout: a dense (N, K) float32 array, or a :class:`fusion.probs.TopK` that answers
        ``shape``, ``block[rows]``, ``argmax(1)`` and ``dense()`` (docs/runs.md section 2.3).
        Every consumer (compare, report, stack) reads probabilities through this."""
        if split not in ("oof", "holdout", "holdout_folds"):
            raise ValueError(f"split {split!r} is not oof, holdout or holdout_folds")
        return getattr(self, split)

    def rows(self, split: str) -> np.ndarray:
        """The store rows of ``split`` ("oof" or "holdout")."""
        return self.oof_rows if split == "oof" else self.holdout_rows

    @property
    def layout(self) -> str:
        """"dense" or "topk" (runs written before section 2.3 are dense)."""
        return (self.config.get("probs") or {}).get("layout", DENSE)

    @property
    def name(self) -> str:
        return self.config.get("name") or self.path.name

    @property
    def head(self) -> str:
        return str(self.config.get("head", "?"))

    @property
    def classes(self) -> list[Any]:
        return list(self.config.get("classes", []))

    @property
    def store_fingerprint(self) -> str | None:
        return (self.config.get("store") or {}).get("fingerprint")

    @property
    def folds_fingerprint(self) -> str | None:
        return (self.config.get("store") or {}).get("folds_fingerprint")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing: is {path.parent} a run directory?") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); re-run to regenerate it") from None


def load_run(path: str | os.PathLike) -> Run:
    """Load a finished run directory (raises :class:`RunDirError` with the fix otherwise)."""
    p = Path(path)
    if not p.is_dir():
        raise RunDirError(f"run directory {str(p)!r} does not exist; pass the --out of a finished "
                          "`fusion train` or `fusion stack`")
    if not (p / "DONE").exists():
        raise RunDirError(f"run directory {str(p)!r} is incomplete (no DONE marker): the run was "
                          "interrupted or failed; re-run it")
    config = _read_json(p / "config.json")
    metrics = _read_json(p / "metrics.json")
    arrays: dict[str, Any] = {}
    for name in ("oof", "oof_rows", "holdout", "holdout_rows"):
        f, t = p / f"{name}.npy", p / f"{name}.topk.npz"
        if name in ("oof", "holdout") and t.exists():
            arrays[name] = _load_topk(t)
        elif f.exists():
            arrays[name] = np.load(f, allow_pickle=False)
        else:
            raise RunDirError(f"run directory {str(p)!r} lacks {name}.npy; re-run it")
    f, t = p / "holdout_folds.npy", p / "holdout_folds.topk.npz"
    # optional (docs/runs.md section 2.7); the dense one memory-mapped: F x holdout
    folds = (_load_topk(t) if t.exists() else
             np.load(f, mmap_mode="r", allow_pickle=False) if f.exists() else None)
    return Run(path=p, config=config, metrics=metrics, holdout_folds=folds, **arrays)


def _load_topk(path: Path) -> TopK:
    try:
        return load_topk(path)
    except (OSError, ValueError, KeyError) as e:
        raise RunDirError(f"{path} is not a readable top-k file ({e}); re-run the run") from None


class RunWriter:
    """Writes a run directory; ``DONE`` is written by :meth:`finish`, last.

    The directory is prepared under a temporary sibling name and renamed into place on
    :meth:`finish`, so a failed run never leaves a half-written directory at ``path``.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = True):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise RunDirError(f"run directory {str(self.path)!r} exists; pass --overwrite or "
                              "another --out")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)

    def file(self, name: str) -> Path:
        f = self.tmp / name
        f.parent.mkdir(parents=True, exist_ok=True)
        return f

    def write_json(self, name: str, obj: Any) -> None:
        self.file(name).write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")

    def write_array(self, name: str, arr: np.ndarray) -> None:
        np.save(self.file(f"{name}.npy"), np.ascontiguousarray(arr), allow_pickle=False)

    def write_probs(self, name: str, probs: Probs) -> None:
        """``<name>.npy`` (dense) or ``<name>.topk.npz`` (:class:`fusion.probs.TopK`)."""
        if isinstance(probs, TopK):
            save_topk(self.file(f"{name}.topk.npz"), probs)
        else:
            self.write_array(name, probs)

    def write_predictions(self, ids: list[Any], splits: list[str], folds: list[int],
                          true: list[Any], pred: np.ndarray, top: np.ndarray,
                          classes: list[Any]) -> None:
        """predictions.csv: ``pred`` the predicted class and ``top`` its probability per row."""
        with self.file("predictions.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(PREDICTION_COLUMNS)
            for i in range(len(ids)):
                w.writerow([ids[i], splits[i], folds[i], true[i], classes[pred[i]],
                            f"{top[i]:.6f}"])

    def finish(self) -> Path:
        (self.tmp / "DONE").write_text("ok\n")
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            self.path.rename(old)
            self.tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.rename(self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_run(out: str | os.PathLike | None, *, config: dict[str, Any],
              metrics: dict[str, Any], oof: Probs, oof_rows: np.ndarray,
              holdout: Probs, holdout_rows: np.ndarray, ids: Sequence[Any],
              labels: np.ndarray, folds: np.ndarray, classes: list[Any],
              extra_files: Callable[[RunWriter], None] | None = None,
              holdout_folds: Probs | None = None, top_k: int | None = None,
              dense_max_classes: int | None = None) -> Run:
    """Write a run directory: the one writer used by train, fine-tune, stack and the tests.

    ``metrics`` holds what only the caller knows (``head``, ``kind``, timings, folds); the
    writer adds the scores, computed here and only here (:mod:`fusion.metrics`): ``accuracy``,
    ``macro_f1``, ``n`` and ``per_class_f1`` over the out-of-fold rows, and the same under
    ``holdout`` (``None`` without holdout rows). ``ids``, ``labels`` (-1 = unlabelled) and
    ``folds`` are indexed by store row. ``extra_files(writer)`` adds files (weights,
    contributions) before ``DONE``. ``holdout_folds`` (F, N_holdout, K), the holdout
    probabilities of each fold model in ``holdout_rows`` order, is written as
    ``holdout_folds.npy`` when given (docs/runs.md section 2.7). With ``out=None`` nothing is
    written and the run is returned in memory.

    Probabilities may be dense arrays or :class:`fusion.probs.TopK`; the layout written is
    :func:`fusion.probs.layout_for` (``top_k`` kept per row once K > ``dense_max_classes``;
    defaults in :mod:`fusion.config`), recorded as ``config["probs"]``: a dense input is ranked
    to top-k in blocks of rows, a top-k input below the threshold is expanded.
    """
    clash = {"accuracy", "macro_f1", "per_class_f1", "holdout", "n"} & set(metrics)
    if clash:
        raise ValueError(f"write_run computes {sorted(clash)} itself; do not pass them")
    labels = np.asarray(labels)
    oof_rows = np.asarray(oof_rows, np.int64)
    holdout_rows = np.asarray(holdout_rows, np.int64)
    layout = layout_for(len(classes), top_k, dense_max_classes)
    config = {**config, "probs": layout}
    oof = _as_layout(oof, layout)
    if isinstance(oof, TopK) and oof.k != layout["k"]:  # e.g. a candidate stack keeps its depth
        layout["k"] = oof.k
    holdout = _as_layout(holdout, layout, shape=(len(holdout_rows), len(classes)))
    if holdout_folds is not None:
        holdout_folds = _as_layout(holdout_folds, layout)
        if len(holdout_folds.shape) != 3 or holdout_folds.shape[1:] != holdout.shape:
            raise ValueError(f"holdout_folds has shape {holdout_folds.shape}, expected "
                             f"(F, {holdout.shape[0]}, {holdout.shape[1]})")
    head = {key: metrics[key] for key in ("head", "kind") if key in metrics}
    full = {**head, **classification_metrics(labels[oof_rows], oof, classes),
            "holdout": (classification_metrics(labels[holdout_rows], holdout, classes)
                        if len(holdout_rows) else None),
            **{key: v for key, v in metrics.items() if key not in head}}
    if out is None:
        return Run(path=Path("."), config=config, metrics=full, oof=oof, oof_rows=oof_rows,
                   holdout=holdout, holdout_rows=holdout_rows, holdout_folds=holdout_folds)
    with RunWriter(out) as w:
        w.write_json("config.json", config)
        w.write_json("metrics.json", full)
        w.write_probs("oof", oof)
        w.write_array("oof_rows", oof_rows)
        w.write_probs("holdout", holdout)
        w.write_array("holdout_rows", holdout_rows)
        if holdout_folds is not None:
            w.write_probs("holdout_folds", holdout_folds)
        rows = np.concatenate([oof_rows, holdout_rows])
        w.write_predictions(
            ids=[ids[r] for r in rows.tolist()],
            splits=["oof"] * len(oof_rows) + ["holdout"] * len(holdout_rows),
            folds=np.asarray(folds)[rows].astype(int).tolist(),
            true=[classes[c] if c >= 0 else "" for c in labels[rows].tolist()],
            pred=np.concatenate([oof.argmax(1), holdout.argmax(1)]),
            top=np.concatenate([_top(oof), _top(holdout)]), classes=classes)
        if extra_files is not None:
            extra_files(w)
        path = w.finish()
    return load_run(path)


def _as_layout(probs: Probs, layout: dict[str, Any],
               shape: tuple[int, int] | None = None) -> Probs:
    """``probs`` in ``layout``: dense float32, or TopK with the layout's k."""
    if layout["layout"] == TOPK:
        if isinstance(probs, TopK):
            return probs
        return to_topk(np.asarray(probs, np.float32).reshape(shape or np.shape(probs)),
                       layout["k"])
    if isinstance(probs, TopK):
        return probs.dense()
    arr = np.ascontiguousarray(probs, np.float32)
    return arr.reshape(shape) if shape is not None else arr


def _top(probs: Probs) -> np.ndarray:
    """The probability of each row's predicted class."""
    if isinstance(probs, TopK):
        return probs.max()
    return probs.max(1) if len(probs) else np.zeros(0, np.float32)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
