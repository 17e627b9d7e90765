"""A JSON-able summary of a store (`embedstore info`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import EmbedStoreError

__all__ = ["grouping_info", "store_info"]


def grouping_info(store) -> dict[str, Any] | None:
    """How the folds were grouped: ``{group_col, n_groups, largest_group}`` (None: no groups)."""
    groups = store.groups
    if groups is None:
        return None
    counts = np.unique(groups, return_counts=True)[1]
    return {"group_col": store.fold_info.get("group_col"), "n_groups": int(len(counts)),
            "largest_group": int(counts.max()) if len(counts) else 0}


def store_info(store) -> dict[str, Any]:
    feats: dict[str, Any] = {}
    for name in store.features:
        try:
            fs = store.features[name]
        except EmbedStoreError as e:
            feats[name] = {"error": str(e)}
            continue
        m = fs.meta
        feats[name] = {
            "modality": fs.modality,
            "kind": fs.kind,
            "dim": fs.dim,
            "layers": fs.layers if fs.modality == "text" else None,
            "shape": list(fs.shape),
            "dtype": m.get("dtype"),
            "status": fs.status,
            "n_done": fs.n_done,
            "n_errors": fs.n_errors,
            "pooling": m.get("pooling"),
            "grid": fs.grid,
            "prefix_tokens": fs.prefix_tokens if fs.modality == "image" else None,
            "encoder": fs.encoder,
            "preprocess": m.get("preprocess"),
            "timings": m.get("timings"),
            "created": m.get("created"),
        }
    return {
        "url": store.url,
        "format": store.meta["format"],
        "n_items": store.n_items,
        "classes": store.classes,
        "n_classes": None if store.classes is None else len(store.classes),
        "folds": store.fold_info,
        "grouping": grouping_info(store),
        "dataset": store.meta.get("dataset"),
        "created": store.meta.get("created"),
        "features": feats,
    }
