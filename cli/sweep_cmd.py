"""`fusion sweep`: an Optuna study over a head's options and the training options.

The training flags are `fusion train`'s; every option defaults to ``None`` here and falls back
to :class:`fusion.config.TrainConfig` and :class:`fusion.sweep.SweepConfig`, where each default
is stated once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import optuna
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embedstore import open_store
from fusion.config import DEFAULT_HEAD, TrainConfig
from fusion.errors import TrainError
from fusion.keyvalue import parse_key_values
from fusion.space import EXAMPLE
from fusion.sweep import SweepConfig
from fusion.sweep import sweep as run_sweep

from ._common import (
    Quiet,
    StorageOption,
    console,
    err_console,
    handle_errors,
    parse_storage_options,
)

__all__ = ["sweep", "TrialProgress"]

T, W = TrainConfig, SweepConfig


@handle_errors
def sweep(
    space: Annotated[str, typer.Option(
        "--space", help=f"What to search, one NAME=VALUES per word: a,b,c categorical, lo:hi "
        f"uniform, lo:hi:log log-uniform (integers when both ends are), e.g. \"{EXAMPLE}\". "
        "Names: TrainConfig fields (lr, weight_decay, epochs, batch_size, label_smoothing...) "
        "or the head's options (`fusion heads`).")],
    store: Annotated[str, typer.Option("--store", "-s", help="Store path or URL.")],
    head: Annotated[str, typer.Option(help=(
        f"Registered name, path/to/file.py:Class or package.module:Class (default "
        f"{DEFAULT_HEAD})."))] = DEFAULT_HEAD,
    text: Annotated[str | None, typer.Option(help="Text feature set (default: the only one).")]
    = None,
    image: Annotated[str | None, typer.Option(help="Image feature set (default: the only one).")]
    = None,
    n_trials: Annotated[int | None, typer.Option(
        help=f"Finished trials (complete or pruned) the study reaches, counting earlier runs "
        f"of the same command (default {W.n_trials}).")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Stop starting trials after this many seconds (default: no limit).")] = None,
    prune: Annotated[bool | None, typer.Option(
        "--prune/--no-prune", help="Stop hopeless trials after a fold (median pruner on the "
        "mean out-of-fold macro-F1 of the folds so far; default on).")] = None,
    startup_trials: Annotated[int | None, typer.Option(
        help=f"Trials finished before pruning starts (default {W.startup_trials}).")] = None,
    sampler_seed: Annotated[int | None, typer.Option(
        help=f"Seed of the TPE sampler (default {W.sampler_seed}).")] = None,
    layers: Annotated[str | None, typer.Option(help="Cached text layers to use, e.g. -1 or "
                                               "-2,-1 (default: all cached).")] = None,
    folds: Annotated[int | None, typer.Option(help="Train the first K store folds (default "
                                              "all).")] = None,
    epochs: Annotated[int | None, typer.Option(help=f"Epochs (default {T.epochs}).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help=f"Batch size (default {T.batch_size}).")] = None,
    lr: Annotated[float | None, typer.Option(help=f"Learning rate (default {T.lr}).")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        help=f"AdamW weight decay (default {T.weight_decay}).")] = None,
    warmup: Annotated[float | None, typer.Option(
        help=f"Warm-up share of the steps (default {T.warmup}).")] = None,
    patience: Annotated[int | None, typer.Option(
        help=f"Early-stopping patience in epochs (default {T.patience}).")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Training seed (default {T.seed}).")]
    = None,
    inner_val: Annotated[float | None, typer.Option(
        help=f"Share of each fold's training rows held out to pick the epoch (default "
        f"{T.inner_val}).")] = None,
    label_smoothing: Annotated[float | None, typer.Option(
        help=f"Label smoothing of the cross-entropy (default {T.label_smoothing}).")] = None,
    device: Annotated[str | None, typer.Option(
        help=f"auto | cpu | cuda[:N] (default {T.device}).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    max_ram: Annotated[float | None, typer.Option(
        help=f"GB of cached tensors to hold in RAM (default {T.max_ram_gb}).")] = None,
    class_weight: Annotated[bool | None, typer.Option(
        "--class-weight/--no-class-weight", help="Balanced class weights (default off).")]
    = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Fixed head option KEY=VALUE "
                                                   "(repeatable).")] = None,
    out: Annotated[Path | None, typer.Option(help="Sweep directory: study.db, sweep.json and "
                                             "the best run in best/ (default "
                                             "runs/sweep-<head>).")] = None,
    quiet: Quiet = False,
    storage_option: StorageOption = None,
) -> None:
    """Search a head's options and the training options with Optuna; write the best run.

    Each trial is a k-fold run on the cache scored on out-of-fold macro-F1 (never the
    holdout); hopeless trials stop after a fold. The study lives in OUT/study.db: the same
    command run again continues it. The best trial is trained again into OUT/best, a run
    directory `fusion compare`, `fusion stack` and `fusion predict` accept.

    Examples:

      fusion sweep --store cat.zarr --head hanet --space "dim=32,64 dropout=0.0:0.5 lr=1e-4:3e-3:log" --n-trials 2 --folds 2 --epochs 2 --out runs/sweep-hanet

      fusion sweep --store cat.zarr --head concat --space "hidden=32,64 weight_decay=1e-4:1e-1:log epochs=1:3" --n-trials 2 --folds 2 --no-prune --out runs/sweep-concat
    """
    given = {k: v for k, v in dict(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
        patience=patience, seed=seed, inner_val=inner_val, label_smoothing=label_smoothing,
        device=device, layers=layers, folds=folds, max_ram_gb=max_ram,
        class_weight=class_weight, threads=threads).items() if v is not None}
    fixed = parse_key_values(set_)
    searched = {w.partition("=")[0].strip().replace("-", "_") for w in space.split()}
    both = sorted(searched & (set(given) | set(fixed)))
    if both:
        flag = f"--{both[0].replace('_', '-')}" if both[0] in given else f"--set {both[0]}=..."
        raise TrainError(f"{both[0]!r} is both searched (--space) and fixed ({flag}); drop "
                         "one of them")
    sc = SweepConfig(**{k: v for k, v in dict(
        n_trials=n_trials, timeout=timeout, prune=prune, startup_trials=startup_trials,
        sampler_seed=sampler_seed).items() if v is not None})
    cfg = TrainConfig.from_dict(given).override(**fixed)
    s = open_store(store, storage_options=parse_storage_options(storage_option))
    out = out or Path("runs") / f"sweep-{Path(head.split(':')[-1]).stem.lower()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says it
    with TrialProgress(quiet, sc.n_trials) as prog:
        res = run_sweep(s, head, space, out=out, text=text, image=image, config=cfg,
                        sweep_config=sc, progress=prog)
    states = [t["state"] for t in res.summary["trials"]]
    b = res.summary["best"]
    h = res.best.metrics.get("holdout") or {}
    params = " ".join(f"{k}={_short(v)}" for k, v in b["params"].items())
    console.print(f"{len(states)} trials ({states.count('complete')} complete, "
                  f"{states.count('pruned')} pruned, {states.count('fail')} failed); best trial "
                  f"{b['trial']}: OOF macro-F1 {b['value']:.4f} with {params}")
    console.print(f"best run -> {res.best.path} (holdout macro-F1 "
                  f"{h.get('macro_f1', float('nan')):.4f}, never used by the search); "
                  f"trials in {Path(out) / 'sweep.json'}")


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class TrialProgress:
    """A bar over the trials on stderr: finished / total, the last trial, the best score."""

    def __init__(self, quiet: bool, total: int):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), console=err_console,
                            disable=quiet)
        self.task = self.bar.add_task("sweep", total=total)

    def __enter__(self) -> TrialProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev["state"] == "start":  # every check passed
            self.bar.start()
            self.bar.update(self.task, completed=ev["finished"])
            return
        best = f"{ev['best']:.4f}" if ev.get("best") is not None else "-"
        value = f"{ev['value']:.4f}" if ev.get("value") is not None else "-"
        self.bar.update(self.task, completed=ev["finished"],
                        description=f"trial {ev['number']} {ev['state']} {value} | best {best}")
