"""``gated-xattn``: MIC (Chen et al. 2021, Rakuten) text self-attention plus a gated
cross-attention to the image patches, the gate following JAVE (Zhu et al. 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.heads.base import FusionHead, check_choice, check_dropout, check_int, check_layer
from fusion.heads.layers import (
    MaskedAttention,
    image_patches,
    patch_mask,
    present_mask,
    require,
    text_layer,
)
from fusion.heads.registry import register_head

__all__ = ["GatedCrossAttentionHead"]


def _weights_without_empty(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """Weights saved before the ``empty`` token existed load with it at its initial value
    (zeros), so older run directories stay usable for ``--init``."""
    key = prefix + "empty"
    if key not in state_dict:
        state_dict[key] = torch.zeros_like(module.empty)


@register_head("gated-xattn")
class GatedCrossAttentionHead(FusionHead):
    """h'_i = SA(h, h, h)_i + g_i * SA(h, v, v)_i,  g_i = sigmoid(W1 h_i + W2 v_0 + b).

    h (B, T, Dt): one cached text layer with its mask; v (B, P, Di): image patch tokens (the
    prefix is excluded from the keys/values); v_0: the CLS token ``image_regions[:, 0]`` when
    ``image_prefix > 0``, else ``image_pooled`` (JAVE's global image vector). The gate is a scalar
    per token. Pooling is a masked sum over valid tokens (``reduce="mean"`` divides by the
    length), then Dropout -> Linear -> K.

    An empty text (no valid token) is read as one learned token ``empty`` (B-rows of length 0
    get it at position 0), so the image still reaches its output through the cross-attention
    and the gate; rows with text are exactly the paper's form. An item without its text (see
    ``batch.text_present``) is read the same way; one without its image has no cross-attention
    keys (the cross term is 0: the text's self-attention alone).
    """

    needs = frozenset({"text_tokens", "text_mask", "image_regions", "image_pooled"})

    def __init__(
        self,
        *,
        layer: int = -1,
        dim: int = 256,
        heads: int = 1,
        reduce: str = "sum",
        dropout: float = 0.1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        check_int(self.label, dim=dim, heads=heads)
        check_dropout(self.label, dropout)
        check_choice(self.label, "reduce", reduce, ("sum", "mean"))
        check_layer(self.label, layer, self.text_layers)
        self.layer, self.reduce = layer, reduce
        self.self_attn = MaskedAttention(self.text_dim, self.text_dim, dim, heads)
        self.cross_attn = MaskedAttention(self.text_dim, self.image_dim, dim, heads)
        self.gate_text = nn.Linear(self.text_dim, 1)  # W1 h_i + b
        self.gate_image = nn.Linear(self.image_dim, 1, bias=False)  # W2 v_0
        self.empty = nn.Parameter(torch.zeros(self.text_dim))  # the token of an empty text
        self.register_load_state_dict_pre_hook(_weights_without_empty)
        self.neck = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, self.num_classes)  # W3

    def global_image(self, batch: Batch) -> Tensor:
        """v_0 (B, Di): CLS when the regions have a prefix, else the pooled image vector."""
        if batch.image_prefix > 0 and batch.image_mask is None:
            return require(batch, "image_regions", self.label)[:, 0]
        return require(batch, "image_pooled", self.label)

    def text(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """h (B, T, Dt) and its mask, an empty text replaced by the one token ``empty``."""
        h, mask = text_layer(batch, self.layer, self.label)  # (B, T, Dt), (B, T)
        mask = present_mask(batch, "text", mask)  # an absent text has no valid token
        if h.shape[1] == 0:  # a batch of empty texts padded to no position at all
            h, mask = h.new_zeros(h.shape[0], 1, h.shape[2]), mask.new_zeros(mask.shape[0], 1)
        blank = ~mask.any(dim=1)  # (B,) rows with no valid token
        if not bool(blank.any()):
            return h, mask
        first = torch.zeros_like(mask)
        first[:, 0] = blank
        h = torch.where(first[..., None], self.empty.to(h.dtype), h)
        return h, mask | first

    def forward_features(self, batch: Batch) -> Tensor:
        h, mask = self.text(batch)  # (B, T, Dt), (B, T)
        v = image_patches(batch, self.label)  # (B, P, Di)
        self_out, self_w = self.self_attn(h, h, key_mask=mask, query_mask=mask)  # (B, T, d)
        i_ok = batch.present("image")  # no image: no key to attend to, the cross term is 0
        keys = None if i_ok is None else i_ok.to(v.device)[:, None].expand(v.shape[:2])
        pm = patch_mask(batch)  # galleries: only the regions of real, readable images
        if pm is not None:
            keys = pm if keys is None else keys & pm
        cross_out, cross_w = self.cross_attn(h, v, key_mask=keys, query_mask=mask)  # (B, T, d)
        gate = torch.sigmoid(
            self.gate_text(h) + self.gate_image(self.global_image(batch))[:, None]
        )  # (B, T, 1)
        fused = self_out + gate * cross_out  # (B, T, d)
        m = mask.unsqueeze(-1).to(fused.dtype)
        pooled = (fused * m).sum(dim=1)  # (B, d), pads excluded
        if self.reduce == "mean":
            pooled = pooled / m.sum(dim=1).clamp(min=1.0)
        self.expose("self", self_w, mask[:, None, :, None] & mask[:, None, None, :])
        valid = mask[:, None, :, None]
        self.expose("cross", cross_w, valid if keys is None else valid & keys[:, None, None, :])
        self.internals["gate"] = (gate.squeeze(-1) * m.squeeze(-1)).detach()  # (B, T)
        return pooled
