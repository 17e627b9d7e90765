"""The random batches of the head property suite (:mod:`fusion.checks`) and the ways it
perturbs them: more padding, shuffled regions, redrawn values of absent rows."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from embedstore.gallery import gallery_batch
from fusion.batch import Batch
from fusion.heads.base import BATCH_FIELDS

__all__ = ["GALLERY", "LENGTHS", "NO_IMAGE", "PATCHES", "gallery_of", "keep_only", "pad_more",
           "permute_patches", "random_batch", "redraw"]

LENGTHS = (7, 3, 0, 5)  # text lengths of the check batch: full, short, empty, medium
PATCHES = 6  # image patch tokens after the prefix
NO_IMAGE = 1  # the check batch's item without an image (its text is there)
# images per item of the gallery variant (the item without image keeps none); the last image
# of item 3 is a failed one (masked, random values)
GALLERY = (4, 0, 2, 3)



def random_batch(
    *,
    text_dim: int = 16,
    image_dim: int = 12,
    num_classes: int = 5,
    text_layers: int = 2,
    image_prefix: int = 1,
    lengths: tuple[int, ...] = LENGTHS,
    patches: int = PATCHES,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    absent: bool = False,
) -> Batch:
    """A right-padded random batch; pad positions hold random values too (never zeros), so a
    head that forgets the mask is caught. ``absent``: the empty texts are marked absent
    (``text_present``) and item :data:`NO_IMAGE` has no image (``image_present``); their stored
    values stay random, so a head that reads them is caught."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(max(lengths), 1)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    return Batch(
        text_tokens=rand(b, t, text_layers, text_dim),
        text_mask=mask,
        text_pooled=rand(b, text_dim),
        image_regions=rand(b, image_prefix + patches, image_dim),
        image_prefix=image_prefix,
        image_pooled=rand(b, image_dim),
        labels=torch.randint(0, num_classes, (b,), generator=g),
        ids=tuple(f"item{i}" for i in range(b)),
        text_present=torch.tensor(lengths) > 0 if absent else None,
        image_present=(torch.arange(b) != NO_IMAGE) if absent else None,
    )


def pad_more(batch: Batch, extra: int, g: torch.Generator) -> Batch:
    """Append ``extra`` pad positions and redraw the content of every pad position."""
    tokens, mask = batch.text_tokens, batch.text_mask
    assert tokens is not None and mask is not None
    b, t, n_layers, d = tokens.shape
    noise = torch.randn(b, t + extra, n_layers, d, generator=g, dtype=torch.float64)
    new_mask = torch.cat([mask, mask.new_zeros(b, extra)], dim=1)
    new_tokens = torch.where(
        new_mask[:, :, None, None],
        torch.cat([tokens, tokens.new_zeros(b, extra, n_layers, d)], 1),
        noise,
    )
    return replace(batch, text_tokens=new_tokens.to(tokens.dtype), text_mask=new_mask)


def permute_patches(batch: Batch, g: torch.Generator) -> Batch:
    """Shuffle each item's image regions after the prefix with its own permutation."""
    regions = batch.image_regions
    assert regions is not None
    p = batch.image_prefix
    b, r, d = regions.shape
    order = torch.stack([torch.randperm(r - p, generator=g) + p for _ in range(b)])  # (B, R-p)
    order = torch.cat([torch.arange(p).expand(b, p), order], dim=1)
    return replace(batch, image_regions=regions.gather(1, order[:, :, None].expand(b, r, d)))


def redraw(batch: Batch, rows: Tensor, modality: str, g: torch.Generator) -> Batch:
    """New random values for ``modality``'s fields on ``rows`` (B,) bool; text rows also get a
    random number of valid tokens (a right-padded mask)."""
    out: dict[str, Any] = {}
    fields = (("text_tokens", "text_pooled") if modality == "text"
              else ("image_regions", "image_pooled"))
    for name in fields:
        v = getattr(batch, name)
        if v is not None:
            noise = torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
            out[name] = torch.where(rows.view(-1, *([1] * (v.dim() - 1))), noise, v)
    if modality == "text" and batch.text_mask is not None:
        mask = batch.text_mask
        t = mask.shape[1]
        n = torch.randint(1, t + 1, (mask.shape[0],), generator=g)
        out["text_mask"] = torch.where(rows[:, None], torch.arange(t)[None, :] < n[:, None], mask)
    return replace(batch, **out)


def keep_only(batch: Batch, fields: frozenset[str]) -> Batch:
    return replace(batch, **{f: None for f in BATCH_FIELDS - fields})


def gallery_of(batch: Batch, seed: int, *, reverse: bool = False, noise: bool = False) -> Batch:
    """The batch as a gallery batch (several images per item, docs/format.md §2.6): item i
    gets :data:`GALLERY` [i] random images, the first its image in ``batch``; the last image
    of item 3 failed. ``reverse``: every item's images listed in reverse order; ``noise``:
    the regions of padding and failed images redrawn (a head must not read them)."""
    regions = batch.image_regions
    assert regions is not None
    b, r, d = regions.shape
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(b):
        k = GALLERY[i % len(GALLERY)]
        imgs = torch.randn(k, r, d, generator=g, dtype=torch.float64)
        if k:
            imgs[0] = regions[i].double()
        ok = torch.ones(k, dtype=torch.bool)
        if i == 3 and k:
            ok[-1] = False
        if reverse:
            imgs, ok = imgs.flip(0), ok.flip(0)
        items.append((imgs.numpy(), ok.numpy()))
    out = gallery_batch(items, r, d, batch.image_prefix)
    reg, mask = out["image_regions"].to(regions.dtype), out["image_mask"]
    if noise:
        fill = torch.randn(reg.shape, generator=g, dtype=torch.float64).to(reg.dtype)
        reg = torch.where(mask[..., None], reg, fill)
    present = torch.tensor([GALLERY[i % len(GALLERY)] > 0 for i in range(b)])
    if batch.image_present is not None:
        present = present & batch.image_present.bool()
    return replace(batch, image_regions=reg, image_mask=mask, image_prefix=out["image_prefix"],
                   image_present=present)
