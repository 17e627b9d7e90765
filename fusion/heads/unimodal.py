"""Unimodal baselines: ``text`` and ``image`` (an MLP on one pooled vector).

An item without the head's modality is scored by learned logits ``missing_logits`` (K,), not by
the MLP: the MLP never sees (and gets no gradient from) such rows, and the cross-entropy of the
rows without the modality fits ``missing_logits`` to their log class frequencies, so they are
scored by the class prior of the items that lack the modality (docs/heads.md "Missing
modalities")."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.heads.base import FusionHead, check_dropout, check_int, check_layer
from fusion.heads.layers import Pool, neck
from fusion.heads.registry import register_head

__all__ = ["ImageHead", "TextHead"]


class _UnimodalHead(FusionHead):
    fallback_routing = False  # one modality: nothing to fall back to

    modality: ClassVar[str]

    def _build(self, pool: str, layer: int, hidden: int, dropout: float) -> None:
        check_int(self.label, 0, hidden=hidden)
        check_dropout(self.label, dropout)
        dim = self.text_dim if self.modality == "text" else self.image_dim
        self.pool = Pool(self.modality, dim, pool, layer, self.label)
        self.needs = self.pool.needs  # narrows the class-level superset for this instance
        self.neck, width = neck(dim, hidden, dropout)
        self.fc = nn.Linear(width, self.num_classes)
        self.missing_logits = nn.Parameter(torch.zeros(self.num_classes))
        self.register_load_state_dict_pre_hook(_missing_logits_default)

    def forward_features(self, batch: Batch) -> Tensor:
        """The pooled vector (B, D); zeros for rows without the modality."""
        x, attn = self.pool(batch)  # (B, D)
        if attn is not None:
            self.expose(self.modality, *attn)
        ok = batch.present(self.modality)
        return x if ok is None else torch.where(ok.to(x.device)[:, None], x, torch.zeros_like(x))

    def forward(self, batch: Batch) -> Tensor:
        logits = super().forward(batch)  # (B, K)
        ok = batch.present(self.modality)
        if ok is None:
            return logits
        return torch.where(ok.to(logits.device)[:, None], logits,
                           self.missing_logits.to(logits.dtype))


def _missing_logits_default(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Weights saved before ``missing_logits`` existed load with it at zeros (uniform)."""
    if prefix + "missing_logits" not in state_dict:
        state_dict[prefix + "missing_logits"] = torch.zeros_like(module.missing_logits)


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
