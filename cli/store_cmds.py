"""`embedstore info / verify / export`: look at, check and copy a store. Plain functions,
registered on the app by :mod:`cli.embedstore_app`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from embedstore import open_store
from embedstore.export import export_hdf5
from embedstore.info import store_info
from embedstore.recompute import recompute_check
from embedstore.verify import verify_store

from ._common import (
    JsonFlag,
    Quiet,
    StorageOption,
    console,
    err_console,
    handle_errors,
    parse_storage_options,
)

__all__ = ["StoreArg", "export", "info", "verify"]

StoreArg = Annotated[str, typer.Argument(help="Store path or fsspec URL (s3://, gs://, memory://...).")]
FeaturesOpt = Annotated[list[str] | None, typer.Option("--features", "-f",
                        help="Only these feature sets (repeatable).")]


@handle_errors
def info(store: StoreArg, json_out: JsonFlag = False, storage_option: StorageOption = None) -> None:
    """Show a store's items, classes, folds and feature sets.

    Example: embedstore info cat.zarr --json
    """
    s = open_store(store, storage_options=parse_storage_options(storage_option))
    data = store_info(s)
    if json_out:
        console.print_json(json.dumps(data, default=str))
        return
    console.print(f"[bold]{data['url']}[/]  format {data['format']}  {data['n_items']} items  "
                  f"{data['n_classes'] or 0} classes  folds k={data['folds']['k']} "
                  f"holdout={data['folds']['holdout']} seed={data['folds']['seed']}")
    if data["grouping"] is not None:
        g = data["grouping"]
        where = f"column {g['group_col']!r}" if g["group_col"] else "create_store(groups=...)"
        console.print(f"grouped folds: {g['n_groups']} groups from {where} "
                      f"(largest: {g['largest_group']} items)", markup=False)
    if data["class_sizes"] is not None:
        c = data["class_sizes"]
        console.print(f"class sizes (trainable items): min {c['min']} / median {c['median']:g} / "
                      f"max {c['max']}; {c['below_5']} classes below 5 items, {c['below_20']} "
                      f"below 20, {c['below_folds']} below the {c['folds']} folds; head / torso "
                      f"/ tail: {c['head']} / {c['torso']} / {c['tail']} classes", markup=False)
    t = Table("feature set", "modality", "shape", "dtype", "layers", "status", "done",
              "absent / failed", "encoder")
    for name, f in data["features"].items():
        if "error" in f:
            t.add_row(name, "-", "-", "-", "-", "[red]damaged[/]", "-", "-", f["error"])
            continue
        t.add_row(name, f["modality"], "x".join(map(str, f["shape"])), str(f["dtype"]),
                  ",".join(map(str, f["layers"])) if f["layers"] else "-",
                  f["status"], str(f["n_done"]),
                  f"{f['presence']['absent']} / {f['presence']['failed']}",
                  f["encoder"].get("spec", "?"))
    console.print(t)


@handle_errors
def verify(
    store: StoreArg,
    fast: Annotated[bool, typer.Option("--fast", help="Metadata and counts only.")] = False,
    features: FeaturesOpt = None,
    recompute: Annotated[int, typer.Option("--recompute", help="Re-encode K random items "
                         "live from the provenance and compare with the cache.")] = 0,
    json_out: JsonFlag = False,
    storage_option: StorageOption = None,
) -> None:
    """Check a store: schema, completeness, offsets, NaN/Inf, chunk checksums.

    Exits 1 with a report when anything is wrong. Example: embedstore verify cat.zarr --fast
    """
    s = open_store(store, storage_options=parse_storage_options(storage_option))
    rep = verify_store(s, fast=fast, features=features)
    if recompute:
        for res in recompute_check(s, k=recompute, features=features):
            rep.checked.setdefault(res["feature"], {})["recompute"] = res
            if not res["ok"]:
                rep.problems.append(res["message"])
    if json_out:
        console.print_json(json.dumps(rep.to_dict(), default=str))
    else:
        for name, c in rep.checked.items():
            console.print(f"  {name}: {'ok' if c.get('ok', True) else 'PROBLEMS'}"
                          + (f"  (recompute max abs diff {c['recompute']['max_abs']:.3g})"
                             if "recompute" in c else ""))
        for p in rep.problems:
            err_console.print(f"[red]problem:[/] {p}", markup=True)
        console.print(f"{'OK' if rep.ok else 'FAILED'}: {s.url} ({len(rep.problems)} problems)")
    if not rep.ok:
        raise typer.Exit(1)


@handle_errors
def export(
    store: StoreArg,
    to: Annotated[Path, typer.Option("--to", help="Destination .h5 file.")],
    features: FeaturesOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    quiet: Quiet = False,
    storage_option: StorageOption = None,
) -> None:
    """Copy a store to HDF5 (same layout and attributes) for teams on h5py.

    Example: embedstore export cat.zarr --to cat.h5 -f minilm
    """
    s = open_store(store, storage_options=parse_storage_options(storage_option))
    out = export_hdf5(s, to, features=features, overwrite=overwrite)
    if not quiet:
        console.print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB)")
