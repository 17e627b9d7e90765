"""`fusion predict`: a head run's fold models applied to items of a store, top-k to CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embedstore import open_store
from fusion.predict import DEFAULT_TOP_K, ROW_CHOICES, PredictError
from fusion.predict import predict as run_predict

from ._common import StorageOption, console, handle_errors, parse_storage_options

__all__ = ["predict"]


@handle_errors
def predict(
    run: Annotated[Path, typer.Option("--run", "-r", help="A head run directory "
                                      "(`fusion train --out`).")],
    store: Annotated[str, typer.Option(help="Store (path or URL) holding the items, with "
                                       "the feature sets the run was trained on.")],
    out: Annotated[Path, typer.Option(help="CSV to write: id, class_1, prob_1, ... "
                                      "(written whole, then renamed).")],
    rows: Annotated[str, typer.Option(help=f"Which rows: {' | '.join(ROW_CHOICES)}.")] = "all",
    ids: Annotated[Path | None, typer.Option(help="File with one id per line to predict, in "
                                             "that order (instead of --rows).")] = None,
    top_k: Annotated[int, typer.Option(help="Classes per item in the CSV.")] = DEFAULT_TOP_K,
    batch_size: Annotated[int, typer.Option(help="Items per forward.")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    trust_code: Annotated[bool, typer.Option(
        "--trust-code", help="Allow a run whose head is user code (a file, module or entry "
        "point) to run that code. Read it first.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    storage_option: StorageOption = None,
) -> None:
    """Predict items of a store with a head run: the mean of its fold models' probabilities
    (what the run's holdout.npy holds for its holdout rows). The run's feature identity
    (feature-set name, encoder weights, layers, preprocessing) must match the store's.

    Example: fusion predict --run runs/hanet --store cat.zarr --rows holdout --out preds.csv

    Example: fusion predict -r runs/text --store cat.zarr --top-k 3 --out top3.csv -q
    """
    if top_k < 1:
        raise PredictError(f"--top-k {top_k}: need at least 1")
    id_list = None
    if ids is not None:
        id_list = [line.strip() for line in ids.read_text().splitlines() if line.strip()]
    s = open_store(store, storage_options=parse_storage_options(storage_option))
    bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=quiet, transient=True)
    with bar:
        task = bar.add_task("predict", total=None)
        pred = run_predict(run, s, rows=rows, ids=id_list, batch_size=batch_size, device=device,
                           threads=threads, trust_code=trust_code,
                           progress=lambda done, total: bar.update(task, completed=done,
                                                                   total=total))
    pred.write_csv(out, top_k)
    k = min(top_k, len(pred.classes))
    console.print(f"{len(pred.ids)} items -> {escape(str(out))} (top {k} of "
                  f"{len(pred.classes)} classes)")
