"""`embedstore extract` (a plain function, registered by :mod:`cli.embedstore_app`) and its
rich progress bar.

Every option defaults to ``None`` = "not given": :class:`embedstore.extract.ExtractConfig`
states each default once; the help texts quote them from there.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated

import torch
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

from embedstore.errors import ExtractionError, InvalidInputError
from embedstore.extract import ExtractConfig, FeatureResult
from embedstore.extract import extract as run_extract
from embedstore.extract.append import append as run_append
from embedstore.extract.fill import fill as run_fill

from ._common import (
    Quiet,
    StorageOption,
    console,
    err_console,
    handle_errors,
    parse_storage_options,
)

__all__ = ["RichProgress", "extract"]

_D = ExtractConfig()  # the defaults, quoted in the help texts


class _SpeedColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text("-- items/s" if task.speed is None else f"{task.speed:.1f} items/s")


class RichProgress:
    """:class:`embedstore.extract.Progress` as rich progress bars on stderr."""

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


@handle_errors
def extract(
    catalog: Annotated[str, typer.Argument(help="CSV, TSV, Parquet or JSONL catalog.")],
    store: Annotated[str, typer.Option("--store", "-s", help="Store path or fsspec URL.")],
    text: Annotated[str | None, typer.Option(help="Text encoder spec, e.g. "
                    "hf:$(embedstore weights path minilm) or open_clip:ViT-B-32@random.")] = None,
    image: Annotated[str | None, typer.Option(help="Image encoder spec, e.g. "
                     "timm:tf_efficientnet_lite0@lite0.safetensors.")] = None,
    id_col: Annotated[str | None, typer.Option(help=f"Id column (default {_D.id_col}).")] = None,
    text_cols: Annotated[str | None, typer.Option(help="Text columns, joined in order "
                         f"(default {','.join(_D.text_cols)}).")] = None,
    image_col: Annotated[str | None, typer.Option(help="Image path/URL column "
                         f"(default {_D.image_col}).")] = None,
    label_col: Annotated[str | None, typer.Option(help="Label column, '' for none "
                         f"(default {_D.label_col}).")] = None,
    group_col: Annotated[str | None, typer.Option(help="Group column (new store only): items "
                         "with equal values (copies of one product) share one fold and the "
                         "holdout together (default: none).")] = None,
    layers: Annotated[str | None, typer.Option(help="Hidden states to keep: -1 | -4,-3,-2,-1 | "
                      f"all (0 = embeddings) (default {_D.layers}).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Max tokens per text "
                          f"(default {_D.max_length}).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Override the encoder's input size.")]
    = None,
    batch_size: Annotated[int | None, typer.Option(help="Items per forward pass "
                          f"(default {_D.batch_size}).")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers for tokenising and "
                           f"image decoding (default {_D.num_workers}).")] = None,
    device: Annotated[str | None, typer.Option(help=f"auto | cpu | cuda[:N] (default {_D.device}).")]
    = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | fp16 | bf16 (AMP on GPU) "
                         f"(default {_D.precision}).")] = None,
    text_name: Annotated[str | None, typer.Option(help="Feature-set name for the text "
                                                  "encoder (default: from the spec).")] = None,
    image_name: Annotated[str | None, typer.Option(help="Feature-set name for the image "
                                                   "encoder (default: from the spec).")] = None,
    folds: Annotated[int | None, typer.Option(help=f"Folds (new store only) (default {_D.folds}).")]
    = None,
    seed: Annotated[int | None, typer.Option(help=f"Fold seed (new store only) (default {_D.seed}).")]
    = None,
    holdout: Annotated[float | None, typer.Option(help="Holdout share (new store only) "
                       f"(default {_D.holdout}).")] = None,
    resume: Annotated[bool | None, typer.Option("--resume", help="Finish an interrupted "
                      "feature set; done rows are skipped.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace a complete "
                         "feature set (swapped in when the new one is complete).")] = None,
    max_error_rate: Annotated[float | None, typer.Option(help="Above this share of failed rows "
                              "(bad images, empty texts) the run still finishes and keeps its "
                              f"data, then exits 1 (default {_D.max_error_rate}).")] = None,
    block_rows: Annotated[int | None, typer.Option(help="Rows per write block (power of two) "
                          f"(default {_D.block_rows}).")] = None,
    gallery: Annotated[bool | None, typer.Option("--gallery", help="Write the image set as a "
                       "gallery (several images per item, '|' between paths in a CSV cell) even "
                       "if every item has one image; automatic when some item has more.")] = None,
    codec: Annotated[str | None, typer.Option(help="Compressor of the cached features: lz4 "
                     "(fast reads, every training epoch) or zstd (smaller on CNN maps, for "
                     f"stores shipped over a network) (default {_D.codec}).")] = None,
    append: Annotated[bool, typer.Option("--append", help="Add the catalog's new items to "
                      "an existing store as a segment, filling every feature set with its "
                      "recorded encoder (no encoder flags needed).")] = False,
    no_folds: Annotated[bool, typer.Option("--no-folds", help="With --append: keep the new "
                        "items out of every fold and the holdout (for prediction only).")]
    = False,
    only: Annotated[list[str] | None, typer.Option("--only", help="With --append: fill only "
                    "this feature set (repeatable); the others stay 'partial' until --fill.")]
    = None,
    fill: Annotated[list[str] | None, typer.Option("--fill", help="Write the appended "
                    "segments a feature set lacks (after --append --only), from a catalog "
                    "holding their items (repeatable).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for the encoder "
                                                "(torch.set_num_threads); default: torch's "
                                                "choice (OMP_NUM_THREADS).")] = None,
    quiet: Quiet = False,
    storage_option: StorageOption = None,
) -> None:
    """Run encoders once over a catalog and cache token states / spatial maps + pooled vectors.

    Examples:

      embedstore extract data/catalog.csv --store cat.zarr --text hf:$(embedstore weights path minilm) --layers -4,-3,-2,-1 --text-name minilm-4

      embedstore extract data/catalog.csv --store cat.zarr --image timm:vit_tiny_patch16_224@random --image-name vit

      embedstore extract data/catalog.csv --store grouped.zarr --group-col title --text hf:$(embedstore weights path minilm)

      embedstore extract data/catalog.csv --store s3://bucket/cat.zarr -S endpoint_url=http://127.0.0.1:9000 --text hf:$(embedstore weights path minilm) --resume

      torchrun --standalone --nproc-per-node 4 $(which embedstore) extract data/catalog.csv --store cat.zarr --text hf:$(embedstore weights path minilm) --text-name minilm-ddp

      python examples/make_catalog.py --out new --n 24 --seed 7 --first-id 900000 --no-labels && embedstore extract new/catalog.csv --store cat.zarr --append

      embedstore extract data/catalog.csv --store cat.zarr --fill lite0

    (`--append --only minilm` fills only that set for the new items; `--fill lite0` later
    writes what the appended segments lack, from any catalog holding their items; nothing to
    fill is a no-op.)

    Exit codes: 0 done; 1 done, but more failed rows than --max-error-rate (data kept); 2 bad
    input, nothing written (one `error:` line). See docs/extract.md.
    """
    if threads is not None:
        if threads < 1:
            raise InvalidInputError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    cols = None if text_cols is None else tuple(c.strip() for c in text_cols.split(",")
                                                if c.strip())
    cfg = ExtractConfig.from_options(
        text=text, image=image, id_col=id_col, text_cols=cols, image_col=image_col,
        label_col=label_col, group_col=group_col, layers=layers, max_length=max_length, image_size=image_size,
        batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
        text_name=text_name, image_name=image_name, folds=folds, seed=seed, holdout=holdout,
        resume=resume, overwrite=overwrite, max_error_rate=max_error_rate,
        block_rows=block_rows, gallery=gallery, codec=codec,
        storage_options=parse_storage_options(storage_option))
    if label_col == "":  # '' = the catalog has no labels
        cfg = dataclasses.replace(cfg, label_col=None)
    if (no_folds or only) and not append:
        raise InvalidInputError(f"{'--no-folds' if no_folds else '--only'} applies to --append "
                                "only")
    if (append or fill) and (text or image or overwrite):
        raise InvalidInputError(f"{'--append' if append else '--fill'} uses the feature sets' "
                                "recorded encoders: drop --text/--image/--overwrite")
    if append and fill:
        raise InvalidInputError("--append and --fill are separate steps: append with --only "
                                "first, then --fill the other sets")
    prog = RichProgress(quiet or not main_rank)
    failed = None
    try:
        run_opts = dict(progress=prog, storage_options=cfg.storage_options, device=device,
                        batch_size=batch_size, num_workers=num_workers, precision=precision)
        if append:
            results = run_append(catalog, store, resume=bool(resume), no_folds=no_folds,
                                 only=only, **run_opts)
        elif fill:
            results = run_fill(catalog, store, fill, **run_opts)
        else:
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


def _summary(r: FeatureResult) -> None:
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
    if r.n_absent:
        line(f"  {r.n_absent} rows absent in the catalog (empty text or image value): stored as "
             "absent, not counted as errors")
    for row, msg in list(r.errors.items())[:5]:
        line(f"  row {row}: {msg}")
    if len(r.errors) > 5:
        line(f"  ... {len(r.errors) - 5} more (embedstore info --json)")
