"""Which source run decided: TreeSHAP contributions grouped per run, ``contributions.csv``,
its summary and its chart.

A GBDT stacker's per-row contributions to the margin of the predicted class (one column per
feature, plus the bias) are summed over each source run's K columns (:func:`group_matrix`), so
``sum(run columns) + bias`` is the model's raw margin for that class (docs/stacking.md).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StackError
from ..rundir import Run, load_run

__all__ = [
    "CONTRIBUTIONS_FILE",
    "group_matrix",
    "plot_contributions",
    "summarize_contributions",
    "write_contributions",
]

CONTRIBUTIONS_FILE = "contributions.csv"


def group_matrix(n_runs: int, k: int, n_pooled: int) -> np.ndarray:
    """(F + 1, G) 0/1 matrix summing feature contributions into [runs..., pooled?, bias]."""
    n_groups = n_runs + (1 if n_pooled else 0) + 1
    g = np.zeros((n_runs * k + n_pooled + 1, n_groups))
    for r in range(n_runs):
        g[r * k : (r + 1) * k, r] = 1.0
    if n_pooled:
        g[n_runs * k : n_runs * k + n_pooled, n_runs] = 1.0
    g[-1, -1] = 1.0
    return g


def write_contributions(path: Path, *, ids: Sequence[str], splits: Sequence[str],
                        folds: Sequence[int], true: Sequence[str], predicted: Sequence[str],
                        groups: Sequence[str], values: np.ndarray) -> None:
    """``id,split,fold,true,predicted,<group>...`` one row per explained item (``values``
    (N, G)); a row of NaN was not explained (the candidate stacker explains a seeded sample of
    each scored block, ``explain_rows``) and is left out."""
    explained = np.flatnonzero(~np.isnan(values).all(1)) if len(values) else range(0)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "split", "fold", "true", "predicted", *groups])
        for i in explained:
            w.writerow([ids[i], splits[i], folds[i], true[i], predicted[i],
                        *(f"{v:.9g}" for v in values[i])])


def _read_contributions(run_dir: str | os.PathLike) -> tuple[Run, list[str], list[dict]]:
    run = load_run(run_dir)
    f = run.path / CONTRIBUTIONS_FILE
    if not f.exists():
        reason = (run.metrics.get("attribution") or {}).get("reason") or "not a GBDT stack"
        raise StackError(
            f"{str(run.path)!r} has no {CONTRIBUTIONS_FILE} ({reason}); use "
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
        raise StackError(f"{str(run.path)!r}: {CONTRIBUTIONS_FILE} is empty")
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # slow import, plots only
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
