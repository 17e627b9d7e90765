"""Gallery image sets: several images per item (docs/format.md §2.6), the rules beside
:mod:`embedstore.format` (which re-exports them).

A gallery set (``"gallery": true``) stores *images* as the rows of ``regions`` and
``image_pooled``, ragged per item exactly like text tokens: item ``i``'s images are rows
``image_offsets[i] .. image_offsets[i] + n_images[i]``, laid out by
:func:`embedstore.format.token_layout` with the ``regions`` chunk as the alignment unit, so
every write block owns whole chunks. ``pooled [N, P]`` stays one vector per item: the mean of
the item's readable images' pooled vectors (order-invariant), so every reader of ``pooled``
works unchanged. A failed image keeps its slot (zeros) with its reason in ``image_errors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .presence import ABSENT, ABSENT_IMAGE, FAILED, PRESENT

__all__ = ["GALLERY_ARRAYS", "gallery_array_specs", "gallery_batch", "gallery_item_rows",
           "is_gallery"]

# arrays a gallery set has beyond a one-image set's (regions, pooled, done, errors, presence)
GALLERY_ARRAYS = ("image_offsets", "n_images", "image_pooled", "image_errors")
_SMALL_CHUNK = 262144


def is_gallery(meta: dict) -> bool:
    """The set stores several images per item (``gallery: true``)."""
    return bool(meta.get("gallery"))


def gallery_array_specs(meta: dict, total_images: int, region_rows: int) -> dict[str, tuple]:
    """``(shape, dtype, chunks, fill)`` of the per-image arrays of a gallery set holding
    ``total_images`` image rows (the layout's length, gaps included)."""
    n, dim = int(meta["n_items"]), int(meta["dim"])
    pdim, n_reg, m = int(meta.get("pooled_dim", dim)), int(meta["n_regions"]), max(total_images, 1)
    return {
        "regions": ((m, n_reg, dim), meta["dtype"], (region_rows, n_reg, dim), 0),
        "image_offsets": ((n + 1,), "int64", (min(n + 1, _SMALL_CHUNK),), None),
        "n_images": ((n,), "int16", (min(n, _SMALL_CHUNK),), None),
        "image_pooled": ((m, pdim), "float32", (region_rows, pdim), 0),
        "image_errors": ((m,), str, (region_rows,), ""),
    }


def gallery_item_rows(image_pooled: np.ndarray, image_errors: Any, n_images: np.ndarray,
                      pdim: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Per-item ``pooled`` (mean of the readable images), ``errors`` and ``presence`` of a
    block from its images (concatenated in item order, ``n_images`` per item): presence 1 if
    at least one image is readable, 0 if the item lists none, 2 if every image failed (its
    ``errors`` then says why, from the first image)."""
    n = len(n_images)
    pooled = np.zeros((n, pdim), np.float32)
    errors, presence = [""] * n, np.full(n, PRESENT, np.uint8)
    pos = 0
    for i, k in enumerate(np.asarray(n_images, np.int64).tolist()):
        errs = [str(e) for e in image_errors[pos : pos + k]]
        ok = [j for j, e in enumerate(errs) if not e]
        if k == 0:
            errors[i], presence[i] = ABSENT_IMAGE, ABSENT
        elif not ok:
            errors[i], presence[i] = f"all {k} images failed; first: {errs[0]}"[:300], FAILED
        else:
            pooled[i] = np.asarray(image_pooled[pos : pos + k], np.float32)[ok].mean(axis=0)
        pos += k
    return pooled, errors, presence


def gallery_batch(items: Sequence[tuple[np.ndarray, np.ndarray]], n_regions: int, dim: int,
                  prefix: int) -> dict[str, Any]:
    """The padded, masked image fields of a batch of gallery items.

    ``items``: per item its images (n_i, R, D) and which were read (n_i,) bool. With G the
    most images of an item in the batch (at least 1), ``image_regions`` is (B, G*R, D): every
    image's ``prefix`` tokens first (image 0's, image 1's, ...), then every image's grid in
    the same order, so ``image_prefix`` = G * prefix and heads that skip the prefix read all
    grids. ``image_mask`` (B, G*R) is True on the regions of images that exist and were read
    (padding images and failed ones are False). Items are sets of images: a head that
    attends with this mask and no position encoding is invariant to the images' order.
    """
    g = max([1] + [len(x) for x, _ in items])
    grid = n_regions - prefix
    reg = np.zeros((len(items), g * n_regions, dim), np.float32)
    mask = np.zeros((len(items), g * n_regions), bool)
    for j, (imgs, ok) in enumerate(items):
        for k in range(len(imgs)):
            pre, body = slice(k * prefix, (k + 1) * prefix), slice(g * prefix + k * grid,
                                                                    g * prefix + (k + 1) * grid)
            reg[j, pre], reg[j, body] = imgs[k][:prefix], imgs[k][prefix:]
            mask[j, pre] = mask[j, body] = bool(ok[k])
    return {"image_regions": torch.from_numpy(reg),  # (B, G*R, D)
            "image_mask": torch.from_numpy(mask),  # (B, G*R) bool
            "image_prefix": g * prefix}
