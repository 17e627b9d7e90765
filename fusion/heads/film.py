"""``film``: FiLM (Perez et al. 2018): the text predicts a feature-wise scale and shift for
every block over the image regions, which are then pooled."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.heads.base import FusionHead, check_choice, check_dropout, check_int, check_layer
from fusion.heads.layers import Missing, Pool, image_patches, masked_mean, neck, patch_mask
from fusion.heads.registry import register_head

__all__ = ["FiLMBlock", "FiLMHead"]


class FiLMBlock(nn.Module):
    """x + ReLU((1 + gamma) * LN(W x) + beta): Perez et al.'s residual block, with a
    per-region linear map for the convolution (regions are a set, not a grid) and a
    LayerNorm without its own affine for the BatchNorm (FiLM supplies the affine)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        """x (B, N, d), gamma / beta (B, d) -> (B, N, d)."""
        return x + torch.relu((1 + gamma[:, None]) * self.norm(self.linear(x)) + beta[:, None])


@register_head("film")
class FiLMHead(FusionHead):
    """Text-conditioned feature-wise modulation of the image regions, then pooling.

        t = pool(text)                                     (B, Dt)
        x_0 = ReLU(W_0 I),  I = image_regions[:, p:]       (B, N, d)
        gamma_k, beta_k = G_k t                            (B, d) each, k = 1..blocks
        x_k = x_{k-1} + ReLU((1 + gamma_k) LN(W_k x_{k-1}) + beta_k)
        f = mean_n x_K  (reduce="max": max_n)              (B, d) -> MLP -> K

    gamma is predicted as a deviation from 1, so an untrained generator leaves the regions
    unmodulated (Perez et al. note the same parametrisation). The text enters only through
    gamma and beta, as in the paper.
    """

    needs = frozenset({"text_pooled", "text_tokens", "text_mask", "image_regions"})

    def __init__(
        self,
        *,
        pool: str = "pooled",
        layer: int = -1,
        dim: int = 128,
        blocks: int = 2,
        reduce: str = "mean",
        hidden: int = 128,
        dropout: float = 0.1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        check_int(self.label, dim=dim, blocks=blocks)
        check_int(self.label, 0, hidden=hidden)
        check_dropout(self.label, dropout)
        check_choice(self.label, "reduce", reduce, ("mean", "max"))
        if pool != "pooled":
            check_layer(self.label, layer, self.text_layers)
        self.reduce = reduce
        self.text_pool = Pool("text", self.text_dim, pool, layer, self.label)
        self.needs = self.text_pool.needs | {"image_regions"}
        self.stem = nn.Sequential(nn.Linear(self.image_dim, dim), nn.ReLU())
        self.film = nn.Linear(self.text_dim, 2 * dim * blocks)  # all the (gamma, beta) pairs
        self.blocks = nn.ModuleList(FiLMBlock(dim) for _ in range(blocks))
        # absent text: a learned text vector; absent image: every region a learned region, so
        # the text still reaches the output through gamma and beta
        self.text_missing = Missing(self.text_dim)
        self.image_missing = Missing(self.image_dim)
        self.neck, width = neck(dim, hidden, dropout)
        self.fc = nn.Linear(width, self.num_classes)

    def forward_features(self, batch: Batch) -> Tensor:
        t, t_attn = self.text_pool(batch)  # (B, Dt)
        if t_attn is not None:
            self.expose("text", *t_attn)
        t = self.text_missing(t, batch.present("text"))
        regions = self.image_missing(image_patches(batch, self.label), batch.present("image"))
        x = self.stem(regions)  # (B, N, d)
        params = self.film(t).view(t.shape[0], len(self.blocks), 2, -1)  # (B, blocks, 2, d)
        for k, block in enumerate(self.blocks):
            x = block(x, params[:, k, 0], params[:, k, 1])
        self.internals["gamma"] = (1 + params[:, :, 0]).detach()  # (B, blocks, d)
        self.internals["beta"] = params[:, :, 1].detach()
        pm = patch_mask(batch)  # galleries: only the regions of real, readable images
        if self.reduce == "mean":
            return masked_mean(x, pm)  # (B, d)
        if pm is not None:
            x = x.masked_fill(~pm[..., None], torch.finfo(x.dtype).min)
        return x.amax(dim=1)  # (B, d)
