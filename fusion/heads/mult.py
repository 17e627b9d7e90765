"""``mult``: a bidirectional cross-modal transformer in the style of MulT (Tsai et al. 2019):
text attends to the image regions and the regions to the text, several layers, masked."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.errors import HeadError
from fusion.heads.base import FusionHead, check_dropout, check_int, check_layer
from fusion.heads.layers import (
    MaskedAttention,
    Missing,
    image_patches,
    masked_mean,
    neck,
    patch_mask,
    present_mask,
    text_layer,
)
from fusion.heads.registry import register_head

__all__ = ["CrossModalLayer", "MulTHead"]


class CrossModalLayer(nn.Module):
    """One MulT crossmodal block, pre-LayerNorm:

        Z = Z + Dropout(W_o CM(LN(Z), LN(S)))       CM: multi-head attention, key-padding mask
        Z = Z + Dropout(FFN(LN(Z)))                 FFN: Linear(d, 4d) -> ReLU -> Linear(4d, d)

    The source S is the other modality's input sequence at every layer (MulT's low-level
    source), the target Z is refined layer after layer.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = (nn.LayerNorm(dim) for _ in range(3))
        self.attn = MaskedAttention(dim, dim, dim, heads)
        self.out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, z: Tensor, source: Tensor, key_mask: Tensor | None,
                query_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """z (B, T, d), source (B, S, d) -> (B, T, d), attention weights (B, H, T, S)."""
        attended, weights = self.attn(self.norm_q(z), self.norm_kv(source), key_mask=key_mask,
                                      query_mask=query_mask)
        z = z + self.drop(self.out(attended))
        return z + self.drop(self.ff(self.norm_ff(z))), weights


@register_head("mult")
class MulTHead(FusionHead):
    """Two crossmodal transformers (image -> text and text -> image), pooled with the masks.

        X_t = P_t text_tokens[:, :, layer]               (B, T, d)   m: text mask
        X_i = P_i image_regions[:, p:]                   (B, N, d)
        Z_t = CM_{i->t}^{layers}(X_t <- X_i)             (B, T, d)   text queries, region keys
        Z_i = CM_{t->i}^{layers}(X_i <- X_t, m)          (B, N, d)   region queries, text keys (masked)
        f = [masked_mean(LN(Z_t), m) ; mean_n LN(Z_i)]   (B, 2d)     -> MLP -> K

    MulT's temporal convolutions and positional embeddings are left out: the cached tokens
    are already contextual and the regions are a set. Its final self-attention over the
    concatenated streams is left out too (pooled then an MLP). An empty text gives Z_t's
    pooled half 0 and leaves the regions' half to their own residual path. An item without its
    text or image (``batch.*_present``) is masked out as keys of the other stream, and its own
    pooled half is a learned vector.
    """

    needs = frozenset({"text_tokens", "text_mask", "image_regions"})

    def __init__(
        self,
        *,
        layer: int = -1,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        hidden: int = 128,
        dropout: float = 0.1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        check_int(self.label, dim=dim, heads=heads, layers=layers)
        check_int(self.label, 0, hidden=hidden)
        check_dropout(self.label, dropout)
        check_layer(self.label, layer, self.text_layers)
        if dim % heads:
            raise HeadError(f"dim={dim} is not divisible by heads={heads}; pick dim = k * heads")
        self.layer = layer
        self.text_proj = nn.Linear(self.text_dim, dim)
        self.image_proj = nn.Linear(self.image_dim, dim)
        self.to_text = nn.ModuleList(CrossModalLayer(dim, heads, dropout) for _ in range(layers))
        self.to_image = nn.ModuleList(CrossModalLayer(dim, heads, dropout) for _ in range(layers))
        self.norm_t, self.norm_i = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.text_missing, self.image_missing = Missing(dim), Missing(dim)
        self.neck, width = neck(2 * dim, hidden, dropout)
        self.fc = nn.Linear(width, self.num_classes)

    def forward_features(self, batch: Batch) -> Tensor:
        h, mask = text_layer(batch, self.layer, self.label)  # (B, T, Dt), (B, T)
        mask = present_mask(batch, "text", mask)  # an absent text has no valid token
        x_t = self.text_proj(h)  # (B, T, d)
        x_i = self.image_proj(image_patches(batch, self.label))  # (B, N, d)
        i_ok = batch.present("image")
        keys_i = None if i_ok is None else i_ok.to(x_i.device)[:, None].expand(x_i.shape[:2])
        pm = patch_mask(batch)  # galleries: only the regions of real, readable images
        if pm is not None:
            keys_i = pm if keys_i is None else keys_i & pm
        z_t, z_i = x_t, x_i
        for k, (to_text, to_image) in enumerate(zip(self.to_text, self.to_image, strict=True)):
            z_t, w_t = to_text(z_t, x_i, key_mask=keys_i, query_mask=mask)
            z_i, w_i = to_image(z_i, x_t, key_mask=mask, query_mask=pm)
            self.expose(f"text_to_image{k}", w_t, mask[:, None, :, None] if keys_i is None
                        else mask[:, None, :, None] & keys_i[:, None, None, :])
            self.expose(f"image_to_text{k}", w_i, mask[:, None, None, :])
        text_vec = masked_mean(self.norm_t(z_t), mask)  # (B, d)
        image_vec = masked_mean(self.norm_i(z_i), pm)  # (B, d)
        text_vec = self.text_missing(text_vec, batch.present("text"))
        image_vec = self.image_missing(image_vec, i_ok)
        return torch.cat([text_vec, image_vec], dim=-1)  # (B, 2d)
