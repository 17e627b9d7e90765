"""The writer's gallery rules (docs/format.md §2.6): the layout of a new gallery set and the
checks and writes of one block of images. Used by :mod:`embedstore._writer` only."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidInputError
from .format import gallery_item_rows, region_chunk_rows, token_layout

__all__ = ["cast_rows", "gallery_block", "gallery_layout"]

_F16_MAX = float(np.finfo(np.float16).max)


def gallery_layout(n: int, n_images, n_regions: int, dim: int, block_rows: int, dtype: str,
                   data: dict) -> dict[str, Any]:
    """A gallery's layout (docs/format.md §2.6): image rows placed by :func:`token_layout`
    with the ``regions`` chunk as the unit, so a block owns whole chunks; ``total``: M."""
    counts = np.asarray(n_images, dtype=np.int64)
    if counts.shape != (n,) or (counts < 0).any() or (counts > np.iinfo(np.int16).max).any():
        raise InvalidInputError(f"n_images must be {n} ints in 0..32767, got shape "
                                f"{counts.shape}")
    rc = region_chunk_rows(n_regions, dim, block_rows, np.dtype(dtype).itemsize)
    data["image_offsets"], total = token_layout(counts, block_rows, rc)
    data["n_images"] = counts.astype(np.int16)
    return {"gallery": True, "n_tokens": int(counts.sum()), "total": total}


def gallery_block(meta: dict, offsets: np.ndarray, lengths: np.ndarray, where: tuple,
                  regions, image_pooled, image_errors,
                  writes: list) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Check a gallery block's images, queue their writes, return the items' rows."""
    b, start, stop = where
    k = int(lengths[start:stop].sum())
    pdim = int(meta.get("pooled_dim", meta["dim"]))
    want = {"regions": (k, meta["n_regions"], meta["dim"]),
            "image_pooled": (k, pdim), "image_errors": (k,)}
    errs = np.array(["" if e is None else str(e) for e in (image_errors if image_errors
                     is not None else [""] * k)], dtype=object).astype(str)
    got = {"regions": regions, "image_pooled": image_pooled, "image_errors": errs}
    for key, shape in want.items():
        if got[key] is None or np.shape(got[key]) != shape:
            raise InvalidInputError(f"block {b}: {key} must be {shape} (the block's images), "
                                    f"got {None if got[key] is None else np.shape(got[key])}")
    i0 = int(offsets[start])
    if k:
        sel = slice(i0, i0 + k)
        writes += [("regions", sel, cast_rows(regions, np.dtype(meta["dtype"]))),
                   ("image_pooled", sel, np.asarray(image_pooled, np.float32)),
                   ("image_errors", sel, errs)]
    return gallery_item_rows(image_pooled, errs, lengths[start:stop], pdim)


def cast_rows(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` as the set's dtype; clipped first for float16, where hidden states past its
    range would become inf."""
    x = np.asarray(x)
    if dtype == np.float16:
        x = np.clip(x, -_F16_MAX, _F16_MAX)
    return x.astype(dtype, copy=False)
