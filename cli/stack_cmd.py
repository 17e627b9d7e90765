"""`fusion stack` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import StorageOption, console, err_console, handle_errors, parse_storage_options
from .fusion_app import app


@app.command()
@handle_errors
def stack(
    runs: Annotated[list[Path], typer.Option("--runs", "-r", help="Source run directories "
                                             "(repeat, or space-separate after one --runs).")],
    stacker: Annotated[str, typer.Option(help="lightgbm | xgboost | logreg | mlp")] = "lightgbm",
    features: Annotated[str, typer.Option(help="probs | probs+pooled")] = "probs",
    pooled: Annotated[list[str] | None, typer.Option(help="Feature set(s) whose pooled vectors "
                                                     "join the features (probs+pooled).")]
    = None,
    params: Annotated[list[str] | None, typer.Option("--params", "-p", help="Stacker "
                                                     "parameter KEY=VALUE (repeatable).")]
    = None,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads (GBDT n_jobs, torch for "
                                                "mlp); 1 is often fastest on a busy machine.")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default "
                                             "runs/stack-<stacker>).")] = None,
    dask: Annotated[str | None, typer.Option(help="Dask scheduler address (tcp://host:8786): "
                                             "train the GBDT on that cluster.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    storage_option: StorageOption = None,
) -> None:
    """Cross-fitted stacker (boosted late fusion) over the runs' out-of-fold probabilities,
    scored on the holdout, with per-run TreeSHAP attributions for the GBDTs.

    Examples:

      fusion stack --runs runs/text --runs runs/image --runs runs/hanet --stacker lightgbm

      fusion stack -r runs/text -r runs/image --stacker xgboost -p max_depth=4 --out runs/xgb

      fusion stack -r runs/text -r runs/image --features probs+pooled --pooled minilm
    """
    from fusion.stack import parse_params
    from fusion.stack import stack as do_stack

    pooled_arr = None
    if features == "probs+pooled":
        import numpy as np

        from embedstore import open_store
        from fusion.rundir import load_run

        first = load_run(runs[0])
        s = open_store(first.config["store"]["url"],
                       storage_options=parse_storage_options(storage_option))
        names = pooled or [f["name"] for f in first.config.get("features", {}).values() if f]
        pooled_arr = np.concatenate([s.features[n].pooled_all() for n in names], axis=1)
    out = out or Path("runs") / f"stack-{stacker}"
    stacker_params = parse_params(params or [])
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"--threads must be >= 1, got {threads}")
        if stacker in ("lightgbm", "xgboost"):
            stacker_params.setdefault("n_jobs", threads)
        import torch

        torch.set_num_threads(threads)
    run = do_stack(runs, stacker=stacker, features=features, params=stacker_params,
                   seed=seed, out=out, dask=dask, pooled=pooled_arr,
                   progress=None if quiet else (lambda m: err_console.print(m)))
    m = run.metrics
    h = m.get("holdout") or {}
    console.print(f"{run.name}: OOF macro-F1 {m['macro_f1']:.4f} acc {m['accuracy']:.4f} | "
                  f"holdout macro-F1 {h.get('macro_f1', float('nan')):.4f} acc "
                  f"{h.get('accuracy', float('nan')):.4f} | {m['train_seconds']:.1f}s -> "
                  f"{run.path}")
