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
           "is_gallery", "mean_readable", "pad_gallery"]

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
    """The padded, masked image fields of a batch of gallery items (:func:`pad_gallery` on
    numpy inputs). ``items``: per item its images (n_i, R, D) and which were read (n_i,)."""
    counts = [len(x) for x, _ in items]
    regions = (np.concatenate([np.asarray(x, np.float32).reshape(-1, n_regions, dim)
                               for x, _ in items]) if sum(counts) else
               np.zeros((0, n_regions, dim), np.float32))
    ok = np.concatenate([np.asarray(o, bool).reshape(-1) for _, o in items] + [np.zeros(0, bool)])
    reg, mask = pad_gallery(torch.from_numpy(regions), counts, torch.from_numpy(ok), prefix)
    return {"image_regions": reg, "image_mask": mask,
            "image_prefix": max([1] + counts) * prefix}


def pad_gallery(regions: torch.Tensor, counts: Sequence[int], ok: torch.Tensor,
                prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of every item, padded per item: the one layout of the cached and live
    paths (differentiable in ``regions``).

    ``regions`` (M, R, D): the images of a batch's items, concatenated in item order,
    ``counts[i]`` of item i; ``ok`` (M,) bool: read. With G the most images of an item (at
    least 1), returns ``image_regions`` (B, G*R, D): every image's ``prefix`` tokens first
    (image 0's, image 1's, ...), then every image's grid in the same order, so
    ``image_prefix`` = G * prefix and heads that skip the prefix read all grids; and
    ``image_mask`` (B, G*R), True on the regions of images that exist and were read (padding
    and failed images False). Items are sets of images: a head that attends with this mask
    and no position encoding is invariant to the images' order.
    """
    b, g = len(counts), max([1] + list(counts))
    m, r, d = regions.shape
    dev = regions.device
    cnt = torch.as_tensor(list(counts), dtype=torch.long, device=dev)
    item = torch.repeat_interleave(torch.arange(b, device=dev), cnt)  # (M,)
    pos = torch.arange(m, device=dev) - (torch.cumsum(cnt, 0) - cnt)[item]  # (M,)
    slots = regions.new_zeros((b, g, r, d)).index_put((item, pos), regions)  # (B, G, R, D)
    good = torch.zeros((b, g), dtype=torch.bool, device=dev)
    good[item, pos] = ok.to(dev).bool()
    reg = torch.cat([slots[:, :, :prefix].reshape(b, g * prefix, d),
                     slots[:, :, prefix:].reshape(b, g * (r - prefix), d)], dim=1)
    good = good[:, :, None].expand(b, g, r)
    mask = torch.cat([good[:, :, :prefix].reshape(b, -1), good[:, :, prefix:].reshape(b, -1)], 1)
    return reg, mask  # (B, G*R, D), (B, G*R)


def mean_readable(pooled: torch.Tensor, counts: Sequence[int], ok: torch.Tensor) -> torch.Tensor:
    """(B, P) per item: the mean of its readable images' pooled vectors (M, P), zeros if none
    (the stored ``pooled`` of a gallery item, :func:`gallery_item_rows`)."""
    b, dev = len(counts), pooled.device
    cnt = torch.as_tensor(list(counts), dtype=torch.long, device=dev)
    item = torch.repeat_interleave(torch.arange(b, device=dev), cnt)
    w = ok.to(dev, pooled.dtype)[:, None]
    total = pooled.new_zeros((b, pooled.shape[1])).index_add(0, item, pooled * w)
    n = w.new_zeros((b, 1)).index_add(0, item, w)
    return total / n.clamp(min=1.0)
