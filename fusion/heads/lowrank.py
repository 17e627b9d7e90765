"""``lmf``: Low-rank Multimodal Fusion (Liu et al. 2018): the tensor-fusion product computed
through rank-r modality-specific factors, without building the outer product."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.heads.base import FusionHead, check_dropout, check_int, check_layer
from fusion.heads.layers import Missing, Pool, neck
from fusion.heads.registry import register_head

__all__ = ["LowRankFusionHead"]


@register_head("lmf")
class LowRankFusionHead(FusionHead):
    """h = sum_r w_r (W_t^(r) [t; 1]) * (W_i^(r) [i; 1])  (B, d) -> MLP -> K.

        t = pool(text), i = pool(image)               (B, Dt), (B, Di)
        f_t^(r) = [t; 1] W_t^(r)                      (B, r, d)   W_t ∈ R^{r × (Dt+1) × d}
        f_i^(r) = [i; 1] W_i^(r)                      (B, r, d)
        h = sum_r w_r f_t^(r) * f_i^(r)               (B, d)      w ∈ R^r (Liu's fusion weights)

    Equal to a linear map of the tensor-fusion product [t; 1] (x) [i; 1] whose weight tensor has
    rank r, in O(r d (Dt + Di)) instead of O(d Dt Di). The factors act on the pooled vectors
    directly (no projection), as Liu et al.'s factors act on the subnetwork outputs.
    """

    needs = frozenset({"text_pooled", "text_tokens", "text_mask", "image_pooled", "image_regions"})

    def __init__(
        self,
        *,
        pool: str = "pooled",
        layer: int = -1,
        rank: int = 4,
        dim: int = 64,
        hidden: int = 128,
        dropout: float = 0.1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        check_int(self.label, rank=rank, dim=dim)
        check_int(self.label, 0, hidden=hidden)
        check_dropout(self.label, dropout)
        if pool != "pooled":
            check_layer(self.label, layer, self.text_layers)
        self.text_pool = Pool("text", self.text_dim, pool, layer, self.label)
        self.image_pool = Pool("image", self.image_dim, pool, -1, self.label)
        self.needs = self.text_pool.needs | self.image_pool.needs
        self.text_factor = nn.Parameter(torch.empty(rank, self.text_dim + 1, dim))
        self.image_factor = nn.Parameter(torch.empty(rank, self.image_dim + 1, dim))
        for factor in (self.text_factor, self.image_factor):
            nn.init.xavier_normal_(factor)
        self.text_missing = Missing(self.text_dim)  # stands in for an absent modality
        self.image_missing = Missing(self.image_dim)
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.neck, width = neck(dim, hidden, dropout)
        self.fc = nn.Linear(width, self.num_classes)

    def forward_features(self, batch: Batch) -> Tensor:
        t, t_attn = self.text_pool(batch)  # (B, Dt)
        i, i_attn = self.image_pool(batch)  # (B, Di)
        if t_attn is not None:
            self.expose("text", *t_attn)
        if i_attn is not None:
            self.expose("image", *i_attn)
        t = self.text_missing(t, batch.present("text"))
        i = self.image_missing(i, batch.present("image"))
        t1 = torch.cat([t, t.new_ones(t.shape[0], 1)], dim=-1)  # (B, Dt+1)
        i1 = torch.cat([i, i.new_ones(i.shape[0], 1)], dim=-1)  # (B, Di+1)
        f_t = torch.einsum("bx,rxd->brd", t1, self.text_factor)  # (B, r, d)
        f_i = torch.einsum("bx,rxd->brd", i1, self.image_factor)  # (B, r, d)
        return torch.einsum("r,brd->bd", self.rank_weights, f_t * f_i)  # (B, d)
