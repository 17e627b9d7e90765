"""`fusion train`: k-fold training of a head on the cache, or end to end with ``--finetune``.

Every option defaults to ``None`` here and falls back to :class:`fusion.config.TrainConfig` /
:class:`fusion.config.FinetuneConfig` (or to the run given with ``--config``): each default is
stated once, in those dataclasses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from embedstore import open_store
from fusion.config import (
    DEFAULT_HEAD,
    DENSE_MAX_CLASSES,
    FinetuneConfig,
    TrainConfig,
    config_for,
    parse_seeds,
)
from fusion.errors import TrainError
from fusion.finetune import finetune as run_finetune
from fusion.keyvalue import parse_key_values
from fusion.train import train as run_train

from ._common import (
    Quiet,
    StorageOption,
    console,
    err_console,
    handle_errors,
    parse_storage_options,
)

__all__ = ["train", "load_config", "EpochProgress"]

T, F = TrainConfig, FinetuneConfig


def load_config(path: Path) -> dict[str, Any]:
    """config.json of a finished `fusion train` run (its directory or the file itself)."""
    f = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(f.read_text())
    except FileNotFoundError:
        raise TrainError(f"--config {str(path)!r}: {f} does not exist; pass a run directory "
                         "written by `fusion train` or its config.json") from None
    except json.JSONDecodeError as e:
        raise TrainError(f"--config {str(path)!r}: {f} is not valid JSON ({e})") from None
    if cfg.get("kind") not in ("train", "finetune") or "train" not in cfg:
        raise TrainError(f"--config {str(path)!r} is a {cfg.get('kind', 'unknown')!r} run; "
                         "--config re-runs `fusion train` runs (re-run a stack with `fusion "
                         "stack`)")
    return cfg


@handle_errors
def train(
    store: Annotated[str | None, typer.Option(
        "--store", "-s", help="Store path or URL (default: the --config run's store).")] = None,
    head: Annotated[str | None, typer.Option(help=(
        f"Registered name, path/to/file.py:Class or package.module:Class (default "
        f"{DEFAULT_HEAD})."))] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Re-run this run (RUN_DIR or RUN_DIR/config.json): same store, head, "
        "options and training config; other flags override.")] = None,
    text: Annotated[str | None, typer.Option(help="Text feature set (default: the only one).")]
    = None,
    image: Annotated[str | None, typer.Option(help="Image feature set (default: the only one).")]
    = None,
    layers: Annotated[str | None, typer.Option(help="Cached text layers to use, e.g. -1 or "
                                               "-2,-1 (default: all cached).")] = None,
    folds: Annotated[int | None, typer.Option(help="Train the first K store folds (default "
                                              "all).")] = None,
    fold: Annotated[int | None, typer.Option(help="Train only fold i.")] = None,
    epochs: Annotated[int | None, typer.Option(
        help=f"Epochs (default {T.epochs}; {F.epochs} with --finetune).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help=f"Batch size (default {T.batch_size}; {F.batch_size} with --finetune).")] = None,
    lr: Annotated[float | None, typer.Option(help=f"Learning rate (default {T.lr}).")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        help=f"AdamW weight decay (default {T.weight_decay}).")] = None,
    warmup: Annotated[float | None, typer.Option(
        help=f"Warm-up share of the steps (default {T.warmup}).")] = None,
    patience: Annotated[int | None, typer.Option(
        help=f"Early-stopping patience in epochs (default {T.patience}).")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Seed (default {T.seed}).")] = None,
    seeds: Annotated[str | None, typer.Option(
        help="Repeats: train every fold once per seed into one run, e.g. 0,1,2 (OOF / holdout "
        "= mean over seeds; metrics.json gets per-seed scores and their spread).")] = None,
    inner_val: Annotated[float | None, typer.Option(
        help=f"Share of each fold's training rows held out to pick the epoch (early stopping, "
        f"late's alpha); never the rows the fold predicts (default {T.inner_val}).")] = None,
    label_smoothing: Annotated[float | None, typer.Option(
        help=f"Label smoothing of the cross-entropy, e.g. 0.1 (default "
        f"{T.label_smoothing}).")] = None,
    modality_dropout: Annotated[float | None, typer.Option(
        help=f"Chance that a training item with text and image loses one of them (at random) "
        f"for a step, so the head learns items without a photo or text, e.g. 0.1 (default "
        f"{T.modality_dropout}).")] = None,
    device: Annotated[str | None, typer.Option(
        help=f"auto | cpu | cuda[:N] (default {T.device}).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (1 is often "
                                                "fastest for small heads on a busy machine).")]
    = None,
    max_ram: Annotated[float | None, typer.Option(help=(
        f"GB of cached tensors to hold in RAM (default {T.max_ram_gb}); larger sets stream in "
        "block-shuffled order."))] = None,
    class_weight: Annotated[bool | None, typer.Option(
        "--class-weight/--no-class-weight", help="Balanced class weights (default off).")]
    = None,
    top_k_store: Annotated[int | None, typer.Option(
        help=f"Probabilities kept per item once the store has more than {DENSE_MAX_CLASSES} "
        f"classes (top-k layout, docs/runs.md 2.3; default {T.top_k_store}).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<head>; with "
                                             "--config: <that run>-rerun).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Head option KEY=VALUE "
                                                   "(repeatable).")] = None,
    finetune: Annotated[bool, typer.Option("--finetune", help="Train encoders + head end to "
                                           "end (the options marked --finetune).")] = False,
    init: Annotated[Path | None, typer.Option(help="--finetune: warm-start the head from this "
                                              "cached-feature run.")] = None,
    encoder_lr: Annotated[float | None, typer.Option(
        help=f"--finetune: encoder learning rate (default {F.encoder_lr}).")] = None,
    head_lr: Annotated[float | None, typer.Option(help="--finetune: head learning rate "
                                                  "(default --lr).")] = None,
    freeze_layers: Annotated[int | None, typer.Option(
        help=f"--finetune: freeze the lowest N encoder layers (default {F.freeze_layers}).")]
    = None,
    grad_accum: Annotated[int | None, typer.Option(
        help=f"--finetune: gradient accumulation steps (default {F.grad_accum}).")] = None,
    precision: Annotated[str | None, typer.Option(
        help=f"--finetune: fp32 | fp16 | bf16 (AMP; default {F.precision}).")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="--finetune: recompute activations in the backward pass (default off).")] = None,
    catalog: Annotated[str | None, typer.Option(help="--finetune: the raw catalog (default: "
                                                "from the provenance).")] = None,
    max_items: Annotated[int | None, typer.Option(help="--finetune: cap items per fold "
                                                  "(smoke runs).")] = None,
    quiet: Quiet = False,
    storage_option: StorageOption = None,
) -> None:
    """Train a head k-fold on cached tensors (out-of-fold + holdout probabilities).

    Examples:

      fusion train --store cat.zarr --head hanet --set mode=keyless --out runs/hanet-keyless

      fusion train --store cat.zarr --head examples/custom_head.py:GMUHead --folds 2 --epochs 5

      fusion train --config runs/hanet --epochs 2 --out runs/hanet-again

      fusion train --store cat.zarr --head concat --seeds 0,1,2 --folds 2 --epochs 2 --label-smoothing 0.1 --out runs/concat-seeds

      fusion train --store cat.zarr --head hanet --finetune --init runs/hanet --folds 1 --epochs 1 --max-items 16
    """
    base: dict[str, Any] = {}
    if config is not None:
        base = load_config(config)
        finetune = finetune or base["kind"] == "finetune"
        feats = base.get("features") or {}
        text = text or (feats.get("text") or {}).get("name")
        image = image or (feats.get("image") or {}).get("name")
        store = store or (base.get("store") or {}).get("url")
        head = head or base.get("head")
        run_dir = config if config.is_dir() else config.parent
        out = out or run_dir.with_name(f"{run_dir.name}-rerun")
    if store is None:
        raise TrainError("no store given; pass --store PATH (or --config RUN_DIR)")
    head = head or DEFAULT_HEAD
    given = {k: v for k, v in dict(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
        patience=patience, seed=seed, seeds=parse_seeds(seeds) if seeds is not None else None,
        inner_val=inner_val, label_smoothing=label_smoothing,
        modality_dropout=modality_dropout, device=device, layers=layers, folds=folds, fold=fold,
        max_ram_gb=max_ram, class_weight=class_weight, threads=threads, top_k_store=top_k_store,
        encoder_lr=encoder_lr, head_lr=head_lr, freeze_layers=freeze_layers,
        grad_accum=grad_accum, precision=precision,
        gradient_checkpointing=gradient_checkpointing, catalog=catalog,
        init=str(init) if init else None, max_items=max_items).items() if v is not None}
    if seed is not None and seeds is not None:
        raise TrainError(f"--seed {seed} and --seeds {seeds}: pass one (--seeds 0,1,2 trains "
                         "repeats, --seed N one run)")
    cls = config_for("finetune" if finetune else "train")
    ft_only = sorted(set(given) - set(TrainConfig.__dataclass_fields__))
    if ft_only and not finetune:
        raise TrainError(f"--{ft_only[0].replace('_', '-')} applies to --finetune runs only; "
                         "add --finetune or drop it")
    # the --config run's training config when it is of the same kind, else only its options
    earlier = base.get("train", {}) if base.get("kind") == ("finetune" if finetune else "train") \
        else {"options": base.get("train", {}).get("options", {})}
    if seed is not None:  # one seed given: not the --config run's repeats
        earlier = {**earlier, "seeds": None}
    cfg = cls.from_dict({**earlier, **given}).override(**parse_key_values(set_))
    s = open_store(store, storage_options=parse_storage_options(storage_option))
    out = out or Path("runs") / Path(head.split(":")[-1]).stem.lower()
    run_fn = run_finetune if finetune else run_train
    with EpochProgress(quiet) as prog:
        run = run_fn(s, head, text=text, image=image, out=out, config=cfg, progress=prog)
    m = run.metrics
    h = m.get("holdout") or {}
    sp = m.get("spread") or {}
    if len(m.get("seeds") or []) > 1:
        hs = sp.get("holdout") or {}
        console.print(f"{len(m['seeds'])} seeds: OOF macro-F1 {sp['macro_f1']['mean']:.4f} ± "
                      f"{sp['macro_f1']['std']:.4f}"
                      + (f" | holdout {hs['macro_f1']['mean']:.4f} ± {hs['macro_f1']['std']:.4f}"
                         if hs else "") + " (mean ± sd over seeds; probabilities averaged)")
    console.print(f"{run.name}: OOF macro-F1 {m['macro_f1']:.4f} acc {m['accuracy']:.4f} | "
                  f"holdout macro-F1 {h.get('macro_f1', float('nan')):.4f} acc "
                  f"{h.get('accuracy', float('nan')):.4f} | {m['train_seconds']:.1f}s "
                  f"({m['epoch_seconds']:.3f}s/epoch) -> {run.path}")


class EpochProgress:
    """One live line on stderr: fold, epoch, loss, validation macro-F1."""

    def __init__(self, quiet: bool):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                            console=err_console, disable=quiet)
        self.task = None

    def __enter__(self) -> EpochProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def __call__(self, ev: dict[str, Any]) -> None:
        desc = (f"seed {ev.get('seed', 0)} fold {ev['fold']} epoch {ev['epoch'] + 1} loss {ev['loss']:.3f} "
                f"inner-val F1 {ev.get('val_macro_f1', float('nan')):.3f}")
        if self.task is None:
            self.task = self.bar.add_task(desc, total=None)
        self.bar.update(self.task, description=desc)
