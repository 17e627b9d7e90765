"""`embedstore`: create, inspect, verify and export embedding stores.

The commands are plain functions in :mod:`cli.store_cmds`, :mod:`cli.extract_cmd` and
:mod:`cli.weights_cmd`; this module registers them, so ``from cli.embedstore_app import app``
has every command.
"""

from __future__ import annotations

from ._common import make_app, run_app
from .extract_cmd import extract
from .store_cmds import export, info, verify
from .weights_cmd import weights_app

app = make_app(
    "embedstore",
    "Cache token-level text and spatial image encoder outputs in a Zarr store.",
    [
        "embedstore weights lite0 --out lite0.safetensors",
        "embedstore extract data/catalog.csv --store cat2.zarr"
        " --text hf:$(embedstore weights path minilm)"
        " --image timm:tf_efficientnet_lite0@lite0.safetensors",
        "embedstore info cat.zarr",
        "embedstore verify cat.zarr",
    ],
)

app.command("extract")(extract)
app.command("info")(info)
app.command("verify")(verify)
app.command("export")(export)
app.add_typer(weights_app, name="weights")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
