"""Presence rules of the store format (docs/format.md §2.5), part of :mod:`embedstore.format`
(which re-exports them; import them from there).

Every feature set stores ``presence [N] uint8`` per segment: ``1`` present, ``0`` absent in
the catalog (an empty text, no image value), ``2`` failed (``errors[i]`` says why). A set
written before the array existed gets it derived from ``errors`` and ``lengths``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ABSENT", "ABSENT_IMAGE", "ABSENT_TEXT", "FAILED", "PRESENT", "check_presence",
           "derive_presence"]

ABSENT, PRESENT, FAILED = 0, 1, 2
ABSENT_TEXT = "empty text (no characters after stripping HTML)"  # errors[i] of an absent text
ABSENT_IMAGE = "missing image (empty value in the image column)"  # ... of an absent image


def derive_presence(modality: str, errors: np.ndarray, lengths: np.ndarray | None = None
                    ) -> np.ndarray:
    """The presence of rows (uint8: 1 present, 0 absent in the catalog, 2 failed) from their
    ``errors`` (and, text, ``lengths``): what a writer stores in ``presence`` and what a reader
    uses for a set written without it (docs/format.md §2.5). A text with no token, or a row
    whose reason is the catalog's empty value, is absent; any other reason is a failure."""
    errors = np.asarray(errors, dtype=object).astype(str)
    out = np.where(errors == "", PRESENT, FAILED).astype(np.uint8)
    out[errors == (ABSENT_TEXT if modality == "text" else ABSENT_IMAGE)] = ABSENT
    if modality == "text" and lengths is not None:
        out[np.asarray(lengths) == 0] = ABSENT
    return out


def check_presence(presence: np.ndarray, errors: np.ndarray) -> str | None:
    """What is wrong with a stored ``presence`` next to ``errors``, or None: values other than
    0/1/2, a failed row without its reason, or a present row with one."""
    presence = np.asarray(presence)
    errors = np.asarray(errors, dtype=object).astype(str)
    bad = np.flatnonzero(presence > FAILED)
    if bad.size:
        return f"row {int(bad[0])} has presence {int(presence[bad[0]])}, not 0, 1 or 2"
    bad = np.flatnonzero((presence == FAILED) & (errors == ""))
    if bad.size:
        return f"row {int(bad[0])} is marked failed (2) but has no reason in errors"
    bad = np.flatnonzero((presence == PRESENT) & (errors != ""))
    if bad.size:
        return f"row {int(bad[0])} is marked present (1) but errors says {errors[bad[0]]!r}"
    return None
