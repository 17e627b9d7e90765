"""`embedstore extract` command."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ._common import (
    Quiet,
    StorageOption,
    console,
    err_console,
    handle_errors,
    parse_storage_options,
)
from .embedstore_app import app


class _SpeedColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text("-- items/s" if task.speed is None else f"{task.speed:.1f} items/s")


class _RichProgress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), _SpeedColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                            disable=quiet)
        self.tasks: dict[str, int] = {}

    def start(self, name: str, total: int) -> None:
        if not self.tasks:
            self.bar.start()
        self.tasks[name] = self.bar.add_task(name, total=total)

    def advance(self, name: str, n: int) -> None:
        self.bar.advance(self.tasks[name], n)

    def finish(self, name: str) -> None:
        self.bar.update(self.tasks[name], completed=self.bar.tasks[self.tasks[name]].total)

    def stop(self) -> None:
        self.bar.stop()


@app.command()
@handle_errors
def extract(
    catalog: Annotated[str, typer.Argument(help="CSV, TSV, Parquet or JSONL catalog.")],
    store: Annotated[str, typer.Option("--store", "-s", help="Store path or fsspec URL.")],
    text: Annotated[str | None, typer.Option(help="Text encoder spec, e.g. hf:/models/minilm "
                                             "or open_clip:ViT-B-32@random.")] = None,
    image: Annotated[str | None, typer.Option(help="Image encoder spec, e.g. "
                     "timm:tf_efficientnet_lite0@lite0.safetensors.")] = None,
    id_col: Annotated[str, typer.Option(help="Id column.")] = "id",
    text_cols: Annotated[str, typer.Option(help="Text columns, joined in order.")] =
    "title,description",
    image_col: Annotated[str, typer.Option(help="Image path/URL column.")] = "image",
    label_col: Annotated[str, typer.Option(help="Label column ('' for none).")] = "label",
    layers: Annotated[str, typer.Option(help="Hidden states to keep: -1 | -4,-3,-2,-1 | all "
                                        "(0 = embeddings).")] = "-1",
    max_length: Annotated[int, typer.Option(help="Max tokens per text.")] = 256,
    image_size: Annotated[int | None, typer.Option(help="Override the encoder's input size.")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Items per forward pass.")] = 32,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers for tokenising and "
                                             "image decoding.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 | fp16 | bf16 (AMP on GPU).")] = "fp32",
    text_name: Annotated[str | None, typer.Option(help="Feature-set name for the text "
                                                  "encoder.")] = None,
    image_name: Annotated[str | None, typer.Option(help="Feature-set name for the image "
                                                   "encoder.")] = None,
    folds: Annotated[int, typer.Option(help="Folds (new store only).")] = 5,
    seed: Annotated[int, typer.Option(help="Fold seed (new store only).")] = 0,
    holdout: Annotated[float, typer.Option(help="Holdout share (new store only).")] = 0.2,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted feature "
                                         "set; done rows are skipped.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a complete feature "
                                            "set (swapped in when the new one is complete).")]
    = False,
    max_error_rate: Annotated[float, typer.Option(help="Above this share of failed rows "
                                                  "(bad images, empty texts) the run still "
                                                  "finishes and keeps its data, then exits "
                                                  "1.")] = 0.01,
    block_rows: Annotated[int, typer.Option(help="Rows per write block (power of two).")] = 1024,
    threads: Annotated[int | None, typer.Option(help="CPU threads for the encoder "
                                                "(torch.set_num_threads); default: torch's "
                                                "choice (OMP_NUM_THREADS).")] = None,
    quiet: Quiet = False,
    storage_option: StorageOption = None,
) -> None:
    """Run encoders once over a catalog and cache token states / spatial maps + pooled vectors.

    Examples:

      embedstore extract catalog.csv --store cat.zarr --text hf:/models/minilm --layers -4,-3,-2,-1

      embedstore extract catalog.csv --store cat.zarr --image timm:vit_small_patch16_224@random

      embedstore extract catalog.csv --store s3://bucket/cat.zarr -S endpoint_url=http://127.0.0.1:9000 --text hf:/models/minilm --resume

      torchrun --standalone --nproc-per-node 4 $(which embedstore) extract catalog.csv --store cat.zarr --text hf:/models/minilm

    Exit codes: 0 done; 1 done, but more failed rows than --max-error-rate (data kept); 2 bad
    input, nothing written (one `error:` line). See docs/extract.md.
    """
    import torch

    from embedstore.errors import ExtractionError, InvalidInputError
    from embedstore.extract import ExtractConfig
    from embedstore.extract import extract as run_extract

    if threads is not None:
        if threads < 1:
            raise InvalidInputError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports

    cfg = ExtractConfig(
        text=text, image=image, id_col=id_col,
        text_cols=tuple(c.strip() for c in text_cols.split(",") if c.strip()),
        image_col=image_col, label_col=label_col or None, layers=layers, max_length=max_length,
        image_size=image_size, batch_size=batch_size, num_workers=num_workers, device=device,
        precision=precision, text_name=text_name, image_name=image_name, folds=folds, seed=seed,
        holdout=holdout, resume=resume, overwrite=overwrite, max_error_rate=max_error_rate,
        block_rows=block_rows, storage_options=parse_storage_options(storage_option))
    prog = _RichProgress(quiet or not main_rank)
    failed = None
    try:
        results = run_extract(catalog, store, cfg, progress=prog)
    except ExtractionError as e:
        if not hasattr(e, "results"):
            raise
        failed, results = e, e.results
    finally:
        prog.stop()
    if main_rank:
        for r in results:
            _summary(r)
    if failed is not None:
        if main_rank:
            err_console.print(f"[bold red]error:[/] {escape(str(failed))}")
        raise typer.Exit(1)


def _summary(r) -> None:
    """One line per feature set (items, errors, items/s, bytes), then up to 5 failed rows."""
    def line(text: str) -> None:
        console.print(text, markup=False, soft_wrap=True)

    if r.skipped:
        line(f"{r.name} ({r.modality}, {r.spec}): already complete, nothing to do; "
             f"{r.n_errors} errors, {r.bytes_written} bytes on disk")
    else:
        line(f"{r.name} ({r.modality}, {r.spec}): {r.n_encoded} items, {r.n_errors} errors, "
             f"{r.items_per_second:.1f} items/s, {r.bytes_written} bytes on disk "
             f"({r.bytes_written / 1e6:.1f} MB)")
    for row, msg in list(r.errors.items())[:5]:
        line(f"  row {row}: {msg}")
    if len(r.errors) > 5:
        line(f"  ... {len(r.errors) - 5} more (embedstore info --json)")
