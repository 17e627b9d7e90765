"""Which runs may be combined or compared: the one rule shared by `fusion stack` and
`fusion compare`.

Two runs can be stacked or compared item by item only when they come from the same store
(config ``store.fingerprint``), the same folds (``store.folds_fingerprint`` and the fold
assignment), the same class list and the same labels. Every refusal is one line naming both
runs, the differing value and the fix.
"""

from __future__ import annotations

import numpy as np

from .errors import FusionError, StackError
from .rundir import Run

__all__ = ["check_same_split", "label"]


def label(run: Run) -> str:
    """How messages name a run: ``'text' (runs/text)``."""
    return f"{run.name!r} ({run.path})"


def check_same_split(ref: Run, r: Run, *, action: str = "stack",
                     error: type[FusionError] = StackError) -> None:
    """Raise ``error`` unless ``r`` comes from ``ref``'s store, folds, classes and labels.

    ``action`` names what the user is doing in the fix ("stack", "compare"). The fold
    assignment and labels are compared when both runs record them.
    """
    if r.store_fingerprint != ref.store_fingerprint:
        raise error(
            f"run {label(r)} comes from store fingerprint {r.store_fingerprint!r} but "
            f"{label(ref)} from {ref.store_fingerprint!r}; {action} only runs trained on "
            "the same store"
        )
    if r.folds_fingerprint != ref.folds_fingerprint:
        raise error(
            f"run {label(r)} uses folds {r.folds_fingerprint!r} but {label(ref)} uses "
            f"{ref.folds_fingerprint!r}; re-train it on the store's canonical folds"
        )
    if list(r.classes) != list(ref.classes):
        raise error(
            f"run {label(r)} has classes {r.classes[:6]}... but {label(ref)} has "
            f"{ref.classes[:6]}...; runs must share the store's class list"
        )
    fr, fref = r.config.get("folds") or {}, ref.config.get("folds") or {}
    if not np.array_equal(np.asarray(fr.get("assignment", [])),
                          np.asarray(fref.get("assignment", []))):
        raise error(
            f"run {label(r)} has a different fold assignment than {label(ref)}; "
            "re-train it on the store's canonical folds"
        )
    if ("labels" in r.config and "labels" in ref.config
            and not np.array_equal(np.asarray(r.config["labels"]),
                                   np.asarray(ref.config["labels"]))):
        raise error(
            f"run {label(r)} has different labels than {label(ref)}; "
            "were they trained on the same store?"
        )
