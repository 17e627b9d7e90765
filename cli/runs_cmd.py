"""`fusion compare` and `fusion report`: leaderboards and per-run reports over run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from fusion.errors import RunDirError
from fusion.report import compare as rank_runs
from fusion.report import leaderboard_markdown, load_runs
from fusion.report import report as run_report

from ._common import JsonFlag, console, err_console, handle_errors

__all__ = ["compare", "report"]


def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


@handle_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (what is not a finished "
                                               "run is skipped with a note).")],
    sort: Annotated[str, typer.Option(help="holdout | oof")] = "holdout",
    json_out: JsonFlag = False,
    markdown: Annotated[Path | None, typer.Option(help="Also write the table as Markdown.")]
    = None,
) -> None:
    """Leaderboard of runs (heads, stacks, fine-tunes) from one store, on one macro-F1.

    Example: fusion compare runs/*
    """
    def skip(path: str, reason: str) -> None:
        err_console.print(f"note: skipping {escape(path)}: {escape(reason)}")

    loaded = load_runs(runs, on_skip=skip)
    if not loaded:
        raise RunDirError(f"none of the {len(runs)} path(s) is a finished run; pass the --out "
                          "of `fusion train` or `fusion stack`")
    rows = rank_runs(loaded, sort=sort)
    if markdown:
        markdown.write_text(leaderboard_markdown(rows))
    if json_out:
        console.print_json(json.dumps(rows, default=str))
        return
    t = Table("#", "run", "head", "holdout F1", "holdout acc", "OOF F1", "OOF acc", "train s")
    for i, r in enumerate(rows, 1):
        t.add_row(str(i), r["name"], r["head"], _fmt(r["holdout_macro_f1"]),
                  _fmt(r["holdout_accuracy"]), _fmt(r["macro_f1"]), _fmt(r["accuracy"]),
                  _fmt(r["train_seconds"], 1))
    console.print(t)


@handle_errors
def report(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    text_run: Annotated[Path | None, typer.Option("--text-run", help="Text-only run for the "
                                                  "complementarity table.")] = None,
    image_run: Annotated[Path | None, typer.Option("--image-run", help="Image-only run.")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Where to write PNGs (default: the run "
                                             "directory).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Metrics, confusion matrix and per-class F1 PNGs; the text-vs-image complementarity
    table (oracle bound of fusion) with --text-run/--image-run; contributions for stacks.

    Example: fusion report runs/hanet --text-run runs/text --image-run runs/image
    """
    res = run_report(run, out_dir=out, text_run=text_run, image_run=image_run)
    if json_out:
        console.print_json(json.dumps(res, default=str))
        return
    m = res["metrics"]
    h = m.get("holdout") or {}
    console.print(f"[bold]{res['name']}[/] ({res['head']}): OOF macro-F1 {_fmt(m['macro_f1'])}, "
                  f"acc {_fmt(m['accuracy'])}; holdout macro-F1 {_fmt(h.get('macro_f1'))}, acc "
                  f"{_fmt(h.get('accuracy'))}")
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
