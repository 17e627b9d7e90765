"""`fusion compare`: the leaderboard of runs from one store, with paired bootstrap intervals.

Every score is computed by :mod:`fusion.metrics` from the run's stored predictions and labels,
so head, fine-tune and stack runs rank on one metric, including runs written before the
metrics were unified. Every run is compared with the leader (or a chosen baseline) on the same
items: the difference in macro-F1 and accuracy with a paired bootstrap interval
(:mod:`fusion.bootstrap`), on the holdout and out of fold. A run whose interval on the ranking
split's macro-F1 contains 0 is *tied* with the baseline: the data do not support an order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .bootstrap import DEFAULT_RESAMPLES, paired_bootstrap
from .compat import check_same_split
from .errors import RunDirError
from .metrics import classification_metrics
from .rundir import Run, load_run

__all__ = ["SPLITS", "as_run", "compare", "interval_text", "leaderboard_markdown", "load_runs",
           "seed_spread", "verdict"]

#: the two splits a run is scored on: key prefix in a row, run attributes
SPLITS = {"holdout": ("holdout_", "holdout", "holdout_rows"), "oof": ("", "oof", "oof_rows")}


def as_run(r: Run | str | os.PathLike) -> Run:
    """``r`` loaded (a :class:`Run` passes through)."""
    return r if isinstance(r, Run) else load_run(r)


def load_runs(paths: Iterable[Run | str | os.PathLike],
              on_skip: Callable[[str, str], None] | None = None) -> list[Run]:
    """The finished runs among ``paths``. With ``on_skip``, a path that is not one (a stray
    log file, an incomplete run) is skipped and ``on_skip(path, reason)`` called; without it,
    :class:`RunDirError` is raised."""
    runs = []
    for p in paths:
        try:
            runs.append(as_run(p))
        except RunDirError as e:
            if on_skip is None:
                raise
            on_skip(str(p), str(e))
    return runs


def _scores(r: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """(out-of-fold, holdout) metrics by :mod:`fusion.metrics`, recomputed from the stored
    predictions when the run records its labels, else as stored."""
    labels = r.config.get("labels")
    if labels is None:
        return r.metrics, r.metrics.get("holdout") or {}
    y = np.asarray(labels)
    hold = (classification_metrics(y[r.holdout_rows], r.probs("holdout"))
            if len(r.holdout_rows) else {})
    return classification_metrics(y[r.oof_rows], r.probs("oof")), hold


def seed_spread(r: Run) -> dict[str, Any] | None:
    """``{"n": seeds, "macro_f1_std", "holdout_macro_f1_std"}`` (sample standard deviation over
    the seeds' scores) when metrics.json lists more than one seed under "seeds", else None."""
    seeds = r.metrics.get("seeds")
    if not isinstance(seeds, list) or len(seeds) < 2:
        return None

    def std(values: list[Any]) -> float | None:
        v = [x for x in values if isinstance(x, int | float)]
        return float(np.std(v, ddof=1)) if len(v) == len(values) else None

    return {"n": len(seeds), "macro_f1_std": std([s.get("macro_f1") for s in seeds]),
            "holdout_macro_f1_std": std([(s.get("holdout") or {}).get("macro_f1")
                                         for s in seeds])}


def _selection(r: Run) -> str:
    """How the run's OOF rows were kept out of model selection (docs/runs.md §2.1)."""
    if r.config.get("kind") == "stack":
        return "cross-fit"
    return "inner split" if r.config.get("selection") else "oof rows"


def _predictions(r: Run, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, predicted class) of the labelled rows ``r`` scored on ``split``."""
    rows_ = np.asarray(r.rows(split))
    keep = np.asarray(r.config["labels"])[rows_] >= 0
    # either layout (docs/runs.md section 2.3): a top-k run answers argmax from its indices
    return rows_[keep], r.probs(split).argmax(1)[keep]


def _paired(run: Run, base: Run, split: str, **boot: Any) -> dict[str, Any] | None:
    """Intervals of run minus base on the labelled rows both scored on ``split``."""
    if "labels" not in run.config or "labels" not in base.config:
        return None
    rows_a, pred_a = _predictions(run, split)
    rows_b, pred_b = _predictions(base, split)
    common, ia, ib = np.intersect1d(rows_a, rows_b, return_indices=True)
    if not len(common):
        return None
    y = np.asarray(run.config["labels"], np.int64)[common]
    k = len(run.classes) or run.probs("oof").shape[1]
    res = paired_bootstrap(y, pred_a[ia], pred_b[ib], k, **boot)
    return {"n": int(len(common)), **{m: iv.as_dict() for m, iv in res.items()}}


def _find(runs: list[Run], rows: list[dict[str, Any]], baseline: str | os.PathLike) -> int:
    want = str(baseline)
    for i, r in enumerate(runs):
        if want == r.name or (Path(want).exists() and Path(want).resolve() == r.path.resolve()):
            return i
    names = ", ".join(row["name"] for row in rows)
    raise RunDirError(f"--baseline {want!r} is not among the runs compared ({names}); pass "
                      "one of their names or paths")


def compare(runs: list[Run | str | os.PathLike], *, sort: str = "holdout",
            baseline: str | os.PathLike | None = None, resamples: int = DEFAULT_RESAMPLES,
            seed: int = 0, stratified: bool = False) -> list[dict[str, Any]]:
    """One row per run, best first (``sort`` split's macro-F1, then out-of-fold macro-F1).

    Each row has the run's scores, its seed ``spread`` (None for one seed), ``oof_selection``
    ("inner split" when the run chose epochs on an inner split, "cross-fit" for stacks, else
    "oof rows": format 1, whose OOF scores are optimistic), and, against the baseline (the leader unless ``baseline`` names a run):
    ``holdout_vs`` / ``oof_vs`` = ``{"n", "macro_f1": {"diff", "lo", "hi", "tied"},
    "accuracy": {...}}`` (run minus baseline, 95% paired bootstrap; None without labels), and
    ``tied``: the ``sort`` split's macro-F1 interval contains 0 (None for the baseline itself).
    """
    if sort not in SPLITS:
        raise RunDirError(f"sort={sort!r} is not holdout or oof; pass --sort holdout or oof")
    if resamples < 1:
        raise RunDirError(f"--resamples {resamples} is below 1; pass e.g. --resamples 1000")
    loaded = [as_run(r) for r in runs]
    if not loaded:
        raise RunDirError("no runs given; pass one or more run directories")
    for r in loaded[1:]:
        check_same_split(loaded[0], r, action="compare", error=RunDirError)
    rows = []
    for r in loaded:
        m, h = _scores(r)
        rows.append({
            "name": r.name, "head": r.head, "kind": r.metrics.get("kind", r.config.get("kind")),
            "macro_f1": m.get("macro_f1"), "accuracy": m.get("accuracy"),
            "holdout_macro_f1": h.get("macro_f1"), "holdout_accuracy": h.get("accuracy"),
            "spread": seed_spread(r),
            "oof_selection": _selection(r),
            "train_seconds": r.metrics.get("train_seconds"),
            "epoch_seconds": r.metrics.get("epoch_seconds"), "path": str(r.path),
        })
    key = "holdout_macro_f1" if sort == "holdout" else "macro_f1"
    order = sorted(range(len(rows)), key=lambda i: (
        rows[i][key] if rows[i][key] is not None else -1, rows[i]["macro_f1"] or -1),
        reverse=True)
    loaded, rows = [loaded[i] for i in order], [rows[i] for i in order]
    b = 0 if baseline is None else _find(loaded, rows, baseline)
    boot = {"resamples": resamples, "seed": seed, "stratified": stratified}
    for r, row in zip(loaded, rows, strict=True):
        row["vs"], row["ranked_on"] = rows[b]["name"], sort
        is_base = r is loaded[b]
        for split in SPLITS:
            row[f"{split}_vs"] = None if is_base else _paired(r, loaded[b], split, **boot)
        main = row[f"{sort}_vs"]
        row["tied"] = None if main is None else main["macro_f1"]["tied"]
    return rows


def _f(v: Any, d: int = 4) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def interval_text(vs: dict[str, Any] | None, metric: str = "macro_f1") -> str:
    """``-0.0125 [-0.0300, +0.0050]`` (run minus baseline), or ``-``."""
    if not vs:
        return "-"
    iv = vs[metric]
    return f"{iv['diff']:+.4f} [{iv['lo']:+.4f}, {iv['hi']:+.4f}]"


def verdict(row: dict[str, Any]) -> str:
    """``baseline``, ``tied`` or ``worse`` / ``better`` (than the baseline), or ``-``."""
    if row["tied"] is None:
        return "baseline" if row["name"] == row["vs"] else "-"
    if row["tied"]:
        return "tied"
    return "better" if row[f"{row['ranked_on']}_vs"]["macro_f1"]["diff"] > 0 else "worse"


def leaderboard_markdown(rows: list[dict[str, Any]]) -> str:
    """The leaderboard as a Markdown table, with the paired intervals against the baseline."""
    head = ("| rank | run | head | holdout macro-F1 | Δ vs baseline [95% CI] | holdout acc | "
            "OOF macro-F1 | Δ OOF [95% CI] | OOF acc | seed sd | verdict | train s |\n"
            "|---:|---|---|---:|---|---:|---:|---|---:|---:|---|---:|\n")
    body = ""
    for i, r in enumerate(rows, 1):
        sd = (r.get("spread") or {}).get("holdout_macro_f1_std")
        body += (f"| {i} | {r['name']} | {r['head']} | {_f(r['holdout_macro_f1'])} | "
                 f"{interval_text(r.get('holdout_vs'))} | {_f(r['holdout_accuracy'])} | "
                 f"{_f(r['macro_f1'])} | {interval_text(r.get('oof_vs'))} | "
                 f"{_f(r['accuracy'])} | {_f(sd)} | {verdict(r)} | "
                 f"{_f(r['train_seconds'], 1)} |\n")
    return head + body
