"""A JSON-able summary of a store (`embedstore info`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .classes import class_sizes
from .errors import EmbedStoreError

__all__ = ["grouping_info", "class_size_info", "store_info"]


def grouping_info(store) -> dict[str, Any] | None:
    """How the folds were grouped: ``{group_col, n_groups, largest_group}`` (None: no groups)."""
    groups = store.groups
    if groups is None:
        return None
    counts = np.unique(groups, return_counts=True)[1]
    return {"group_col": store.fold_info.get("group_col"), "n_groups": int(len(counts)),
            "largest_group": int(counts.max()) if len(counts) else 0}


def class_size_info(store) -> dict[str, Any] | None:
    """The class-size distribution over the trainable items (the holdout and unlabelled items
    left out): :func:`embedstore.classes.class_sizes`, plus how many classes have fewer items
    than folds (None: no labels)."""
    if store.labels is None or store.classes is None:
        return None
    labels, folds = np.asarray(store.labels, np.int64), np.asarray(store.folds)
    counts = np.bincount(labels[(folds >= 0) & (labels >= 0)], minlength=len(store.classes))
    k = int(store.fold_info["k"])
    return {"basis": "trainable items", **class_sizes(counts), "folds": k,
            "below_folds": int(((counts > 0) & (counts < k)).sum())}


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
            "presence": fs.presence_counts(),  # present / absent (catalog) / failed rows
            "pooling": m.get("pooling"),
            "grid": fs.grid,
            "prefix_tokens": fs.prefix_tokens if fs.modality == "image" else None,
            "encoder": fs.encoder,
            "preprocess": m.get("preprocess"),
            "timings": m.get("timings"),
            "created": m.get("created"),
        }
        if fs.gallery:  # several images per item (format.md §2.6): shape counts image rows
            n_img = fs.n_images()
            feats[name]["gallery"] = {"images": int(n_img.sum()),
                                      "failed_images": int((~fs.image_ok()).sum()),
                                      "max_per_item": int(n_img.max(initial=0))}
    return {
        "url": store.url,
        "format": store.meta["format"],
        "n_items": store.n_items,
        "classes": store.classes,
        "n_classes": None if store.classes is None else len(store.classes),
        "folds": store.fold_info,
        "class_sizes": class_size_info(store),
        "grouping": grouping_info(store),
        "dataset": store.meta.get("dataset"),
        "created": store.meta.get("created"),
        "features": feats,
    }
