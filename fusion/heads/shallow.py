"""Feature-level fusion baselines (Verma et al. 2020): ``concat`` and ``add``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.heads.base import FusionHead, check_dropout, check_int, check_layer
from fusion.heads.layers import Missing, Pool, neck
from fusion.heads.registry import register_head

__all__ = ["AddHead", "ConcatHead"]


class _TwoStreamHead(FusionHead):
    """Pools each modality (``pool`` option) and projects it linearly to width ``dim``."""

    needs = frozenset({"text_pooled", "text_tokens", "text_mask", "image_pooled", "image_regions"})

    def _build_streams(self, pool: str, layer: int, dim: int, dropout: float) -> None:
        check_int(self.label, dim=dim)
        check_dropout(self.label, dropout)
        if pool != "pooled":
            check_layer(self.label, layer, self.text_layers)
        self.text_pool = Pool("text", self.text_dim, pool, layer, self.label)
        self.image_pool = Pool("image", self.image_dim, pool, -1, self.label)
        self.needs = self.text_pool.needs | self.image_pool.needs
        self.text_proj = nn.Linear(self.text_dim, dim)  # Verma: Conv1d(k=1) == Linear, no act
        self.image_proj = nn.Linear(self.image_dim, dim)
        # an absent modality's pooled vector is replaced by a learned one (docs/heads.md)
        self.text_missing = Missing(self.text_dim)
        self.image_missing = Missing(self.image_dim)

    def _streams(self, batch: Batch) -> tuple[Tensor, Tensor]:
        t, t_attn = self.text_pool(batch)  # (B, Dt)
        i, i_attn = self.image_pool(batch)  # (B, Di)
        if t_attn is not None:
            self.expose("text", *t_attn)
        if i_attn is not None:
            self.expose("image", *i_attn)
        t = self.text_missing(t, batch.present("text"))
        i = self.image_missing(i, batch.present("image"))
        return self.text_proj(t), self.image_proj(i)  # (B, d) each


@register_head("concat")
class ConcatHead(_TwoStreamHead):
    """[P_t t ; P_i i] (B, 2d) -> Linear -> GELU -> Linear -> (B, K)."""

    def __init__(
        self,
        *,
        pool: str = "pooled",
        layer: int = -1,
        dim: int = 128,
        hidden: int = 256,
        dropout: float = 0.1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        check_int(self.label, 0, hidden=hidden)
        self._build_streams(pool, layer, dim, dropout)
        self.neck, width = neck(2 * dim, hidden, dropout)
        self.fc = nn.Linear(width, self.num_classes)

    def forward_features(self, batch: Batch) -> Tensor:
        return torch.cat(self._streams(batch), dim=-1)  # (B, 2d)


@register_head("add")
class AddHead(_TwoStreamHead):
    """P_t t + P_i i (B, d) -> Dropout -> Linear -> (B, K)."""

    def __init__(
        self,
        *,
        pool: str = "pooled",
        layer: int = -1,
        dim: int = 256,
        dropout: float = 0.1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        self._build_streams(pool, layer, dim, dropout)
        self.neck = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, self.num_classes)

    def forward_features(self, batch: Batch) -> Tensor:
        t, i = self._streams(batch)
        return t + i  # (B, d)
