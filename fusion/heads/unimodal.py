"""Unimodal baselines: ``text`` and ``image`` (an MLP on one pooled vector)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from fusion.batch import Batch
from fusion.heads.base import FusionHead, check_dropout, check_int, check_layer
from fusion.heads.layers import Pool, neck
from fusion.heads.registry import register_head

__all__ = ["ImageHead", "TextHead"]


class _UnimodalHead(FusionHead):
    modality: ClassVar[str]

    def _build(self, pool: str, layer: int, hidden: int, dropout: float) -> None:
        check_int(self.label, 0, hidden=hidden)
        check_dropout(self.label, dropout)
        dim = self.text_dim if self.modality == "text" else self.image_dim
        self.pool = Pool(self.modality, dim, pool, layer, self.label)
        self.needs = self.pool.needs  # narrows the class-level superset for this instance
        self.neck, width = neck(dim, hidden, dropout)
        self.fc = nn.Linear(width, self.num_classes)

    def forward_features(self, batch: Batch) -> Tensor:
        x, attn = self.pool(batch)  # (B, D)
        if attn is not None:
            self.expose(self.modality, *attn)
        return x


@register_head("text")
class TextHead(_UnimodalHead):
    """Text only: pooled text vector (B, Dt) -> [Linear -> GELU] -> Linear -> (B, K)."""

    modality = "text"
    modalities = ("text",)
    needs = frozenset({"text_pooled", "text_tokens", "text_mask"})

    def __init__(
        self,
        *,
        pool: str = "pooled",
        layer: int = -1,
        hidden: int = 256,
        dropout: float = 0.1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        if pool != "pooled":
            check_layer(self.label, layer, self.text_layers)
        self._build(pool, layer, hidden, dropout)


@register_head("image")
class ImageHead(_UnimodalHead):
    """Image only: pooled image vector (B, Di) -> [Linear -> GELU] -> Linear -> (B, K)."""

    modality = "image"
    modalities = ("image",)
    needs = frozenset({"image_pooled", "image_regions"})

    def __init__(
        self,
        *,
        pool: str = "pooled",
        hidden: int = 256,
        dropout: float = 0.1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        self._build(pool, -1, hidden, dropout)
