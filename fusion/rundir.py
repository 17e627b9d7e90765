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

__all__ = ["Run", "load_run", "RunWriter", "write_run", "PREDICTION_COLUMNS"]

#: The columns of every run's predictions.csv (docs/runs.md).
PREDICTION_COLUMNS = ("id", "split", "fold", "true", "predicted", "probability")


@dataclass
class Run:
    """A finished run directory, loaded."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    oof: np.ndarray  # (N_trainable, K)
    oof_rows: np.ndarray  # (N_trainable,)
    holdout: np.ndarray  # (N_holdout, K)
    holdout_rows: np.ndarray  # (N_holdout,)
    extra: dict[str, Any] = field(default_factory=dict)
    holdout_folds: np.ndarray | None = None  # (F, N_holdout, K) per fold model, or None (old runs)

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
    arrays = {}
    for name in ("oof", "oof_rows", "holdout", "holdout_rows"):
        f = p / f"{name}.npy"
        if not f.exists():
            raise RunDirError(f"run directory {str(p)!r} lacks {name}.npy; re-run it")
        arrays[name] = np.load(f, allow_pickle=False)
    f = p / "holdout_folds.npy"  # optional (docs/runs.md section 2.7); memory-mapped: F x holdout
    folds = np.load(f, mmap_mode="r", allow_pickle=False) if f.exists() else None
    return Run(path=p, config=config, metrics=metrics, holdout_folds=folds, **arrays)


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

    def write_predictions(self, ids: list[Any], splits: list[str], folds: list[int],
                          true: list[Any], probs: np.ndarray, classes: list[Any]) -> None:
        pred = probs.argmax(1)
        with self.file("predictions.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(PREDICTION_COLUMNS)
            for i in range(len(ids)):
                w.writerow([ids[i], splits[i], folds[i], true[i], classes[pred[i]],
                            f"{probs[i, pred[i]]:.6f}"])

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
              metrics: dict[str, Any], oof: np.ndarray, oof_rows: np.ndarray,
              holdout: np.ndarray, holdout_rows: np.ndarray, ids: Sequence[Any],
              labels: np.ndarray, folds: np.ndarray, classes: list[Any],
              extra_files: Callable[[RunWriter], None] | None = None,
              holdout_folds: np.ndarray | None = None) -> Run:
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
    """
    clash = {"accuracy", "macro_f1", "per_class_f1", "holdout", "n"} & set(metrics)
    if clash:
        raise ValueError(f"write_run computes {sorted(clash)} itself; do not pass them")
    labels = np.asarray(labels)
    oof_rows = np.asarray(oof_rows, np.int64)
    holdout_rows = np.asarray(holdout_rows, np.int64)
    oof = np.ascontiguousarray(oof, np.float32)
    holdout = np.ascontiguousarray(holdout, np.float32).reshape(len(holdout_rows), len(classes))
    if holdout_folds is not None:
        holdout_folds = np.ascontiguousarray(holdout_folds, np.float32)
        if holdout_folds.ndim != 3 or holdout_folds.shape[1:] != holdout.shape:
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
        w.write_array("oof", oof)
        w.write_array("oof_rows", oof_rows)
        w.write_array("holdout", holdout)
        w.write_array("holdout_rows", holdout_rows)
        if holdout_folds is not None:
            w.write_array("holdout_folds", holdout_folds)
        rows = np.concatenate([oof_rows, holdout_rows])
        w.write_predictions(
            ids=[ids[r] for r in rows.tolist()],
            splits=["oof"] * len(oof_rows) + ["holdout"] * len(holdout_rows),
            folds=np.asarray(folds)[rows].astype(int).tolist(),
            true=[classes[c] if c >= 0 else "" for c in labels[rows].tolist()],
            probs=np.concatenate([oof, holdout]), classes=classes)
        if extra_files is not None:
            extra_files(w)
        path = w.finish()
    return load_run(path)


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
