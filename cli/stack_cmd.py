"""`fusion stack`: a plain command function; cli/fusion_app.py registers it.

Options default to ``None`` and fall back to :func:`fusion.stack.stack`'s defaults (stated once,
in :mod:`fusion.stack.procedure`): only what the user gave is passed on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from embedstore import open_store
from fusion.errors import StackError
from fusion.rundir import Run, load_run
from fusion.stack import (
    AUTO,
    AUTO_CANDIDATES,
    DEFAULT_SEED,
    DEFAULT_STACKER,
    FEATURES,
    default_out,
    list_stackers,
    parse_params,
    stacker_class,
)
from fusion.stack import stack as run_stack

from ._common import (
    StorageOption,
    console,
    err_console,
    handle_errors,
    parse_storage_options,
)

__all__ = ["stack"]


def _pooled(first: Run, names: list[str] | None, storage_options: dict[str, Any] | None
            ) -> tuple[np.ndarray, list[str]]:
    """(N_store, D) pooled vectors of ``names`` (default: the first run's feature sets), read
    from the store the runs were trained on, and the names."""
    url = first.config["store"]["url"]
    store = open_store(url, storage_options=storage_options)
    names = names or [f["name"] for f in (first.config.get("features") or {}).values() if f]
    if not names:
        raise StackError(f"--features probs+pooled: run {first.name!r} records no feature set; "
                         "name one with --pooled FEATURE_SET")
    return np.concatenate([store.features[n].pooled_all() for n in names], axis=1), names


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@handle_errors
def stack(
    runs: Annotated[list[Path], typer.Option(
        "--runs", "-r", help="Source run directory; repeat for each run: -r runs/text "
        "-r runs/image.")],
    stacker: Annotated[str | None, typer.Option(
        help=f"{AUTO} | {' | '.join(list_stackers())} (default {DEFAULT_STACKER}: cross-fit "
        f"{', '.join(AUTO_CANDIDATES)} and keep the best out-of-fold macro-F1).")] = None,
    features: Annotated[str | None, typer.Option(
        help=f"{' | '.join(FEATURES)} (default {FEATURES[0]}).")] = None,
    pooled: Annotated[list[str] | None, typer.Option(
        help="Feature set whose pooled vectors join the features with --features "
        "probs+pooled (repeatable; default: the first run's feature sets).")] = None,
    pooled_dims: Annotated[int | None, typer.Option(
        help="With --features probs+pooled: reduce the pooled vectors to N principal "
        "components, a PCA fitted inside each cross-fit fold (e.g. 16).")] = None,
    params: Annotated[list[str] | None, typer.Option(
        "--params", "-p", help="Stacker parameter KEY=VALUE (repeatable), e.g. -p "
        "num_leaves=31 -p explain=false.")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Seed (default {DEFAULT_SEED}).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads of the stacker (GBDT n_jobs, mlp torch threads; logreg has no "
        "setting); 1 is often fastest on a busy machine.")] = None,
    out: Annotated[Path | None, typer.Option(
        help=f"Run directory (default {default_out('<stacker>')}).")] = None,
    dask: Annotated[str | None, typer.Option(
        help="Dask scheduler address (tcp://host:8786): train the GBDT on that cluster.")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-fold progress lines.")]
    = False,
    storage_option: StorageOption = None,
) -> None:
    """Cross-fitted stacker (boosted late fusion) over the runs' out-of-fold probabilities,
    scored on the holdout, with per-run TreeSHAP attributions for the GBDTs.

    Examples:

      fusion stack -r runs/text -r runs/image -r runs/hanet --out runs/stack

      fusion stack -r runs/text -r runs/image --stacker ensemble --out runs/stack-ensemble

      fusion stack -r runs/text -r runs/image --stacker xgboost -p max_depth=4 --out runs/xgb

      fusion stack -r runs/text -r runs/image --stacker logreg --features probs+pooled --pooled minilm --out runs/stack-pooled

      fusion stack -r runs/text -r runs/image --stacker logreg --features probs+pooled --pooled minilm --pooled lite0 --pooled-dims 16 --out runs/stack-multilevel
    """
    stacker_params = parse_params(params)
    auto = (stacker or DEFAULT_STACKER).strip().lower() == AUTO
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"--threads must be >= 1, got {threads}")
        key = None if auto else stacker_class(stacker or DEFAULT_STACKER).threads_param
        if key is not None:
            stacker_params.setdefault(key, threads)
    # OpenMP threads that busy-wait fall off a cliff on a busy machine (docs/stacking.md,
    # "Threads"); read by LightGBM's / XGBoost's OpenMP runtime when they load, after this.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    given: dict[str, Any] = {"stacker": stacker, "features": features, "seed": seed,
                             "dask": dask, "threads": threads if auto else None,
                             "pooled_dims": pooled_dims}
    kwargs = {k: v for k, v in given.items() if v is not None}
    if pooled and features != "probs+pooled":
        raise StackError(f"--pooled {pooled[0]} is used only with --features probs+pooled; add it")
    if features == "probs+pooled":
        kwargs["pooled"], kwargs["pooled_sets"] = _pooled(
            load_run(runs[0]), pooled, parse_storage_options(storage_option))
    run = run_stack(runs, params=stacker_params, out=out or default_out(stacker or DEFAULT_STACKER),
                    progress=None if quiet else err_console.print, **kwargs)
    m = run.metrics
    h = m.get("holdout") or {}
    sel = run.config.get("selection")
    if sel:
        scores = ", ".join(f"{c['stacker']} {c['oof_macro_f1']:.4f}" for c in sel["candidates"])
        console.print(f"stacker: {sel['chosen']} ({sel['why']}; OOF macro-F1: {scores})")
    console.print(f"{run.name}: OOF macro-F1 {_fmt(m['macro_f1'])} acc {_fmt(m['accuracy'])} | "
                  f"holdout macro-F1 {_fmt(h.get('macro_f1'))} acc {_fmt(h.get('accuracy'))} | "
                  f"{m['train_seconds']:.1f}s -> {run.path}")
