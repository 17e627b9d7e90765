"""``tensor``: Tensor Fusion Network (Zadeh et al. 2017), the outer product of [v_t; 1] and
[v_i; 1] on projected pooled vectors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.heads.base import FusionHead, check_dropout, check_int, check_layer
from fusion.heads.layers import Missing, Pool, neck
from fusion.heads.registry import register_head

__all__ = ["TensorFusionHead"]


@register_head("tensor")
class TensorFusionHead(FusionHead):
    """z = [v_t; 1] (x) [v_i; 1], flattened, -> MLP -> K.

        t = pool(text), i = pool(image)                  (B, Dt), (B, Di)
        v_t = ReLU(P_t t), v_i = ReLU(P_i i)             (B, d) each   (the modality subnetworks)
        z = vec([v_t; 1] [v_i; 1]^T)                     (B, (d+1)^2)  holds v_t, v_i, v_t v_i^T
        z -> Dropout -> Linear(., hidden) -> ReLU -> Dropout -> Linear -> K

    The constant 1 keeps the unimodal terms next to the bimodal interactions (the paper's
    eq. 1). The width grows as (d+1)^2, hence the small default ``dim``.
    """

    needs = frozenset({"text_pooled", "text_tokens", "text_mask", "image_pooled", "image_regions"})

    def __init__(
        self,
        *,
        pool: str = "pooled",
        layer: int = -1,
        dim: int = 32,
        hidden: int = 128,
        dropout: float = 0.1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        check_int(self.label, dim=dim)
        check_int(self.label, 0, hidden=hidden)
        check_dropout(self.label, dropout)
        if pool != "pooled":
            check_layer(self.label, layer, self.text_layers)
        self.text_pool = Pool("text", self.text_dim, pool, layer, self.label)
        self.image_pool = Pool("image", self.image_dim, pool, -1, self.label)
        self.needs = self.text_pool.needs | self.image_pool.needs
        self.text_proj = nn.Sequential(nn.Linear(self.text_dim, dim), nn.ReLU())
        self.image_proj = nn.Sequential(nn.Linear(self.image_dim, dim), nn.ReLU())
        self.text_missing = Missing(self.text_dim)  # stands in for an absent modality
        self.image_missing = Missing(self.image_dim)
        self.neck, width = neck((dim + 1) ** 2, hidden, dropout, act=nn.ReLU)
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
        v_t, v_i = self.text_proj(t), self.image_proj(i)  # (B, d) each
        one = v_t.new_ones(v_t.shape[0], 1)
        z = torch.einsum("bi,bj->bij", torch.cat([v_t, one], -1), torch.cat([v_i, one], -1))
        return z.flatten(1)  # (B, (d+1)^2)
