"""What a k-fold training run keeps, fold by fold, and the run directory it becomes.

:class:`FoldResults` gathers the out-of-fold probabilities (each row predicted by the model of
its own fold, which never trained on it), the fold-mean holdout probabilities, per-fold metrics
and weights; :meth:`FoldResults.write` hands them to :func:`fusion.rundir.write_run`, the one
run writer, which computes the scores (:mod:`fusion.metrics`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .data import Setup
from .loop import EarlyStopping, predict
from .metrics import classification_metrics
from .rundir import Run, RunWriter, write_run

__all__ = ["FoldResults", "run_config"]


def run_config(s: Setup, *, kind: str, name: str | None, out: str | os.PathLike | None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a head run: enough to rebuild the head and re-run (``--config``)."""
    return {
        "kind": kind,
        "name": name or (Path(out).name if out is not None else s.head_spec),
        "head": s.head_spec,
        "head_config": s.probe.config,
        "train": s.cfg.to_dict(),
        "store": {"url": s.store.url, "fingerprint": s.store.fingerprint,
                  "folds_fingerprint": s.store.folds_fingerprint},
        "classes": s.classes,
        "folds": {**s.store.fold_info, "trained": s.fold_ids,
                  "assignment": s.folds.astype(int).tolist()},
        "labels": s.labels.astype(int).tolist(),
        "features": {mod: ({"name": fs.name, "dim": fs.dim, "layers": fs.layers,
                            "encoder": fs.encoder, "preprocess": fs.meta.get("preprocess"),
                            "catalog": fs.meta.get("catalog"),
                            "prefix_tokens": fs.prefix_tokens} if fs is not None else None)
                     for mod, fs in (("text", s.tfs), ("image", s.ifs))},
        **(extra or {}),
    }


class FoldResults:
    """Predictions, metrics and weights of each fold, until the run is written.

    Use as a context manager: weights are staged in a temporary directory next to ``out``
    (nothing is staged when ``out`` is None) and moved into the run by :meth:`write`.
    """

    def __init__(self, setup: Setup, out: str | os.PathLike | None):
        self.setup, self.out = setup, out
        k = len(setup.classes)
        self.oof = np.zeros((len(setup.folds), k), np.float32)
        self.oof_mask = np.zeros(len(setup.folds), bool)
        self.hold_rows = setup.hold_rows
        self.hold_sum = np.zeros((len(self.hold_rows), k), np.float64)
        self.fold_metrics: list[dict[str, Any]] = []
        self.epoch_times: list[float] = []
        self._stage: tempfile.TemporaryDirectory | None = None
        if out is not None:
            parent = Path(out).parent
            parent.mkdir(parents=True, exist_ok=True)
            self._stage = tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.weights-",
                                                      dir=parent)

    def __enter__(self) -> FoldResults:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stage is not None:
            self._stage.cleanup()

    def add(self, fold: int, model: torch.nn.Module,
            batches: Callable[[np.ndarray], Iterable[Any]], va_rows: np.ndarray,
            stop: EarlyStopping, fit_end: dict[str, Any], **extra: Any) -> None:
        """Predict fold ``fold``'s validation rows (out-of-fold) and the holdout with ``model``
        (the best epoch's weights), and record the fold."""
        s = self.setup
        vp, vr = predict(model, batches(va_rows), s.device)
        self.oof[vr], self.oof_mask[vr] = vp, True
        if len(self.hold_rows):
            hp, hr = predict(model, batches(self.hold_rows), s.device)
            self.hold_sum[np.searchsorted(self.hold_rows, hr)] += hp
        fm = classification_metrics(s.labels[vr], vp)
        self.epoch_times += stop.epoch_times
        self.fold_metrics.append({"fold": fold, "best_epoch": stop.best_epoch,
                                  "epochs_run": len(stop.history),
                                  "accuracy": fm["accuracy"], "macro_f1": fm["macro_f1"],
                                  "on_fit_end": fit_end, "history": stop.history, **extra})

    def save_weights(self, name: str, module: torch.nn.Module) -> None:
        """Stage ``weights/{name}.safetensors`` for the run (no-op without ``out``)."""
        if self._stage is None:
            return
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, os.path.join(self._stage.name, f"{name}.safetensors"))

    def _move_weights(self, w: RunWriter) -> None:
        if self._stage is None:
            return
        for f in sorted(Path(self._stage.name).iterdir()):
            shutil.move(f, w.file(f"weights/{f.name}"))

    def write(self, *, kind: str, train_seconds: float, name: str | None,
              extra_config: dict[str, Any] | None = None) -> Run:
        """The run directory (or, without ``out``, the run in memory)."""
        s = self.setup
        rows = np.flatnonzero(self.oof_mask)
        hold = (self.hold_sum / max(1, len(s.fold_ids))).astype(np.float32)
        if len(hold):
            hold /= hold.sum(1, keepdims=True)
        metrics = {"head": s.head_spec, "kind": kind, "folds": self.fold_metrics,
                   "train_seconds": train_seconds,
                   "epoch_seconds": float(np.mean(self.epoch_times)) if self.epoch_times else 0.0,
                   "n_parameters": int(sum(p.numel() for p in s.probe.parameters())),
                   "device": str(s.device)}
        return write_run(self.out, config=run_config(s, kind=kind, name=name, out=self.out,
                                                     extra=extra_config),
                         metrics=metrics, oof=self.oof[rows], oof_rows=rows, holdout=hold,
                         holdout_rows=self.hold_rows, ids=s.store.ids, labels=s.labels,
                         folds=s.folds, classes=s.classes, extra_files=self._move_weights)
