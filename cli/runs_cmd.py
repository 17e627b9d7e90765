"""`fusion compare` and `fusion report`: leaderboards and per-run reports over run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from fusion.bootstrap import DEFAULT_RESAMPLES
from fusion.errors import RunDirError
from fusion.html_report import html_report
from fusion.leaderboard import compare as rank_runs
from fusion.leaderboard import interval_text, leaderboard_markdown, load_runs, verdict
from fusion.report import report as run_report

from ._common import JsonFlag, console, err_console, handle_errors

__all__ = ["compare", "report"]


def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


@handle_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (what is not a finished "
                                               "run is skipped with a note).")],
    sort: Annotated[str, typer.Option(help="Rank on the holdout | oof macro-F1.")] = "holdout",
    baseline: Annotated[str | None, typer.Option(
        help="Run (name or path) every other run is compared with; default: the leader.")]
    = None,
    resamples: Annotated[int, typer.Option(
        help="Bootstrap resamples of the items (paired: both runs on the same draws).")]
    = DEFAULT_RESAMPLES,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap draws (same seed, same "
                                      "intervals).")] = 0,
    stratified: Annotated[bool, typer.Option(
        "--stratified", help="Resample items within each class (class sizes fixed).")]
    = False,
    json_out: JsonFlag = False,
    markdown: Annotated[Path | None, typer.Option(help="Also write the table as Markdown.")]
    = None,
) -> None:
    """Leaderboard of runs (heads, stacks, fine-tunes) from one store, on one macro-F1, with
    95% paired bootstrap intervals of each run minus the leader (or --baseline) on the same
    items; "tied" = the interval on the ranking split contains 0 (no order is supported).

    Example: fusion compare runs/* --seed 0 --resamples 1000

    Example: fusion compare runs/text runs/image runs/hanet --baseline text --stratified
    """
    def skip(path: str, reason: str) -> None:
        err_console.print(f"note: skipping {escape(path)}: {escape(reason)}")

    loaded = load_runs(runs, on_skip=skip)
    if not loaded:
        raise RunDirError(f"none of the {len(runs)} path(s) is a finished run; pass the --out "
                          "of `fusion train` or `fusion stack`")
    rows = rank_runs(loaded, sort=sort, baseline=baseline, resamples=resamples, seed=seed,
                     stratified=stratified)
    if markdown:
        markdown.write_text(leaderboard_markdown(rows))
    if json_out:
        console.print_json(json.dumps(rows, default=str))
        return
    spread = any(r["spread"] for r in rows)
    t = Table("#", "run", "head", "holdout F1", f"Δ vs {escape(rows[0]['vs'])} [95% CI]",
              "holdout acc", "OOF F1", "Δ OOF [95% CI]", "OOF acc",
              *(["seed sd"] if spread else []), "", "train s",
              caption=f"{resamples} paired bootstrap resamples{' by class' if stratified else ''}"
                      f", seed {seed}; ranked on {sort} macro-F1")
    for i, r in enumerate(rows, 1):
        sd = [_fmt((r["spread"] or {}).get(f"{'holdout_' if sort == 'holdout' else ''}"
                                           "macro_f1_std"))] if spread else []
        v = verdict(r)
        t.add_row(str(i), escape(r["name"]), escape(r["head"]), _fmt(r["holdout_macro_f1"]),
                  interval_text(r["holdout_vs"]), _fmt(r["holdout_accuracy"]),
                  _fmt(r["macro_f1"]), interval_text(r["oof_vs"]), _fmt(r["accuracy"]), *sd,
                  f"[bold]{v}[/]" if v == "tied" else v, _fmt(r["train_seconds"], 1))
    console.print(t)
    if any(r["oof_selection"] == "oof rows" for r in rows):
        console.print("note: runs without an inner selection split (format 1) chose their "
                      "epochs on the OOF rows: their OOF scores are optimistic")


@handle_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (one, or several with "
                                               "--html).")],
    text_run: Annotated[Path | None, typer.Option("--text-run", help="Text-only run for the "
                                                  "complementarity table.")] = None,
    image_run: Annotated[Path | None, typer.Option("--image-run", help="Image-only run.")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Where to write PNGs (default: the run "
                                             "directory).")] = None,
    html: Annotated[Path | None, typer.Option(
        "--html", help="Write one self-contained HTML page for all the runs (leaderboard with "
        "intervals, complementarity, per-class F1, confused pairs, attributions, configs).")]
    = None,
    top: Annotated[int, typer.Option(help="Confused class pairs shown per run (--html).")]
    = 10,
    seed: Annotated[int, typer.Option(help="Seed of the leaderboard's bootstrap (--html).")]
    = 0,
    json_out: JsonFlag = False,
) -> None:
    """Metrics, confusion matrix and per-class F1 PNGs; the text-vs-image complementarity
    table (oracle bound of fusion) with --text-run/--image-run; contributions for stacks.
    With --html, one self-contained page (no network needed to view it) for several runs.

    Example: fusion report runs/hanet --text-run runs/text --image-run runs/image

    Example: fusion report runs/text runs/image runs/hanet runs/coattention runs/stack-lgbm --html report.html
    """
    if html is not None:
        path = html_report(runs, html, text_run=text_run, image_run=image_run, top=top,
                           seed=seed)
        console.print(f"wrote {escape(str(path))}")
        return
    if len(runs) != 1:
        raise RunDirError(f"{len(runs)} runs given without --html; the PNG report takes one "
                          "run: pass --html report.html for one page over several runs")
    run = runs[0]
    res = run_report(run, out_dir=out, text_run=text_run, image_run=image_run)
    if json_out:
        console.print_json(json.dumps(res, default=str))
        return
    m = res["metrics"]
    h = m.get("holdout") or {}
    console.print(f"[bold]{res['name']}[/] ({res['head']}): OOF macro-F1 {_fmt(m['macro_f1'])}, "
                  f"acc {_fmt(m['accuracy'])}; holdout macro-F1 {_fmt(h.get('macro_f1'))}, acc "
                  f"{_fmt(h.get('accuracy'))}")
    for split, fr in res["frequency"].items():
        if fr:
            console.print(f"{split} macro-F1 by class frequency: " + ", ".join(
                f"{b} {_fmt(v['macro_f1'])} ({v['classes']} classes)" for b, v in fr.items()),
                markup=False)
    av = res.get("availability")
    for split, block in (("oof", av), ("holdout", (av or {}).get("holdout"))):
        if block:
            console.print(f"{split} by availability: " + ", ".join(
                f"{k.replace('_', ' ')} macro-F1 {_fmt(block[k]['macro_f1'])} (n={block[k]['n']})"
                for k in ("both", "text_only", "image_only") if block[k]["n"]), markup=False)
            if block.get("by_images"):  # galleries: items by number of readable images
                console.print(f"{split} by number of images: " + ", ".join(
                    f"{k} macro-F1 {_fmt(v['macro_f1'])} (n={v['n']})"
                    for k, v in block["by_images"].items() if v["n"]), markup=False)
    for split, c in (res.get("complementarity") or {}).items():
        t = Table(f"{split} (n={c['n']})", "items", "share", title="text vs image")
        for key in ("both_right", "only_text_right", "only_image_right", "both_wrong"):
            t.add_row(key.replace("_", " "), str(c[key]), f"{c[key] / c['n']:.1%}")
        t.add_row("oracle (fusion upper bound)", "", f"{c['oracle_accuracy']:.1%}")
        console.print(t)
    if "contributions" in res:
        c = res["contributions"]
        t = Table("source run", "mean |contribution|", title="stacker attributions")
        for k, v in c.get("mean_abs", {}).items():
            t.add_row(k, f"{v:.4f}")
        console.print(t)
        if "non_text_decided" in c:
            console.print(f"items decided by a non-text run: {c['non_text_decided']}")
    for p in res["plots"]:
        console.print(f"wrote {p}")
