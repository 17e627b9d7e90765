"""`fusion predict` (a head run on a store's items, or a bundle on a raw catalog; top-k to CSV)
and `fusion export` (a head run packaged as a bundle for serving)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embedstore import open_store
from fusion.bundle import export_bundle
from fusion.config import TOP_K_STORE
from fusion.predict import DEFAULT_TOP_K, ROW_CHOICES, PredictError, Predictions
from fusion.predict import predict as run_predict
from fusion.predictor import Predictor

from ._common import StorageOption, console, handle_errors, parse_storage_options

__all__ = ["predict", "export"]


@handle_errors
def predict(
    out: Annotated[Path, typer.Option(help="CSV to write: id, class_1, prob_1, ... "
                                      "(written whole, then renamed).")],
    run: Annotated[Path | None, typer.Option("--run", "-r", help="A head or stack run "
                                             "directory (`fusion train` / `fusion stack`); with "
                                             "--store.")] = None,
    store: Annotated[str | None, typer.Option(help="Store (path or URL) holding the items, "
                                              "with the feature sets the run used.")] = None,
    bundle: Annotated[Path | None, typer.Option(help="A bundle (`fusion export`): encoders run "
                                                "live on --catalog's raw items.")] = None,
    catalog: Annotated[Path | None, typer.Option(help="Raw catalog (CSV / Parquet / JSONL) "
                                                 "for --bundle.")] = None,
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
    """Predict items with a head run on a store (the mean of its fold models' probabilities,
    what the run's holdout.npy holds for its holdout rows; the run's feature identity must
    match the store's), with a stack run (its source runs first, then its stackers, as it
    scored its holdout), or with a bundle on a raw catalog (encoders live).

    Example: fusion predict --run runs/hanet --store cat.zarr --rows holdout --out preds.csv

    Example: fusion predict -r runs/text --store cat.zarr --top-k 3 --out top3.csv -q

    Example: fusion predict -r runs/stack-lgbm --store cat.zarr --rows holdout --out stack.csv

    Example: fusion export runs/hanet --out model && fusion predict --bundle model --catalog data/catalog.csv --out live.csv -q
    """
    if top_k < 1:
        raise PredictError(f"--top-k {top_k}: need at least 1")
    if (bundle is None) == (run is None) or (run is not None and store is None) or (
            bundle is not None and catalog is None):
        raise PredictError("pass either --run RUN --store STORE, or --bundle DIR --catalog FILE")
    bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=quiet, transient=True)
    with bar:
        task = bar.add_task("predict", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if bundle is not None:
            p = Predictor.load(bundle, device=device, trust_code=trust_code)
            cat_ids, probs = p.predict_catalog(catalog, batch_size=min(batch_size, 64),
                                               progress=tick)
            pred = Predictions(ids=np.asarray(cat_ids), rows=np.arange(len(cat_ids)),
                               probs=probs, classes=p.classes)
        else:
            id_list = None
            if ids is not None:
                id_list = [ln.strip() for ln in ids.read_text().splitlines() if ln.strip()]
            s = open_store(store, storage_options=parse_storage_options(storage_option))
            pred = run_predict(run, s, rows=rows, ids=id_list, batch_size=batch_size,
                               device=device, threads=threads, trust_code=trust_code,
                               keep=max(top_k, TOP_K_STORE), progress=tick)
    pred.write_csv(out, top_k)
    k = min(top_k, len(pred.classes))
    console.print(f"{len(pred.ids)} items -> {escape(str(out))} (top {k} of "
                  f"{len(pred.classes)} classes)")


@handle_errors
def export(
    run: Annotated[Path, typer.Argument(help="A head run (`fusion train --out`) or a stack "
                                        "run (`fusion stack --out`) directory.")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")],
    store: Annotated[str | None, typer.Option(help="The run's store (default: the URL its "
                                              "config records).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out.")] = False,
) -> None:
    """Package a head run for serving: fold models (safetensors), head config, classes, and
    the encoders' provenance with their weights' sha256 (the weights themselves are not
    copied; `Predictor.load` checks them). A user-code head's source is copied into code/.
    A stack run is packaged with its saved stackers and each source run as a bundle under
    sources/.

    Example: fusion export runs/hanet --out model --overwrite

    Example: fusion export runs/stack-lgbm --out stack-model && fusion predict --bundle stack-model --catalog data/catalog.csv --out preds.csv -q
    """
    path = export_bundle(run, out, store=store, overwrite=overwrite)
    console.print(f"bundle -> {escape(str(path))}")
