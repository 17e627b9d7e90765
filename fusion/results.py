"""What a k-fold training run keeps, fold by fold, and the run directory it becomes.

:class:`FoldResults` gathers the out-of-fold probabilities (each row predicted by the model of
its own fold, which never trained on it nor selected an epoch on it), the fold-mean holdout
probabilities and each fold model's own holdout probabilities (``holdout_folds``), per-fold
metrics and weights, once per seed; :meth:`FoldResults.write` averages
the seeds and hands the result to :func:`fusion.rundir.write_run`, the one run writer, which
computes the scores (:mod:`fusion.metrics`). Each seed's own scores and their spread go to
``metrics.json`` (``seeds``, ``spread``), the inner validation rows of each (seed, fold) to
``rows.npz`` (``seed{s}_fold{f}_inner``: a row is in the inner split of several folds).
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

from .data import Setup, availability
from .loop import EarlyStopping, predict, predict_blocks
from .metrics import by_availability, classification_metrics
from .probs import TOPK, Probs, TopK, block_rows, layout_for, mean_topk, to_topk
from .rundir import Run, RunWriter, write_run

__all__ = ["FoldResults", "run_config", "seed_record", "spread", "spreads"]


def run_config(s: Setup, *, kind: str, name: str | None, out: str | os.PathLike | None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a head run: enough to rebuild the head and re-run (``--config``)."""
    return {
        "kind": kind,
        "name": name or (Path(out).name if out is not None else s.head_spec),
        "head": s.head_spec,
        "head_config": s.probe.config,
        "train": s.cfg.to_dict(),
        "seeds": list(s.cfg.seed_list),
        "selection": {"inner_val": s.cfg.inner_val, "stratified": True,
                      "seeded_by": ["seed", "fold"], "rows": "rows.npz:seed{s}_fold{f}_inner"},
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


def spread(values: list[float | None]) -> dict[str, float | None]:
    """``{"mean", "std"}`` of per-seed scores (sample std, ddof=1; 0.0 for one seed)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"mean": None, "std": None}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def seed_record(seed: int, y: np.ndarray, oof: Probs, y_hold: np.ndarray,
                hold: Probs) -> dict[str, Any]:
    """``metrics.seeds[]`` entry: one seed's out-of-fold and holdout scores."""
    m = classification_metrics(y, oof)
    h = classification_metrics(y_hold, hold) if len(hold) else None
    keep = ("accuracy", "macro_f1", "n")
    return {"seed": seed, **{k: m[k] for k in keep},
            "holdout": {k: h[k] for k in keep} if h else None}


def spreads(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """``metrics.spread``: :func:`spread` of each score over the ``metrics.seeds`` entries."""
    has_hold = all(x["holdout"] for x in seeds)
    return {"macro_f1": spread([x["macro_f1"] for x in seeds]),
            "accuracy": spread([x["accuracy"] for x in seeds]),
            "holdout": ({key: spread([x["holdout"][key] for x in seeds])
                         for key in ("macro_f1", "accuracy")} if has_hold else None)}


class FoldResults:
    """Predictions, metrics and weights of each (seed, fold), until the run is written.

    Use as a context manager: weights are staged in a temporary directory next to ``out``
    (nothing is staged when ``out`` is None) and moved into the run by :meth:`write`. Call
    :meth:`end_seed` after the last fold of each seed.
    """

    def __init__(self, setup: Setup, out: str | os.PathLike | None):
        self.setup, self.out = setup, out
        k, n = len(setup.classes), len(setup.folds)
        self.seeds = list(setup.cfg.seed_list)
        self.oof_mask = np.zeros(n, bool)
        self.hold_rows = setup.hold_rows
        # probabilities in the run's layout (docs/runs.md section 2.3): top-k runs never hold
        # an N x K array, each fold's predictions are ranked a block (probs.block_rows) at a time
        layout = layout_for(k, setup.cfg.top_k_store)
        self.acc = (_TopKSums(n, len(self.hold_rows), k, layout["k"])
                    if layout["layout"] == TOPK else _DenseSums(n, len(self.hold_rows), k))
        self.inner: dict[str, np.ndarray] = {}  # "seed{s}_fold{f}_inner" -> store rows
        self.fold_metrics: list[dict[str, Any]] = []
        self.seed_metrics: list[dict[str, Any]] = []
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

    def weights_name(self, seed: int, fold: int) -> str:
        """``fold{i}``, or ``seed{s}/fold{i}`` when the run has several seeds."""
        return f"fold{fold}" if len(self.seeds) == 1 else f"seed{seed}/fold{fold}"

    def add(self, fold: int, model: torch.nn.Module,
            batches: Callable[[np.ndarray], Iterable[Any]], va_rows: np.ndarray,
            stop: EarlyStopping, fit_end: dict[str, Any], *, seed: int, n_fit: int,
            inner_rows: np.ndarray, **extra: Any) -> None:
        """Predict fold ``fold``'s rows (out-of-fold) and the holdout with ``model`` (the
        weights of the epoch chosen on ``inner_rows``), and record the fold."""
        s = self.setup
        vp, vr = self.acc.predict(model, batches, va_rows, s.device)
        self.acc.set_oof(vr, vp)
        self.oof_mask[vr] = True
        self.inner[f"seed{seed}_fold{fold}_inner"] = np.asarray(inner_rows, np.int64)
        if len(self.hold_rows):
            hp, hr = self.acc.predict(model, batches, self.hold_rows, s.device)
            self.acc.add_hold(fold, np.searchsorted(self.hold_rows, hr), hp)
        fm = classification_metrics(s.labels[vr], vp)
        self.epoch_times += stop.epoch_times
        self.fold_metrics.append({"seed": seed, "fold": fold, "best_epoch": stop.best_epoch,
                                  "epochs_run": len(stop.history), "n_fit": int(n_fit),
                                  "n_inner": int(len(inner_rows)),
                                  "accuracy": fm["accuracy"], "macro_f1": fm["macro_f1"],
                                  "on_fit_end": fit_end, "history": stop.history, **extra})

    def end_seed(self, seed: int) -> None:
        """Close seed ``seed``: score its own OOF / holdout, add them to the seed means."""
        s = self.setup
        rows = np.flatnonzero(self.oof_mask)
        oof, hold = self.acc.end_seed()
        self.seed_metrics.append(seed_record(seed, s.labels[rows], oof[rows],
                                             s.labels[self.hold_rows], hold))

    def save_weights(self, name: str, module: torch.nn.Module) -> None:
        """Stage ``weights/{name}.safetensors`` for the run (no-op without ``out``)."""
        if self._stage is None:
            return
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        f = Path(self._stage.name) / f"{name}.safetensors"
        f.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, f)

    def _extra_files(self, w: RunWriter, oof_rows: np.ndarray) -> None:
        s = self.setup
        np.savez(w.file("rows.npz"), oof_rows=oof_rows, holdout_rows=self.hold_rows,
                 labels=s.labels, folds=s.folds, seeds=np.asarray(self.seeds, np.int64),
                 **self.inner)
        if self._stage is None:
            return
        stage = Path(self._stage.name)
        for f in sorted(stage.rglob("*.safetensors")):
            shutil.move(f, w.file(f"weights/{f.relative_to(stage).as_posix()}"))

    def write(self, *, kind: str, train_seconds: float, name: str | None,
              extra_config: dict[str, Any] | None = None) -> Run:
        """The run directory (or, without ``out``, the run in memory): OOF and holdout
        probabilities are the mean over the seeds."""
        s = self.setup
        if len(self.seed_metrics) != len(self.seeds):
            raise RuntimeError("FoldResults.write before end_seed of every seed")
        rows = np.flatnonzero(self.oof_mask)
        # each fold model's holdout probabilities (mean over seeds): what a stacker fitted on
        # that fold's OOF rows should score (docs/runs.md section 2.7)
        oof, hold, hold_folds = self.acc.final(rows, s.fold_ids)
        sm = self.seed_metrics
        metrics = {"head": s.head_spec, "kind": kind, "folds": self.fold_metrics,
                   "seeds": sm, "spread": spreads(sm),
                   "train_seconds": train_seconds,
                   "epoch_seconds": float(np.mean(self.epoch_times)) if self.epoch_times else 0.0,
                   "n_parameters": int(sum(p.numel() for p in s.probe.parameters())),
                   "device": str(s.device)}
        text_ok, image_ok = availability(s)  # docs/runs.md §2.6
        metrics["by_availability"] = {
            **by_availability(s.labels[rows], oof, text_ok[rows], image_ok[rows]),
            "holdout": (by_availability(s.labels[self.hold_rows], hold, text_ok[self.hold_rows],
                                        image_ok[self.hold_rows])
                        if len(self.hold_rows) else None)}
        return write_run(self.out, config=run_config(s, kind=kind, name=name, out=self.out,
                                                     extra=extra_config),
                         metrics=metrics, oof=oof, oof_rows=rows, holdout=hold,
                         holdout_rows=self.hold_rows, ids=s.store.ids, labels=s.labels,
                         folds=s.folds, classes=s.classes,
                         extra_files=lambda w: self._extra_files(w, rows),
                         holdout_folds=hold_folds, top_k=s.cfg.top_k_store)


def _normalised(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float32)
    if len(p):
        p /= p.sum(1, keepdims=True)
    return p


class _DenseSums:
    """Dense (N, K) sums of a run's probabilities over folds and seeds (K <= dense_max)."""

    def __init__(self, n: int, n_hold: int, k: int):
        self.oof = np.zeros((n, k), np.float32)  # the current seed's
        self.oof_sum = np.zeros((n, k), np.float64)  # over finished seeds
        self.hold = np.zeros((n_hold, k), np.float64)  # current seed, fold sum
        self.hold_sum = np.zeros((n_hold, k), np.float64)  # mean per seed, summed
        self.hold_fold: dict[int, np.ndarray] = {}  # fold -> its holdout, summed over seeds
        self.n_seeds = self.n_folds = 0

    def predict(self, model, batches, rows, device) -> tuple[Probs, np.ndarray]:
        return predict(model, batches(rows), device)

    def set_oof(self, rows: np.ndarray, p: np.ndarray) -> None:
        self.oof[rows] = p

    def add_hold(self, fold: int, at: np.ndarray, p: np.ndarray) -> None:
        self.hold[at] += p
        self.hold_fold.setdefault(fold, np.zeros_like(self.hold))[at] += p
        self.n_folds = len(self.hold_fold)

    def end_seed(self) -> tuple[Probs, Probs]:
        """(this seed's OOF, this seed's fold-mean holdout), then reset for the next seed."""
        hold = _normalised(self.hold / max(1, self.n_folds))
        oof = self.oof.copy()
        self.oof_sum += self.oof
        self.hold_sum += hold
        self.oof[:] = 0
        self.hold[:] = 0
        self.n_seeds += 1
        return oof, hold

    def final(self, rows: np.ndarray, fold_ids: list[int]
              ) -> tuple[Probs, Probs, Probs | None]:
        s = max(1, self.n_seeds)
        oof = (self.oof_sum[rows] / s).astype(np.float32)
        hold = _normalised(self.hold_sum / s)
        folds = (np.stack([_normalised(self.hold_fold[f] / s) for f in fold_ids])
                 if len(hold) and set(fold_ids) <= self.hold_fold.keys() else None)
        return oof, hold, folds


class _TopKSums:
    """The same sums as :class:`_DenseSums` kept top-k (K > dense_max): each fold's rows are
    predicted and ranked one block of :func:`fusion.probs.block_rows` rows at a time (one
    pass over the rows, one reused block buffer); means over folds and seeds are
    :func:`fusion.probs.mean_topk` (exact for every class some model kept)."""

    def __init__(self, n: int, n_hold: int, k: int, top_k: int):
        self.n, self.n_hold, self.k, self.top_k = n, n_hold, k, min(top_k, k)
        self.oof = TopK.empty(n, self.top_k, k)  # the current seed's
        self.oof_seeds: list[TopK] = []
        self.hold_cur: list[TopK] = []  # the current seed's fold models' holdout
        self.hold_seeds: list[TopK] = []  # each seed's fold mean
        self.hold_fold: dict[int, list[TopK]] = {}  # fold -> its holdout, one per seed

    def predict(self, model, batches, rows, device) -> tuple[Probs, np.ndarray]:
        parts, out_rows = [], []
        for p, r in predict_blocks(model, batches(rows), device, block_rows):
            parts.append(to_topk(p, self.top_k, block=len(p)))
            out_rows.append(r.copy())  # the block's buffers are reused
        if not parts:
            return TopK.empty(0, self.top_k, self.k), np.zeros(0, np.int64)
        return (TopK(*(np.concatenate([getattr(t, a) for t in parts])
                       for a in ("idx", "p", "rest")), self.k), np.concatenate(out_rows))

    def set_oof(self, rows: np.ndarray, p: TopK) -> None:
        self.oof[rows] = p

    def add_hold(self, fold: int, at: np.ndarray, p: TopK) -> None:
        block = TopK.empty(self.n_hold, self.top_k, self.k)
        block[at] = p
        self.hold_cur.append(block)
        self.hold_fold.setdefault(fold, []).append(block)

    def end_seed(self) -> tuple[Probs, Probs]:
        hold = (mean_topk(self.hold_cur) if self.hold_cur
                else TopK.empty(0, self.top_k, self.k))
        oof = self.oof
        self.oof_seeds.append(oof)
        self.hold_seeds.append(hold)
        self.oof = TopK.empty(self.n, self.top_k, self.k)
        self.hold_cur = []
        return oof, hold

    def final(self, rows: np.ndarray, fold_ids: list[int]
              ) -> tuple[Probs, Probs, Probs | None]:
        def mean(blocks: list[TopK]) -> TopK:
            return blocks[0] if len(blocks) == 1 else mean_topk(blocks)

        oof = mean([o[rows] for o in self.oof_seeds])
        hold = mean(self.hold_seeds)
        folds = None
        if self.n_hold and set(fold_ids) <= self.hold_fold.keys():
            per = [mean(self.hold_fold[f]) for f in fold_ids]
            folds = TopK(*(np.stack([getattr(t, a) for t in per]) for a in ("idx", "p", "rest")),
                         self.k)
        return oof, hold, folds
