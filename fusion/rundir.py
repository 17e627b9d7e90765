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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RunDirError

__all__ = ["Run", "load_run", "RunWriter"]


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
    return Run(path=p, config=config, metrics=metrics, **arrays)


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
            w.writerow(["id", "split", "fold", "true", "predicted", "probability"])
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
