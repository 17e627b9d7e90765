"""`fusion merge`: join the runs of one head trained fold by fold into one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fusion.errors import RunDirError
from fusion.merge import merge_runs

from ._common import console, handle_errors

__all__ = ["merge"]


@handle_errors
def merge(
    runs: Annotated[list[Path], typer.Argument(help="Run directories of disjoint folds of one "
                                               "training configuration (`fusion train --fold "
                                               "i`, or earlier merges).")],
    out: Annotated[Path, typer.Option(help="Run directory to write.")],
    name: Annotated[str | None, typer.Option(help="Run name (default: the --out folder's "
                                             "name).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out.")] = False,
) -> None:
    """Merge runs of the same head trained fold by fold (one process or machine per fold)
    into one run, equal to training every fold in one process: out-of-fold rows side by side,
    the holdout the mean of the fold models, every fold's weights and metrics. Parts must share
    the head, its options, the features, the store's fingerprints and the seeds; device,
    threads and the store's URL may differ. A merge of some folds merges again with the rest.
    At catalog scale each fold trains on its own machine (docs/scaling.md) and this joins them.

    Example: fusion train --store cat.zarr --head concat --fold 0 --epochs 2 --out runs/concat-f0 -q && fusion train --store cat.zarr --head concat --fold 1 --epochs 2 --out runs/concat-f1 -q && fusion merge runs/concat-f0 runs/concat-f1 --out runs/concat-f01
    """
    if out.exists() and not overwrite:
        raise RunDirError(f"{out} exists; pass --overwrite or another --out")
    if any(out.resolve() == r.resolve() for r in runs):
        raise RunDirError(f"--out {out} is one of the runs being merged; pass another --out")
    merge_runs(runs, out, name=name, say=lambda m: console.print(escape(m)))
