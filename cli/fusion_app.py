"""`fusion`: train fusion heads and stackers on cached tensors, compare and report runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ._common import (
    JsonFlag,
    Quiet,
    StorageOption,
    _coerce,
    console,
    err_console,
    handle_errors,
    parse_storage_options,
    run_app,
)

app = typer.Typer(
    name="fusion",
    help="Train multimodal fusion heads and GBDT stackers on an embedstore cache.\n\n"
    "Examples:\n\n"
    "  fusion heads\n\n"
    "  fusion train --store cat.zarr --head hanet --out runs/hanet\n\n"
    "  fusion stack --runs runs/text runs/image runs/hanet --stacker lightgbm --out runs/stack\n\n"
    "  fusion compare runs/*",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE (e.g. --set dim=128)")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _coerce(v.strip())
    return out


@app.command()
@handle_errors
def heads(json_out: JsonFlag = False) -> None:
    """List the registered heads (built-in and from the `fusion.heads` entry points) and their
    options with defaults."""
    from fusion import head_options, list_heads, resolve_head

    data = {}
    for h in list_heads():
        cls = resolve_head(h)
        data[h] = {"modalities": list(getattr(cls, "modalities", ())),
                   "options": {k: (None if v is inspect_empty() else v)
                               for k, v in head_options(h).items()},
                   "doc": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""}
    if json_out:
        console.print_json(json.dumps(data, default=str))
        return
    t = Table("head", "modalities", "options (defaults)", "what")
    for h, d in data.items():
        t.add_row(h, "+".join(d["modalities"]),
                  escape(", ".join(f"{k}={v}" for k, v in d["options"].items())),
                  escape(d["doc"]))
    console.print(t)


def inspect_empty():
    import inspect

    return inspect.Parameter.empty


@app.command()
@handle_errors
def train(
    store: Annotated[str, typer.Option("--store", "-s", help="Store path or URL.")],
    head: Annotated[str, typer.Option(help="Registered name, path/to/file.py:Class or "
                                      "package.module:Class.")] = "concat",
    text: Annotated[str | None, typer.Option(help="Text feature set (default: the only one).")]
    = None,
    image: Annotated[str | None, typer.Option(help="Image feature set (default: the only one).")]
    = None,
    layers: Annotated[str | None, typer.Option(help="Cached text layers to use, e.g. -1 or "
                                               "-2,-1 (default: all cached).")] = None,
    folds: Annotated[int | None, typer.Option(help="Train the first K store folds (default "
                                              "all).")] = None,
    fold: Annotated[int | None, typer.Option(help="Train only fold i.")] = None,
    epochs: Annotated[int, typer.Option()] = 30,
    batch_size: Annotated[int, typer.Option()] = 64,
    lr: Annotated[float, typer.Option()] = 1e-3,
    weight_decay: Annotated[float, typer.Option()] = 1e-2,
    warmup: Annotated[float, typer.Option(help="Warm-up share of the steps.")] = 0.1,
    patience: Annotated[int, typer.Option(help="Early-stopping patience (epochs).")] = 6,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (1 is often "
                                                "fastest for small heads on a busy machine).")]
    = None,
    max_ram: Annotated[float, typer.Option(help="GB of cached tensors to hold in RAM; larger "
                                           "sets stream in block-shuffled order.")] = 8.0,
    class_weight: Annotated[bool, typer.Option("--class-weight", help="Balanced class "
                                               "weights.")] = False,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<head>).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Head option KEY=VALUE "
                                                   "(repeatable).")] = None,
    finetune: Annotated[bool, typer.Option("--finetune", help="Train encoders + head end to "
                                           "end (see `fusion train --finetune --help`).")] = False,
    init: Annotated[Path | None, typer.Option(help="--finetune: warm-start the head from this "
                                              "cached-feature run.")] = None,
    encoder_lr: Annotated[float, typer.Option(help="--finetune: encoder learning rate.")] = 2e-5,
    head_lr: Annotated[float | None, typer.Option(help="--finetune: head learning rate "
                                                  "(default --lr).")] = None,
    freeze_layers: Annotated[int, typer.Option(help="--finetune: freeze the lowest N encoder "
                                               "layers.")] = 0,
    grad_accum: Annotated[int, typer.Option(help="--finetune: gradient accumulation "
                                            "steps.")] = 1,
    precision: Annotated[str, typer.Option(help="--finetune: fp32 | fp16 | bf16 (AMP).")] =
    "fp32",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing")] = False,
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

      fusion train --store cat.zarr --head my_heads.py:GatedSum --folds 2 --epochs 5

      fusion train --store cat.zarr --head concat --finetune --init runs/concat --epochs 1
    """
    from embedstore import open_store

    s = open_store(store, storage_options=parse_storage_options(storage_option))
    out = out or Path("runs") / Path(head.split(":")[-1]).stem.lower()
    common = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  warmup=warmup, patience=patience, seed=seed, device=device, layers=layers,
                  folds=folds, fold=fold, max_ram_gb=max_ram, class_weight=class_weight,
                  threads=threads)
    opts = parse_sets(set_)
    with _EpochProgress(quiet) as prog:
        if finetune:
            from fusion.finetune import FinetuneConfig
            from fusion.finetune import finetune as run_finetune

            cfg = FinetuneConfig(**common, encoder_lr=encoder_lr, head_lr=head_lr,
                                 freeze_layers=freeze_layers, grad_accum=grad_accum,
                                 precision=precision,
                                 gradient_checkpointing=gradient_checkpointing,
                                 catalog=catalog, init=str(init) if init else None,
                                 max_items=max_items, options=opts)
            run = run_finetune(s, head, text=text, image=image, out=out, config=cfg,
                               progress=prog)
        else:
            from fusion.train import TrainConfig
            from fusion.train import train as run_train

            cfg = TrainConfig(**common, options=opts)
            run = run_train(s, head, text=text, image=image, out=out, config=cfg,
                            progress=prog)
    m = run.metrics
    h = m.get("holdout") or {}
    console.print(f"{run.name}: OOF macro-F1 {m['macro_f1']:.4f} acc {m['accuracy']:.4f} | "
                  f"holdout macro-F1 {h.get('macro_f1', float('nan')):.4f} acc "
                  f"{h.get('accuracy', float('nan')):.4f} | {m['train_seconds']:.1f}s "
                  f"({m['epoch_seconds']:.3f}s/epoch) -> {run.path}")


class _EpochProgress:
    def __init__(self, quiet: bool):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.quiet = quiet
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                            console=err_console, disable=quiet)
        self.task = None

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def __call__(self, ev: dict[str, Any]) -> None:
        desc = (f"fold {ev['fold']} epoch {ev['epoch'] + 1} loss {ev['loss']:.3f} "
                f"val F1 {ev.get('val_macro_f1', float('nan')):.3f}")
        if self.task is None:
            self.task = self.bar.add_task(desc, total=None)
        self.bar.update(self.task, description=desc)


@app.command()
@handle_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories.")],
    sort: Annotated[str, typer.Option(help="holdout | oof")] = "holdout",
    json_out: JsonFlag = False,
    markdown: Annotated[Path | None, typer.Option(help="Also write the table as Markdown.")]
    = None,
) -> None:
    """Leaderboard of runs (heads, stacks, fine-tunes) from one store.

    Example: fusion compare runs/*
    """
    from fusion.report import compare as do_compare
    from fusion.report import leaderboard_markdown

    rows = do_compare(runs, sort=sort)
    if markdown:
        markdown.write_text(leaderboard_markdown(rows))
    if json_out:
        console.print_json(json.dumps(rows, default=str))
        return
    t = Table("#", "run", "head", "holdout F1", "holdout acc", "OOF F1", "OOF acc", "train s")

    def f(v, d=4):
        return "-" if v is None else f"{v:.{d}f}"

    for i, r in enumerate(rows, 1):
        t.add_row(str(i), r["name"], r["head"], f(r["holdout_macro_f1"]),
                  f(r["holdout_accuracy"]), f(r["macro_f1"]), f(r["accuracy"]),
                  f(r["train_seconds"], 1))
    console.print(t)


@app.command()
@handle_errors
def report(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    text_run: Annotated[Path | None, typer.Option("--text-run", help="Text-only run for the "
                                                  "complementarity table.")] = None,
    image_run: Annotated[Path | None, typer.Option("--image-run", help="Image-only run.")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Where to write PNGs (default: the run "
                                             "directory).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Metrics, confusion matrix and per-class F1 PNGs; the text-vs-image complementarity
    table (oracle bound of fusion) with --text-run/--image-run; contributions for stacks.

    Example: fusion report runs/hanet --text-run runs/text --image-run runs/image
    """
    from fusion.report import report as do_report

    res = do_report(run, out_dir=out, text_run=text_run, image_run=image_run)
    if json_out:
        console.print_json(json.dumps(res, default=str))
        return
    m = res["metrics"]
    h = m.get("holdout") or {}
    console.print(f"[bold]{res['name']}[/] ({res['head']}): OOF macro-F1 {m['macro_f1']:.4f}, "
                  f"acc {m['accuracy']:.4f}; holdout macro-F1 {h.get('macro_f1', 0):.4f}, acc "
                  f"{h.get('accuracy', 0):.4f}")
    for split, c in (res.get("complementarity") or {}).items():
        t = Table(f"{split} (n={c['n']})", "items", "share", title="text vs image")
        for key in ("both_right", "only_text_right", "only_image_right", "both_wrong"):
            t.add_row(key.replace("_", " "), str(c[key]), f"{c[key] / c['n']:.1%}")
        t.add_row("oracle (fusion upper bound)", "", f"{c['oracle_accuracy']:.1%}")
        console.print(t)
    if "contributions" in res:
        c = res["contributions"]
        t = Table("source run", "mean |contribution|", title="stacker attributions")
        for k, v in c.get("mean_abs", {}).items():
            t.add_row(k, f"{v:.4f}")
        console.print(t)
        if "non_text_decided" in c:
            console.print(f"items decided by a non-text run: {c['non_text_decided']}")
    for p in res["plots"]:
        console.print(f"wrote {p}")


@app.command("check-head")
@handle_errors
def check_head_cmd(
    head: Annotated[str, typer.Argument(help="Registered name, file.py:Class or module:Class.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Head option KEY=VALUE.")]
    = None,
    json_out: JsonFlag = False,
) -> None:
    """Run the head property suite (shape, gradients, batch independence, padding and region
    permutation invariance, attention normalisation) and say which property fails, by how much.

    Example: fusion check-head examples/custom_head.py:GatedSum
    """
    from fusion.checks import check_head
    from fusion.heads import create_head

    opts = parse_sets(set_)
    target: Any = head
    if opts:
        target = create_head(head, text_dim=16, image_dim=12, num_classes=5, text_layers=2,
                             **opts)
    results = check_head(target)
    if json_out:
        console.print_json(json.dumps([r.__dict__ for r in results], default=str))
    else:
        for r in results:
            mark = "[green]pass[/]" if r.passed else "[red]FAIL[/]"
            console.print(f"{mark} {r.name}: {escape(r.detail)} (max deviation {r.value:.3g})")
    if not all(r.passed for r in results):
        raise typer.Exit(1)


def main() -> None:
    from . import stack_cmd  # noqa: F401  (registers `stack` on app; kept out of import time)

    run_app(app)


if __name__ == "__main__":
    # run through the package module so commands registered on its `app` are present
    from cli.fusion_app import main as _main

    _main()
