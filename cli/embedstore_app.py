"""`embedstore`: create, inspect, verify and export embedding stores.

The commands are plain functions in :mod:`cli.store_cmds`, :mod:`cli.extract_cmd` and
:mod:`cli.weights_cmd`; this module registers them, so ``from cli.embedstore_app import app``
has every command.
"""

from __future__ import annotations

import typer

from ._common import quiet_zarr_notes, run_app
from .extract_cmd import extract
from .store_cmds import export, info, verify
from .weights_cmd import weights_app

app = typer.Typer(
    name="embedstore",
    help="Cache token-level text and spatial image encoder outputs in a Zarr store.\n\n"
    "Examples:\n\n"
    "  embedstore weights lite0 --out lite0.safetensors\n\n"
    "  embedstore extract data/catalog.csv --store cat2.zarr --text hf:$(embedstore weights "
    "path minilm) --image timm:tf_efficientnet_lite0@lite0.safetensors\n\n"
    "  embedstore info cat.zarr\n\n"
    "  embedstore verify cat.zarr",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _callback() -> None:
    quiet_zarr_notes()


app.command("extract")(extract)
app.command("info")(info)
app.command("verify")(verify)
app.command("export")(export)
app.add_typer(weights_app, name="weights")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
