"""`fusion report`: complementarity, per-class F1, confusion and contribution plots.

The leaderboard (`fusion compare`) lives in :mod:`fusion.leaderboard`; ``compare``,
``leaderboard_markdown`` and ``load_runs`` are re-exported here for existing callers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .errors import RunDirError
from .leaderboard import as_run, compare, leaderboard_markdown, load_runs
from .metrics import BUCKETS, confusion, f1_by_frequency
from .metrics import per_class_f1 as _per_class_scores
from .rundir import Run
from .stack import plot_contributions, summarize_contributions

__all__ = ["compare", "complementarity", "report", "leaderboard_markdown", "load_runs",
           "per_class_f1", "train_counts", "frequency_f1"]


def _labels_for(run: Run, rows: np.ndarray) -> np.ndarray:
    labels = run.config.get("labels")
    if labels is None:
        raise RunDirError(f"run {run.name!r} has no labels in config.json; re-run it")
    return np.asarray(labels)[rows]


def complementarity(text_run: Run | str, image_run: Run | str, *, split: str = "holdout"
                    ) -> dict[str, Any]:
    """Both right / only text right / only image right / both wrong, on rows both runs scored.

    ``1 - both_wrong`` is the oracle upper bound any fusion of the two can reach.
    """
    t, i = as_run(text_run), as_run(image_run)
    if t.store_fingerprint != i.store_fingerprint:
        raise RunDirError(f"runs {t.name!r} and {i.name!r} come from different stores")
    tp, tr = t.probs(split), t.rows(split)  # either layout (docs/runs.md section 2.3)
    ip, ir = i.probs(split), i.rows(split)
    common, ti, ii = np.intersect1d(tr, ir, return_indices=True)
    if not len(common):
        raise RunDirError(f"runs {t.name!r} and {i.name!r} share no {split} rows")
    y = _labels_for(t, common)
    tc = tp.argmax(1)[ti] == y
    ic = ip.argmax(1)[ii] == y
    n = len(common)
    out = {"split": split, "n": n,
           "both_right": int((tc & ic).sum()), "only_text_right": int((tc & ~ic).sum()),
           "only_image_right": int((~tc & ic).sum()), "both_wrong": int((~tc & ~ic).sum())}
    out["oracle_accuracy"] = 1 - out["both_wrong"] / n
    out["text_accuracy"] = float(tc.mean())
    out["image_accuracy"] = float(ic.mean())
    return out


def per_class_f1(run: Run) -> dict[str, float]:
    """Class name -> out-of-fold F1; metrics.json holds a list in class order (a dict in runs
    written before the run format was unified)."""
    per = run.metrics.get("per_class_f1") or {}
    if isinstance(per, list):
        return {str(c): float(v) for c, v in zip(run.classes, per, strict=False)}
    return {str(c): float(v) for c, v in per.items()}


def train_counts(run: Run) -> np.ndarray:
    """(K,) training items per class: the labelled out-of-fold rows (every trainable row is
    scored out of fold, so these are the items the fold models learn from)."""
    y = _labels_for(run, run.oof_rows)
    return np.bincount(y[y >= 0], minlength=len(run.classes))


def frequency_f1(run: Run | str) -> dict[str, Any]:
    """Macro-F1 per frequency bucket (head / torso / tail, :func:`fusion.metrics.f1_by_frequency`
    over :func:`train_counts`) for ``"oof"`` and ``"holdout"`` (None without holdout rows)."""
    r = as_run(run)
    counts, k = train_counts(r), len(r.classes)
    out: dict[str, Any] = {}
    for split in ("oof", "holdout"):
        y = _labels_for(r, r.rows(split))
        keep = y >= 0
        pred = r.probs(split).argmax(1)[keep]
        out[split] = (f1_by_frequency(_per_class_scores(y[keep], pred, k),
                                      counts) if keep.any() else None)
    return out


def _frequency_png(run: Run, freq: dict[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    splits = [s for s in ("oof", "holdout") if freq.get(s)]
    width = 0.8 / max(1, len(splits))
    for i, split in enumerate(splits):
        vals = [freq[split][b]["macro_f1"] or 0.0 for b in BUCKETS]
        xs = np.arange(len(BUCKETS)) + i * width
        ax.bar(xs, vals, width, label=split)
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_xticks(np.arange(len(BUCKETS)) + width * (len(splits) - 1) / 2,
                  [f"{b}\n{freq['oof'][b]['classes']} classes" for b in BUCKETS])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("macro-F1")
    ax.legend(fontsize=8)
    ax.set_title(f"{run.name}: F1 by class frequency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _confusion_png(run: Run, path: Path) -> Path:
    y = _labels_for(run, run.oof_rows)
    k = run.probs("oof").shape[1]
    cm = confusion(y, run.probs("oof").argmax(1), k).astype(np.float64)
    cm = np.divide(cm, cm.sum(1, keepdims=True), out=np.zeros_like(cm),
                   where=cm.sum(1, keepdims=True) > 0)  # row-normalised
    size = max(5, min(16, 0.35 * k + 3))
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    names = [str(c) for c in run.classes] or [str(j) for j in range(k)]
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{run.name}: out-of-fold confusion (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _per_class_png(run: Run, path: Path) -> Path:
    per = per_class_f1(run)
    names, vals = list(per), list(per.values())
    order = np.argsort(vals)
    fig = Figure(figsize=(7, max(3, 0.25 * len(names) + 1)))
    ax = fig.subplots()
    ax.barh([names[j] for j in order], [vals[j] for j in order], color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (out-of-fold)")
    ax.set_title(f"{run.name}: per-class F1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def report(run: Run | str, *, out_dir: str | os.PathLike | None = None,
           text_run: Run | str | None = None, image_run: Run | str | None = None
           ) -> dict[str, Any]:
    """Metrics, confusion matrix + per-class F1 PNGs, F1 by frequency bucket (head / torso /
    tail, :func:`frequency_f1`, and its PNG), scores by what the items had (both modalities,
    text only, image only, and for galleries by number of images: ``metrics.json
    ["by_availability"]``), complementarity (given a text and an image run) and, for stacks, the per-source contribution summary and chart."""
    r = as_run(run)
    out = Path(out_dir) if out_dir is not None else r.path
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"name": r.name, "head": r.head, "metrics": {
        k: r.metrics.get(k) for k in ("accuracy", "macro_f1", "holdout", "train_seconds",
                                      "epoch_seconds")}}
    res["frequency"] = frequency_f1(r)
    # both / text only / image only, by_images for galleries (docs/runs.md §2.6); None for
    # runs written before #14
    res["availability"] = r.metrics.get("by_availability")
    res["plots"] = [str(_confusion_png(r, out / "confusion.png")),
                    str(_per_class_png(r, out / "per_class_f1.png")),
                    str(_frequency_png(r, res["frequency"], out / "f1_by_frequency.png"))]
    if text_run is not None and image_run is not None:
        res["complementarity"] = {s: complementarity(text_run, image_run, split=s)
                                  for s in ("oof", "holdout")}
    if (r.path / "contributions.csv").exists():
        res["contributions"] = summarize_contributions(r.path)
        res["plots"].append(str(plot_contributions(r.path, out / "contributions.png")))
    return res
