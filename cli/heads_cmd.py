"""`fusion heads` and `fusion check-head`: what heads exist, and whether one keeps the contract."""

from __future__ import annotations

import inspect
import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from fusion.checks import check_head as run_checks
from fusion.heads import create_head, head_options, list_heads, resolve_head
from fusion.keyvalue import parse_key_values

from ._common import JsonFlag, console, handle_errors

__all__ = ["heads", "check_head"]


@handle_errors
def heads(json_out: JsonFlag = False) -> None:
    """List the registered heads (built-in and from the `fusion.heads` entry points) and their
    options with defaults.

    Example: fusion heads
    """
    data = {}
    for h in list_heads():
        cls = resolve_head(h)
        data[h] = {"modalities": list(getattr(cls, "modalities", ())),
                   "options": {k: (None if v is inspect.Parameter.empty else v)
                               for k, v in head_options(h).items()},
                   "doc": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""}
    if json_out:
        console.print_json(json.dumps(data, default=str))
        return
    t = Table("head", "modalities", "options (defaults)", "what",
              caption="Every text+image head but late also takes fallback=true|false (default: "
              "on when the training store has items without a modality; docs/heads.md §6).")
    for h, d in data.items():
        t.add_row(h, "+".join(d["modalities"]),
                  escape(", ".join(f"{k}={v}" for k, v in d["options"].items())),
                  escape(d["doc"]))
    console.print(t)


@handle_errors
def check_head(
    head: Annotated[str, typer.Argument(help="Registered name, file.py:Class or module:Class.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Head option KEY=VALUE.")]
    = None,
    json_out: JsonFlag = False,
) -> None:
    """Run the head property suite (shape, gradients, batch independence, padding and region
    permutation invariance, attention normalisation, an absent text or image's stored values
    never used, the other modality still used when one is absent) and say which property
    fails, by how much.

    Example: fusion check-head examples/custom_head.py:GMUHead --set dim=16
    """
    opts = parse_key_values(set_)
    target: Any = head
    if opts:
        target = create_head(head, text_dim=16, image_dim=12, num_classes=5, text_layers=2,
                             **opts)
    results = run_checks(target)
    if json_out:
        console.print_json(json.dumps([r.__dict__ for r in results], default=str))
    else:
        for r in results:
            mark = "[green]pass[/]" if r.passed else "[red]FAIL[/]"
            console.print(f"{mark} {r.name}: {escape(r.detail)} (max deviation {r.value:.3g})")
    if not all(r.passed for r in results):
        raise typer.Exit(1)
