"""Merging runs of the same head trained fold by fold (`fusion merge`).

At catalog scale each fold is its own process, often on its own machine (`fusion train --fold
i`, docs/scaling.md). Each such run holds the out-of-fold rows of its folds, its fold models'
holdout probabilities (``holdout_folds``) and weights. :func:`merge_runs` joins them into one run
equal to training every fold in one process: OOF rows side by side (each row predicted by the
model of its own fold, as before), the holdout the mean over the fold models, the weights, the
inner-split rows and the per-fold metrics of every part. A merge of some folds is itself a run,
so parts merge in any grouping. Parts must be the same training configuration (head, options,
features, store fingerprints, seeds); what may differ between machines (device, threads, the
store's URL, the RAM budget) is not compared.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedstore import open_store
from embedstore.errors import EmbedStoreError

from .data import store_availability
from .errors import RunDirError
from .metrics import by_availability
from .probs import TopK, mean_topk
from .results import seed_record, spreads
from .rundir import Run, RunWriter, load_run, write_run

__all__ = ["merge_runs", "IGNORED"]

#: config.json fields that may differ between the parts of one run (dotted paths).
IGNORED = ("name", "train.fold", "train.folds", "train.device", "train.threads",
           "train.max_ram_gb", "folds.trained", "store.url")
_KINDS = ("train", "finetune")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _check_same(runs: list[Run]) -> None:
    """One line naming the first config field two parts disagree on."""
    ref = _flat(runs[0].config)
    for r in runs[1:]:
        other = _flat(r.config)
        for key in sorted(set(ref) | set(other)):
            if any(key == i or key.startswith(i + ".") for i in IGNORED):
                continue
            if ref.get(key) != other.get(key):
                raise RunDirError(
                    f"cannot merge {r.path} with {runs[0].path}: config {key} differs "
                    f"({_short(other.get(key))} vs {_short(ref.get(key))}); only folds of one "
                    "training configuration merge")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _parts(paths: Sequence[str | os.PathLike]) -> list[Run]:
    if len(paths) < 2:
        raise RunDirError(f"fusion merge needs at least two runs, got {len(paths)}; pass the "
                          "--out of each `fusion train --fold i`")
    runs = [load_run(p) for p in paths]
    for r in runs:
        if r.config.get("kind") not in _KINDS:
            raise RunDirError(f"{r.path} is a {r.config.get('kind')!r} run; only head runs "
                              "(fusion train, --finetune) merge: stack the merged runs instead")
        if len(r.holdout_rows) and r.holdout_folds is None:
            raise RunDirError(f"{r.path} has no holdout_folds (written before they existed); "
                              "re-train that fold")
    _check_same(runs)
    seen: dict[int, Path] = {}
    for r in runs:
        for f in r.config["folds"]["trained"]:
            if f in seen:
                raise RunDirError(f"fold {f} is in both {seen[f]} and {r.path}; merge each fold "
                                  "once")
            seen[f] = r.path
    if any(not np.array_equal(r.holdout_rows, runs[0].holdout_rows) for r in runs):
        raise RunDirError("the parts score different holdout rows; were they trained on the same "
                          "store?")
    return sorted(runs, key=lambda r: min(r.config["folds"]["trained"]))


def _concat(blocks: list[Any]) -> Any:
    if isinstance(blocks[0], TopK):
        return TopK(*(np.concatenate([getattr(b, a) for b in blocks]) for a in
                      ("idx", "p", "rest")), blocks[0].n_classes)
    return np.concatenate([np.asarray(b) for b in blocks])


def _holdout_mean(folds: Any) -> Any:
    """The mean over fold models, as a run writes it (dense: renormalised float32)."""
    if isinstance(folds, TopK):
        return mean_topk([folds[f] for f in range(len(folds))])
    p = np.asarray(folds, np.float64).mean(0).astype(np.float32)
    if len(p):
        p /= p.sum(1, keepdims=True)
    return p


def _availability(run: Run, labels: np.ndarray, oof: Any, oof_rows: np.ndarray, hold: Any,
                  hold_rows: np.ndarray) -> dict[str, Any] | None:
    """metrics.by_availability, recomputed from the store's presence (None if it cannot be
    opened here: the metric needs every row's presence, which the parts do not carry)."""
    feats = run.config.get("features") or {}
    try:
        store = open_store(run.config["store"]["url"])
        sets = {m: store.features[f["name"]] if f else None for m, f in
                (("text", feats.get("text")), ("image", feats.get("image")))}
        text_ok, image_ok = store_availability(store, sets["text"], sets["image"])
    except (EmbedStoreError, OSError, KeyError):  # unreachable here: only this breakdown drops
        return None
    return {**by_availability(labels[oof_rows], oof, text_ok[oof_rows], image_ok[oof_rows]),
            "holdout": (by_availability(labels[hold_rows], hold, text_ok[hold_rows],
                                        image_ok[hold_rows]) if len(hold_rows) else None)}


def merge_runs(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
               name: str | None = None,
               say: Callable[[str], None] | None = None) -> Run:
    """Merge head runs of disjoint folds (same configuration) into one run at ``out``."""
    runs = _parts(paths)
    first = runs[0]
    rows_npz = [dict(np.load(r.path / "rows.npz")) for r in runs]
    labels, folds = rows_npz[0]["labels"], rows_npz[0]["folds"]
    trained = sorted(f for r in runs for f in r.config["folds"]["trained"])
    oof_rows = np.concatenate([r.oof_rows for r in runs])
    order = np.argsort(oof_rows, kind="stable")
    oof = _concat([r.oof for r in runs])[order]
    oof_rows = oof_rows[order]
    hold_rows = first.holdout_rows
    hold_folds = _concat([r.holdout_folds for r in runs]) if len(hold_rows) else None
    hold = _holdout_mean(hold_folds) if hold_folds is not None else first.holdout
    seeds = [int(s) for s in first.config.get("seeds") or [0]]
    fold_metrics = sorted((m for r in runs for m in r.metrics.get("folds", [])),
                          key=lambda m: (m.get("seed", 0), m.get("fold", 0)))
    # one seed: its scores are the run's; several: each part holds only their mean
    seed_metrics = ([seed_record(seeds[0], labels[oof_rows], oof, labels[hold_rows], hold)]
                    if len(seeds) == 1 else None)
    epochs = [sum(len(f.get("history", [])) for f in r.metrics.get("folds", [])) for r in runs]
    epoch_s = [float(r.metrics.get("epoch_seconds") or 0.0) for r in runs]
    metrics = {
        "head": first.metrics.get("head"), "kind": first.metrics.get("kind"),
        "folds": fold_metrics, "seeds": seed_metrics,
        "spread": None if seed_metrics is None else spreads(seed_metrics),
        "train_seconds": float(sum(r.metrics.get("train_seconds") or 0.0 for r in runs)),
        "epoch_seconds": (float(np.average(epoch_s, weights=epochs)) if sum(epochs) else 0.0),
        "n_parameters": first.metrics.get("n_parameters"),
        "device": ", ".join(sorted({str(r.metrics.get("device")) for r in runs})),
        "by_availability": _availability(first, labels, oof, oof_rows, hold, hold_rows),
        "merged_from": [{"path": str(r.path), "folds": r.config["folds"]["trained"],
                         "train_seconds": r.metrics.get("train_seconds")} for r in runs],
    }
    config = {**first.config, "name": name or Path(out).name,
              "train": {**first.config.get("train", {}), "fold": None},
              "folds": {**first.config["folds"], "trained": trained}}
    config.pop("probs", None)  # write_run records the layout again

    def extra(w: RunWriter) -> None:
        inner = {k: v for z in rows_npz for k, v in z.items() if k.endswith("_inner")}
        np.savez(w.file("rows.npz"), oof_rows=oof_rows, holdout_rows=hold_rows, labels=labels,
                 folds=folds, seeds=np.asarray(seeds, np.int64), **inner)
        for r in runs:
            for f in sorted((r.path / "weights").rglob("*")):
                if f.is_file():
                    shutil.copy2(f, w.file(f"weights/{f.relative_to(r.path / 'weights')}"))

    ids = _ids(runs, len(labels))
    layout = first.config.get("probs") or {}
    run = write_run(out, config=config, metrics=metrics, oof=oof, oof_rows=oof_rows,
                    holdout=hold, holdout_rows=hold_rows, ids=ids, labels=labels, folds=folds,
                    classes=first.classes, extra_files=extra, holdout_folds=hold_folds,
                    top_k=layout.get("k"))
    if say:
        k = first.config["folds"].get("k")
        say(f"merged {len(runs)} runs: folds {trained} of {k}, {len(oof_rows)} out-of-fold rows, "
            f"{len(hold_rows)} holdout rows -> {run.path}")
    return run


def _ids(runs: list[Run], n: int) -> list[str]:
    """Store ids by row, from the parts' predictions.csv (the store may not be reachable)."""
    ids = [""] * n
    for r in runs:
        with (r.path / "predictions.csv").open(newline="") as fh:
            got = [row["id"] for row in csv.DictReader(fh)]
        for row, i in zip(np.concatenate([r.oof_rows, r.holdout_rows]).tolist(), got,
                          strict=True):
            ids[row] = i
    return ids
