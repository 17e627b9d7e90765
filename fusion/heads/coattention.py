"""``coattention``: Chordia & Kumar 2020 (scalar mix + BiLSTM) with Lu et al. 2016 parallel
co-attention, rebuilt from the papers with the reference code's defects fixed (docs/heads.md)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fusion.batch import Batch
from fusion.errors import HeadError
from fusion.heads.base import FusionHead, check_dropout, check_int, check_layer
from fusion.heads.layers import (
    Missing,
    ScalarMix,
    image_patches,
    masked_softmax,
    neck,
    patch_mask,
    present_mask,
    require,
)
from fusion.heads.registry import register_head

__all__ = ["ONE_LAYER", "CoAttentionHead", "MaskedBiLSTM"]

ONE_LAYER = (
    "coattention: the text set caches 1 layer, so the scalar mix is the paper's 'without "
    "weighted layers' ablation; extract the text with --layers all (or -4,-3,-2,-1) to mix layers"
)


class MaskedBiLSTM(nn.Module):
    """Bidirectional LSTM over the valid (right-padded) prefix of each row.

    Packed, so a row's outputs do not depend on its padding or on the other rows; outputs at pad
    positions are exactly 0. Zero-length rows are run with length 1 (packing refuses 0) and then
    zeroed, so they come out all-zero too.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_dim, out_dim // 2, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, D), mask (B, T) right-padded -> (B, T, out_dim)."""
        lengths = mask.sum(dim=1)  # (B,)
        prefix = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
        if not torch.equal(prefix, mask):
            raise HeadError(
                "coattention's BiLSTM needs right-padded text (valid tokens first, then padding); "
                "the batch's text_mask has gaps"
            )
        packed = pack_padded_sequence(
            x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out * mask.unsqueeze(-1).to(out.dtype)


@register_head("coattention")
class CoAttentionHead(FusionHead):
    """Scalar mix -> masked BiLSTM -> parallel co-attention -> [t^; i^] -> tanh MLP -> K.

    T (B, S, h) text states, I (B, N, Di) image patch tokens (the CLS/register prefix is left
    out: co-attention is over spatial positions):

        C   = tanh(T W_b I^T)                 (B, S, N), pad rows set to 0
        H_i = tanh(I W_v + C^T (T W_q))       (B, N, k)
        H_t = tanh(T W_q + C (I W_v))         (B, S, k)
        a_i = softmax_N(H_i w_i),  a_t = masked_softmax_S(H_t w_t)
        i^  = sum_n a_i,n I_n,     t^  = sum_s a_t,s T_s

    An item without its text has no valid text state (C is 0, so the image attention reads
    the image alone) and t^ is a learned vector; without its image, C is 0 (the text attention
    reads the text alone) and i^ is a learned vector.
    """

    needs = frozenset({"text_tokens", "text_mask", "image_regions"})

    def __init__(
        self,
        *,
        lstm_dim: int = 256,
        attn_dim: int = 128,
        hidden: int = 256,
        dropout: float = 0.1,
        mix: bool = True,
        lstm: bool = True,
        layer: int = -1,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        check_int(self.label, 2, lstm_dim=lstm_dim)
        check_int(self.label, attn_dim=attn_dim, hidden=hidden)
        check_dropout(self.label, dropout)
        if lstm_dim % 2:
            raise HeadError(f"lstm_dim={lstm_dim} must be even (two directions of lstm_dim/2)")
        if not mix:
            check_layer(self.label, layer, self.text_layers)
        elif self.text_layers == 1:
            warnings.warn(ONE_LAYER, UserWarning, stacklevel=2)
        self.layer = layer
        # mix=False / lstm=False are the paper's "without weighted layers" / "without BiLSTM"
        # ablations (last layer only / a linear layer instead of the BiLSTM).
        self.mix = ScalarMix(self.text_layers) if mix else None
        self.encoder: nn.Module = (
            MaskedBiLSTM(self.text_dim, lstm_dim) if lstm else nn.Linear(self.text_dim, lstm_dim)
        )
        self.w_b = nn.Parameter(torch.empty(lstm_dim, self.image_dim))  # rectangular bilinear map
        nn.init.xavier_uniform_(self.w_b)
        self.w_q = nn.Linear(lstm_dim, attn_dim)
        self.w_v = nn.Linear(self.image_dim, attn_dim)
        self.h_drop = nn.Dropout(dropout)  # Lu et al. apply dropout to H before scoring
        # No bias on the scoring vectors: softmax is shift-invariant, a bias would never train.
        self.score_t = nn.Linear(attn_dim, 1, bias=False)
        self.score_i = nn.Linear(attn_dim, 1, bias=False)
        self.text_missing = Missing(lstm_dim)  # t^ of an item without text
        self.image_missing = Missing(self.image_dim)  # i^ of an item without image
        self.neck, width = neck(lstm_dim + self.image_dim, hidden, dropout, act=nn.Tanh)
        self.fc = nn.Linear(width, self.num_classes)

    def encode_text(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """-> T (B, S, lstm_dim) with exact zeros at pads, mask (B, S)."""
        tokens = require(batch, "text_tokens", self.label)  # (B, S, L, Dt)
        mask = present_mask(batch, "text", require(batch, "text_mask", self.label).bool())
        x = self.mix(tokens) if self.mix is not None else tokens[:, :, self.layer]
        if isinstance(self.encoder, MaskedBiLSTM):
            return self.encoder(x, mask), mask
        return self.encoder(x) * mask.unsqueeze(-1).to(x.dtype), mask

    def forward_features(self, batch: Batch) -> Tensor:
        text, mask = self.encode_text(batch)  # (B, S, h), (B, S)
        image = image_patches(batch, self.label)  # (B, N, Di)
        affinity = torch.tanh(text @ self.w_b @ image.transpose(1, 2))  # (B, S, N)
        affinity = affinity * mask.unsqueeze(-1).to(affinity.dtype)
        pm = patch_mask(batch)  # galleries: only the regions of real, readable images
        if pm is not None:
            affinity = affinity * pm[:, None, :].to(affinity.dtype)
        i_ok = batch.present("image")
        if i_ok is not None:  # no image: no affinity, the text attention reads the text alone
            affinity = affinity * i_ok.to(affinity.dtype)[:, None, None]
        tq = self.w_q(text)  # (B, S, k)
        iv = self.w_v(image)  # (B, N, k)
        h_i = torch.tanh(iv + affinity.transpose(1, 2) @ tq)  # (B, N, k)
        h_t = torch.tanh(tq + affinity @ iv)  # (B, S, k)
        a_i = masked_softmax(self.score_i(self.h_drop(h_i)).squeeze(-1), pm)  # (B, N)
        a_t = masked_softmax(self.score_t(self.h_drop(h_t)).squeeze(-1), mask)  # (B, S)
        image_vec = torch.einsum("bn,bnd->bd", a_i, image)  # (B, Di)
        text_vec = torch.einsum("bs,bsh->bh", a_t, text)  # (B, h)
        text_vec = self.text_missing(text_vec, batch.present("text"))
        image_vec = self.image_missing(image_vec, i_ok)
        self.expose("text", a_t, mask)
        self.expose("image", a_i, torch.ones_like(a_i, dtype=torch.bool) if pm is None else pm)
        self.internals["affinity"] = affinity.detach()
        return torch.cat([text_vec, image_vec], dim=-1)  # (B, h + Di)
