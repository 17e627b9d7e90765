"""The typed batch that flows from the store reader to every fusion head."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

__all__ = ["Batch"]


@dataclass(frozen=True)
class Batch:
    """One padded mini-batch of cached (or live) encoder outputs.

    Every field may be ``None`` when the run has no feature set of that modality; a head that
    needs only one modality ignores the other.

    ``text_present`` / ``image_present`` say which rows have that modality (docs/format.md
    §2.5): False for an item whose text was empty or whose image was missing or unreadable
    (its stored values are zeros and must not be read as content), or a modality dropped by
    ``--modality-dropout``. ``None`` means every row has it. Use :meth:`present` to read them.

    Galleries (several images per item, docs/format.md §2.6): ``image_regions`` holds every
    image of an item, (B, G*R, Di) with every image's prefix tokens first (``image_prefix`` =
    G * prefix), and ``image_mask`` (B, G*R) is True on the regions of images that exist and
    were read; ``image_pooled`` is the mean over the item's readable images. ``image_mask`` is
    None for one-image stores (every region valid). ``image_present`` stays one flag per item.
    """

    text_tokens: torch.Tensor | None = None  # (B, T, L, Dt) float, T padded per batch
    text_mask: torch.Tensor | None = None  # (B, T) bool, True on valid tokens
    text_pooled: torch.Tensor | None = None  # (B, Dt)
    image_regions: torch.Tensor | None = None  # (B, R, Di), prefix tokens first
    image_prefix: int = 0  # number of CLS/register tokens at the front of image_regions
    image_pooled: torch.Tensor | None = None  # (B, Di)
    image_mask: torch.Tensor | None = None  # (B, R) bool (galleries: G*R), None = all valid
    labels: torch.Tensor | None = None  # (B,) int64
    ids: tuple[Any, ...] | None = None  # item ids, for bookkeeping only
    rows: torch.Tensor | None = None  # (B,) int64 store row indices
    text_present: torch.Tensor | None = None  # (B,) bool, None = every row has its text
    image_present: torch.Tensor | None = None  # (B,) bool, None = every row has its image

    def present(self, modality: str) -> torch.Tensor | None:
        """(B,) bool of rows that have ``modality`` ("text" or "image"); None when every row
        has it (a head can then skip masking; the loader gives None for a feature set with no
        absent or failed row, so such stores run exactly as before)."""
        mask = self.text_present if modality == "text" else self.image_present
        return None if mask is None else mask.bool()

    @property
    def size(self) -> int:
        for t in (self.text_pooled, self.image_pooled, self.text_tokens, self.image_regions):
            if t is not None:
                return int(t.shape[0])
        return 0 if self.labels is None else int(self.labels.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move tensors to ``device``; float tensors are cast to ``dtype`` when given."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if dtype is not None and v.is_floating_point():
                    v = v.to(device=device, dtype=dtype, non_blocking=True)
                else:
                    v = v.to(device=device, non_blocking=True)
            out[f.name] = v
        return replace(self, **out)

    def select(self, index: torch.Tensor | list[int]) -> Batch:
        """Rows ``index`` of the batch (padding is kept as is)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[idx.to(v.device)]
            elif f.name == "ids" and v is not None:
                v = tuple(v[i] for i in idx.tolist())
            out[f.name] = v
        return replace(self, **out)
