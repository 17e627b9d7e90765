"""``mlb``: multimodal low-rank bilinear pooling with attention over the image regions
(Kim et al. 2017, "Hadamard product for low-rank bilinear pooling")."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.heads.base import FusionHead, check_dropout, check_int, check_layer
from fusion.heads.layers import Missing, Pool, image_patches, masked_softmax, neck, patch_mask
from fusion.heads.registry import register_head

__all__ = ["MLBHead"]


@register_head("mlb")
class MLBHead(FusionHead):
    """MLB attention (G glimpses) then MLB fusion, with tanh on both sides of each product.

        q = pool(text)                                            (B, Dt)
        F = image_regions[:, p:]                                  (B, N, Di)
        a_g = softmax_N(P_g^T (tanh(V F_n) * tanh(U q)))          (B, G, N)  G = glimpses
        v_g = sum_n a_g,n F_n                                     (B, G, Di)
        f = tanh(W_v [v_1; ...; v_G]) * tanh(W_q q)               (B, d)     -> MLP -> K

    The Hadamard product of two linear maps is a rank-d bilinear form q^T W F (eq. 3 of the
    paper); tanh keeps each factor bounded (their best variant). Dropout precedes every
    linear map on the inputs, as in the paper's code.
    """

    needs = frozenset({"text_pooled", "text_tokens", "text_mask", "image_regions"})

    def __init__(
        self,
        *,
        pool: str = "pooled",
        layer: int = -1,
        dim: int = 128,
        attn_dim: int = 64,
        glimpses: int = 2,
        hidden: int = 0,
        dropout: float = 0.1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        check_int(self.label, dim=dim, attn_dim=attn_dim, glimpses=glimpses)
        check_int(self.label, 0, hidden=hidden)
        check_dropout(self.label, dropout)
        if pool != "pooled":
            check_layer(self.label, layer, self.text_layers)
        self.text_pool = Pool("text", self.text_dim, pool, layer, self.label)
        self.needs = self.text_pool.needs | {"image_regions"}
        self.drop = nn.Dropout(dropout)
        self.attn_image = nn.Linear(self.image_dim, attn_dim)  # V
        self.attn_text = nn.Linear(self.text_dim, attn_dim)  # U
        # P: no bias, a constant added to every region's score cancels in the softmax.
        self.attn_score = nn.Linear(attn_dim, glimpses, bias=False)
        self.fuse_image = nn.Linear(glimpses * self.image_dim, dim)  # W_v
        self.fuse_text = nn.Linear(self.text_dim, dim)  # W_q
        # absent text: a learned text vector; absent image: every region a learned region
        self.text_missing = Missing(self.text_dim)
        self.image_missing = Missing(self.image_dim)
        self.neck, width = neck(dim, hidden, dropout)
        self.fc = nn.Linear(width, self.num_classes)

    def forward_features(self, batch: Batch) -> Tensor:
        q, t_attn = self.text_pool(batch)  # (B, Dt)
        if t_attn is not None:
            self.expose("text", *t_attn)
        q = self.text_missing(q, batch.present("text"))
        regions = self.image_missing(image_patches(batch, self.label), batch.present("image"))
        joint = torch.tanh(self.attn_image(self.drop(regions))) * torch.tanh(
            self.attn_text(self.drop(q))
        )[:, None]  # (B, N, a)
        pm = patch_mask(batch)  # galleries: only the regions of real, readable images
        a = masked_softmax(self.attn_score(joint), None if pm is None else pm[..., None],
                           dim=1).transpose(1, 2)  # (B, G, N)
        self.expose("image", a, torch.ones_like(a, dtype=torch.bool) if pm is None
                    else pm[:, None].expand_as(a))
        glimpses = torch.einsum("bgn,bnd->bgd", a, regions).flatten(1)  # (B, G*Di)
        return torch.tanh(self.fuse_image(self.drop(glimpses))) * torch.tanh(
            self.fuse_text(self.drop(q))
        )  # (B, d)
