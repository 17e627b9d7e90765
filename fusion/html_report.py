"""`fusion report RUN... --html FILE`: one self-contained HTML page for a set of runs.

The page needs no network when viewed: the style, the script (table sorting) and the charts
(inline SVG) are all in the file. Sections: the leaderboard with its paired bootstrap intervals
(:func:`fusion.leaderboard.compare`), the text-vs-image complementarity table, F1 by class
frequency (head / torso / tail), per-class F1 (sortable), the most confused class pairs (top
N, never a full K x K matrix), stack attributions (mean |TreeSHAP| per source run) and each
run's config (collapsible).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .bootstrap import DEFAULT_RESAMPLES
from .leaderboard import as_run, compare, interval_text, verdict
from .metrics import BUCKETS, confusion, f1_by_frequency, frequency_buckets, per_class_f1
from .report import complementarity, train_counts
from .rundir import Run
from .stack import summarize_contributions
from .stack.inputs import modalities

__all__ = ["html_report", "confused_pairs"]

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1560px;color:#1d2330;padding:0 16px}.wide{overflow-x:auto}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #dde;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{padding:4px 8px;border-bottom:1px solid #e4e6ee;
text-align:right;white-space:nowrap;font-size:13px}th{background:#f3f4f8;cursor:pointer;user-select:none}
td.l,th.l{text-align:left}tr.tied td{background:#fff8e1}tr.baseline td{background:#e8f4ea}
.note{color:#5a6275;font-size:13px}details{margin:6px 0}summary{cursor:pointer;font-weight:600}
pre{background:#f6f7fa;padding:8px;overflow:auto;max-height:420px;font-size:12px}
"""

_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (t) {
  t.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.dataset.dir === 'desc' ? 1 : -1;
      th.dataset.dir = dir === 1 ? 'asc' : 'desc';
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v || a.cells[col].textContent;
        var y = b.cells[col].dataset.v || b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        if (!isNaN(nx) && !isNaN(ny)) { return dir * (nx - ny); }
        return dir * x.localeCompare(y);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
document.body.dataset.ready = '1';
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _f(v: Any, d: int = 4) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _table(header: list[str], rows: list[list[Any]], *, cls: str = "sortable", left: int = 1,
           row_cls: list[str] | None = None, tid: str = "") -> str:
    """A table; the first ``left`` columns are left-aligned; float cells keep their value in
    ``data-v`` for sorting."""
    th = "".join(f'<th class="{"l" if j < left else ""}">{_e(h)}</th>'
                 for j, h in enumerate(header))
    body = []
    for i, r in enumerate(rows):
        tds = "".join(
            f'<td class="{"l" if j < left else ""}" data-v="{v!r}">{_f(v)}</td>'
            if isinstance(v, float) else
            f'<td class="{"l" if j < left else ""}">{"-" if v is None else _e(v)}</td>'
            for j, v in enumerate(r))
        rc = f' class="{row_cls[i]}"' if row_cls else ""
        body.append(f"<tr{rc}>{tds}</tr>")
    idattr = f' id="{tid}"' if tid else ""
    return (f'<div class="wide"><table class="{cls}"{idattr}><thead><tr>{th}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _forest_svg(rows: list[dict[str, Any]], split: str) -> str:
    """Difference to the baseline with its 95% interval, one line per run (inline SVG)."""
    key = f"{split}_vs"
    pts = [(r["name"], r[key]["macro_f1"]) for r in rows if r.get(key)]
    if not pts:
        return ""
    lo = min(min(iv["lo"] for _, iv in pts), 0.0)
    hi = max(max(iv["hi"] for _, iv in pts), 0.0)
    span = (hi - lo) or 1.0
    w, left, row_h = 760, 200, 22
    h = row_h * len(pts) + 54

    def x(v: float) -> float:
        return left + (v - lo) / span * (w - left - 20)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             f'aria-label="macro-F1 difference to {_e(rows[0]["vs"])}">',
             f'<line x1="{x(0):.1f}" y1="6" x2="{x(0):.1f}" y2="{h - 42}" stroke="#888" '
             'stroke-dasharray="4 3"/>']
    for i, (name, iv) in enumerate(pts):
        y = 18 + i * row_h
        color = "#c98a00" if iv["tied"] else "#2b6cb0"
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end" font-size="12">'
                     f'{_e(name)}</text>'
                     f'<line x1="{x(iv["lo"]):.1f}" y1="{y}" x2="{x(iv["hi"]):.1f}" y2="{y}" '
                     f'stroke="{color}" stroke-width="2"/>'
                     f'<circle cx="{x(iv["diff"]):.1f}" cy="{y}" r="4" fill="{color}"/>')
    for v in (lo, 0.0, hi):
        parts.append(f'<text x="{x(v):.1f}" y="{h - 26}" text-anchor="middle" font-size="11">'
                     f'{v:+.3f}</text>')
    parts.append(f'<text x="{(left + w) / 2:.0f}" y="{h - 6}" text-anchor="middle" '
                 f'font-size="12">{split} macro-F1 minus {_e(rows[0]["vs"])} (95% CI)</text>')
    return "".join(parts) + "</svg>"


def _bars_svg(values: dict[str, float], title: str) -> str:
    """Horizontal bars (inline SVG), one per key."""
    if not values:
        return ""
    vmax = max(max(values.values()), 1e-12)
    w, left, row_h = 640, 180, 22
    h = row_h * len(values) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             f'aria-label="{_e(title)}"><text x="4" y="14" font-size="12">{_e(title)}</text>']
    for i, (k, v) in enumerate(values.items()):
        y = 24 + i * row_h
        bw = v / vmax * (w - left - 70)
        parts.append(f'<text x="{left - 8}" y="{y + 12}" text-anchor="end" font-size="12">'
                     f'{_e(k)}</text><rect x="{left}" y="{y}" width="{bw:.1f}" height="15" '
                     f'fill="#4c72b0"/><text x="{left + bw + 6:.1f}" y="{y + 12}" '
                     f'font-size="11">{v:.4f}</text>')
    return "".join(parts) + "</svg>"


def _labelled(run: Run, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted class) of the labelled rows ``run`` scored on ``split``."""
    y = np.asarray(run.config["labels"], np.int64)[run.rows(split)]
    keep = y >= 0
    return y[keep], run.probs(split).argmax(1)[keep]  # either layout (docs/runs.md 2.3)


def confused_pairs(run: Run, split: str = "holdout", top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` most frequent (true, predicted) mistakes: count and share of the true
    class's items, most frequent first (ties by class order)."""
    y, pred = _labelled(run, split)
    k = len(run.classes)
    cm = confusion(y, pred, k)
    np.fill_diagonal(cm, 0)
    flat = cm.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[:top]
    support = np.bincount(y, minlength=k)
    return [{"true": str(run.classes[i // k]), "predicted": str(run.classes[i % k]),
             "count": int(flat[i]), "share": float(flat[i] / support[i // k])}
            for i in order if flat[i] > 0]


def _split_block(av: dict[str, Any] | None, split: str) -> dict[str, Any] | None:
    """The by-availability block of ``split`` (OOF at the top level, holdout nested)."""
    if not av:
        return None
    return av.get("holdout") if split == "holdout" else av


def _config_view(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without its per-row lists (labels, ids, fold assignment), which are shown
    as their length."""
    out = {}
    for k, v in cfg.items():
        if k in ("labels", "ids") and isinstance(v, list):
            out[k] = f"<{len(v)} entries>"
        elif k == "folds" and isinstance(v, dict):
            out[k] = {fk: (f"<{len(fv)} entries>" if isinstance(fv, list) else fv)
                      for fk, fv in v.items()}
        else:
            out[k] = v
    return out


def _pick(runs: list[Run], mod: str) -> Run | None:
    hits = [r for r in runs if modalities(r) == [mod]]
    return hits[0] if hits else None


def _sections(loaded: list[Run], board: list[dict[str, Any]], split: str, top: int,
              text_run: Run | None, image_run: Run | None) -> list[str]:
    out = []
    rows = [[i, r["name"], r["head"], r["holdout_macro_f1"], interval_text(r["holdout_vs"]),
             verdict(r), (r["spread"] or {}).get("holdout_macro_f1_std"), r["holdout_accuracy"],
             r["macro_f1"], interval_text(r["oof_vs"]), r["accuracy"], r["oof_selection"]]
            for i, r in enumerate(board, 1)]
    cls = ["baseline" if verdict(r) == "baseline" else "tied" if r["tied"] else "run"
           for r in board]
    out.append("<h2>Leaderboard</h2>" + _table(
        ["#", "run", "head", "holdout macro-F1", f"Δ vs {board[0]['vs']} [95% CI]", "verdict",
         "seed sd", "holdout acc", "OOF macro-F1", "Δ OOF [95% CI]", "OOF acc",
         "OOF selection"], rows, left=3, row_cls=cls, tid="leaderboard")
        + f'<p class="note">Δ = run minus {_e(board[0]["vs"])} on the same items, 95% paired '
        "bootstrap interval; <b>tied</b>: the interval on the ranking split contains 0, so "
        "the data do not order the two runs.</p>" + _forest_svg(board, board[0]["ranked_on"]))
    if text_run is not None and image_run is not None:
        comp = []
        for s in ("holdout", "oof"):
            if s == "holdout" and not len(text_run.holdout_rows):
                continue
            c = complementarity(text_run, image_run, split=s)
            comp.append(_table([f"{s} (n={c['n']})", "items", "share"], [
                [k.replace("_", " "), c[k], c[k] / c["n"]]
                for k in ("both_right", "only_text_right", "only_image_right", "both_wrong")]
                + [["oracle (fusion upper bound)", "", c["oracle_accuracy"]]], cls="plain"))
        out.append(f"<h2>Text vs image: {_e(text_run.name)} / {_e(image_run.name)}</h2>"
                   + "".join(comp))
    names = [r.name for r in loaded]
    avail = [(r.name, _split_block(r.metrics.get("by_availability"), split)) for r in loaded]
    if any(b for _, b in avail):
        groups = ("both", "text_only", "image_only")
        out.append(f"<h2>By availability ({split})</h2>" + _table(
            ["run", *(f"{g.replace('_', ' ')} macro-F1 (n)" for g in groups)],
            [[n, *(f"{_f(b[g]['macro_f1'])} ({b[g]['n']})" if b else "" for g in groups)]
             for n, b in avail], tid="availability")
            + '<p class="note">Items by what they have in the store: both modalities, the text '
            "only (no photo, or an unreadable one), the image only (empty text); macro-F1 over "
            "all classes.</p>")
    k = len(loaded[0].classes)
    per = [per_class_f1(*_labelled(r, split), k) for r in loaded]
    support = np.bincount(_labelled(loaded[0], split)[0], minlength=k)
    counts = train_counts(loaded[0])
    bucket = frequency_buckets(counts)
    freq = [f1_by_frequency(p, counts) for p in per]
    out.append(f"<h2>F1 by class frequency ({split})</h2>" + _table(
        ["run", *(f"{b} ({freq[0][b]['classes']} classes, {freq[0][b]['items']} items)"
                  for b in BUCKETS)],
        [[n, *(fr[b]["macro_f1"] for b in BUCKETS)] for n, fr in zip(names, freq, strict=True)],
        tid="frequency")
        + '<p class="note">Classes ranked by training items (most first): <b>head</b> = the '
        "largest classes holding the first 50% of the training items, <b>torso</b> the next "
        "30%, <b>tail</b> the rest; macro-F1 over each bucket's classes.</p>")
    out.append(f"<h2>Per-class F1 ({split})</h2>" + _table(
        ["class", "items", "train items", "bucket", *names],
        [[str(c), int(support[j]), int(counts[j]), BUCKETS[bucket[j]],
          *(float(p[j]) for p in per)] for j, c in enumerate(loaded[0].classes)],
        tid="per-class"))
    conf = "".join(
        f"<details{' open' if i == 0 else ''}><summary>{_e(r.name)}</summary>"
        + _table(["true", "predicted", "count", "share of true class"],
                 [[p["true"], p["predicted"], p["count"], p["share"]]
                  for p in confused_pairs(r, split, top)], left=2) + "</details>"
        for i, r in enumerate(loaded))
    out.append(f"<h2>Most confused class pairs ({split}, top {top})</h2>{conf}")
    att = []
    for r in loaded:
        if (r.path / "contributions.csv").exists():
            s = summarize_contributions(r.path)
            att.append(f"<h3>{_e(r.name)}</h3>" + _table(
                ["source run", "mean |contribution|", "decided"],
                [[g, float(v), s["decided_by"].get(g, 0)] for g, v in s["mean_abs"].items()])
                + _bars_svg(s["mean_abs"], f"{r.name}: mean |TreeSHAP| per source run"))
    if att:
        out.append("<h2>Stack attributions</h2>" + "".join(att))
    out.append("<h2>Configs</h2>" + "".join(
        f"<details><summary>{_e(r.name)} ({_e(r.path)})</summary><pre>"
        f"{_e(json.dumps(_config_view(r.config), indent=2, default=str))}</pre></details>"
        for r in loaded))
    return out


def html_report(runs: list[Run | str | os.PathLike], out: str | os.PathLike, *,
                text_run: Run | str | os.PathLike | None = None,
                image_run: Run | str | os.PathLike | None = None, split: str = "holdout",
                top: int = 10, baseline: str | None = None,
                resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Path:
    """Write the report page for ``runs`` to ``out`` and return its path.

    The complementarity table uses ``text_run`` / ``image_run``, else the first text-only and
    image-only runs among ``runs``. Per-class F1 and confused pairs are on ``split``
    ("holdout", or "oof" for a store without a holdout).
    """
    loaded = [as_run(r) for r in runs]
    board = compare(loaded, baseline=baseline, resamples=resamples, seed=seed)
    by_name = {r.name: r for r in loaded}
    loaded = [by_name[row["name"]] for row in board]  # leaderboard order
    if split == "holdout" and not any(len(r.holdout_rows) for r in loaded):
        split = "oof"
    t = as_run(text_run) if text_run is not None else _pick(loaded, "text")
    i = as_run(image_run) if image_run is not None else _pick(loaded, "image")
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    store = loaded[0].config.get("store") or {}
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>fusion report: {len(loaded)} runs</title><style>{_STYLE}</style></head><body>"
        f"<h1>fusion report: {len(loaded)} runs</h1><p class=\"note\">store "
        f"{_e(store.get('url', '?'))} (fingerprint {_e(store.get('fingerprint', '?'))}); "
        f"{resamples} bootstrap resamples, seed {seed}; written {when}</p>"
        + "".join(_sections(loaded, board, split, top, t, i))
        + f"<script>{_SCRIPT}</script></body></html>\n")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
