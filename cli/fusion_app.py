"""`fusion`: train fusion heads and stackers on cached tensors, compare and report runs.

This module only assembles the app: each command is a plain function in its own module
(`train_cmd`, `stack_cmd`, `runs_cmd`, `heads_cmd`), registered here; no command module
imports the app.
"""

from __future__ import annotations

import typer

from . import heads_cmd, runs_cmd, stack_cmd, train_cmd
from ._common import quiet_zarr_notes, run_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="fusion",
    help="Train multimodal fusion heads and GBDT stackers on an embedstore cache.\n\n"
    "Examples:\n\n"
    "  fusion heads\n\n"
    "  fusion train --store cat.zarr --head text --out runs/text\n\n"
    "  fusion train --store cat.zarr --head image --out runs/image\n\n"
    "  fusion train --store cat.zarr --head hanet --out runs/hanet\n\n"
    "  fusion stack -r runs/text -r runs/image -r runs/hanet --stacker lightgbm --out runs/stack\n\n"
    "  fusion compare runs/*",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _callback() -> None:
    quiet_zarr_notes()


app.command("heads")(heads_cmd.heads)
app.command("train")(train_cmd.train)
app.command("stack")(stack_cmd.stack)
app.command("compare")(runs_cmd.compare)
app.command("report")(runs_cmd.report)
app.command("check-head")(heads_cmd.check_head)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
