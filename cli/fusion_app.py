"""`fusion`: train fusion heads and stackers on cached tensors, compare and report runs.

This module only assembles the app: each command is a plain function in its own module
(`train_cmd`, `stack_cmd`, `runs_cmd`, `heads_cmd`), registered here; no command module
imports the app.
"""

from __future__ import annotations

from . import heads_cmd, merge_cmd, predict_cmd, runs_cmd, stack_cmd, sweep_cmd, train_cmd
from ._common import make_app, run_app

__all__ = ["app", "main"]

app = make_app(
    "fusion",
    "Train multimodal fusion heads and GBDT stackers on an embedstore cache.",
    [
        "fusion heads",
        "fusion train --store cat.zarr --head text --out runs/text",
        "fusion train --store cat.zarr --head image --out runs/image",
        "fusion train --store cat.zarr --head hanet --out runs/hanet",
        "fusion stack -r runs/text -r runs/image -r runs/hanet --stacker lightgbm --out runs/stack",
        "fusion compare runs/*",
    ],
)

app.command("heads")(heads_cmd.heads)
app.command("train")(train_cmd.train)
app.command("stack")(stack_cmd.stack)
app.command("compare")(runs_cmd.compare)
app.command("report")(runs_cmd.report)
app.command("check-head")(heads_cmd.check_head)
app.command("predict")(predict_cmd.predict)
app.command("export")(predict_cmd.export)
app.command("sweep")(sweep_cmd.sweep)
app.command("merge")(merge_cmd.merge)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
