"""``hanet``: two-stream hybrid attention network (Chen et al. 2021, Amazon)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.heads.base import FusionHead, check_choice, check_dropout, check_int, check_layer
from fusion.heads.layers import Pool, masked_softmax, neck
from fusion.heads.registry import register_head

__all__ = ["HANetHead"]

MODES = ("hybrid", "keyless", "keybased")
HYBRIDS = ("joint", "paper")


def _d_net(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """A hybrid network D: one hidden layer (the paper's N = 1)."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, outputs))


def _zero_absent(x: Tensor, ok: Tensor | None) -> Tensor:
    return x if ok is None else torch.where(ok.to(x.device)[:, None], x, torch.zeros_like(x))


@register_head("hanet")
class HANetHead(FusionHead):
    """Per-sample attention over the two streams, scored by keyless and key-based attention.

        v_t = P_t t,  v_i = P_i i                          (B, d)   t, i: pooled streams
        s_l = [w_t.v_t + b_t, w_i.v_i + b_i]               (B, 2)   keyless (intra-modal)
        s_b = [k_t.q_i, k_i.q_t] / sqrt(d_k)               (B, 2)   key-based (inter-modal)
        alpha = softmax(D([s_l; s_b]))                     (B, 2)   D: one hidden layer
        f = [alpha_t v_t ; alpha_i v_i]                    (B, 2d)  fuse="concat" (default)
        f = alpha_t v_t + alpha_i v_i                      (B, d)   fuse="sum"
        f -> Dropout -> [Linear -> GELU -> Dropout] -> Linear -> K  (fc_hidden=0: linear)

    The paper gives the weighted stream features wf_t = s_t v_t, wf_i = s_i v_i (eqs. 1, 4, 6)
    and compares HANet with a network that "naively concatenates text and image features";
    keeping the weighted streams side by side (``fuse="concat"``) makes HANet that baseline
    plus per-sample stream attention, with the same classification layers. ``fuse="sum"``
    (a convex combination) is the variant public write-ups describe; on complementary
    modalities it throws away the down-weighted stream (see docs/heads.md).
    ``mode="keyless"``/``"keybased"`` feed D only s_l / s_b (the paper's ablations).

    ``hybrid="paper"`` is the paper's eqs. 3, 5 and 7 as written: each score pair is softmaxed
    over the two streams first, and one network per stream maps that stream's two weights to its
    weight (no softmax after D); the ablation modes use the softmax weights with no D at all:

        s_l = softmax([w_t.v_t + b_t, w_i.v_i + b_i]),  s_b = softmax(s_b raw)   (B, 2) each
        alpha_t = D_t([s_l,t ; s_b,t]),  alpha_i = D_i([s_l,i ; s_b,i])           (B,) each

    A stream an item lacks gets weight 0 (the softmax runs over the streams it has; eq. 7's
    weights are multiplied by presence) and its pooled vector is zeroed before the scores, so
    the other stream's key-based score never reads the absent stream's stored values (a learned
    vector would get no gradient: its stream's weight is 0).
    """

    needs = frozenset({"text_pooled", "text_tokens", "text_mask", "image_pooled", "image_regions"})

    def __init__(
        self,
        *,
        pool: str = "pooled",
        layer: int = -1,
        dim: int = 256,
        key_dim: int = 64,
        hidden: int = 32,
        dropout: float = 0.1,
        mode: str = "hybrid",
        fuse: str = "concat",
        fc_hidden: int = 256,
        hybrid: str = "joint",
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        check_int(self.label, dim=dim, key_dim=key_dim, hidden=hidden)
        check_dropout(self.label, dropout)
        check_choice(self.label, "mode", mode, MODES)
        check_choice(self.label, "fuse", fuse, ("concat", "sum"))
        check_int(self.label, 0, fc_hidden=fc_hidden)
        check_choice(self.label, "hybrid", hybrid, HYBRIDS)
        self.fuse, self.hybrid_form = fuse, hybrid
        if pool != "pooled":
            check_layer(self.label, layer, self.text_layers)
        self.mode = mode
        self.text_pool = Pool("text", self.text_dim, pool, layer, self.label)
        self.image_pool = Pool("image", self.image_dim, pool, -1, self.label)
        self.needs = self.text_pool.needs | self.image_pool.needs
        self.text_proj = nn.Linear(self.text_dim, dim)
        self.image_proj = nn.Linear(self.image_dim, dim)
        if mode != "keybased":
            self.text_keyless = nn.Linear(dim, 1)
            self.image_keyless = nn.Linear(dim, 1)
        if mode != "keyless":
            self.text_key = nn.Linear(dim, key_dim, bias=False)
            self.text_query = nn.Linear(dim, key_dim, bias=False)
            self.image_key = nn.Linear(dim, key_dim, bias=False)
            self.image_query = nn.Linear(dim, key_dim, bias=False)
        if hybrid == "joint":
            # D sees the raw scores; the only softmax is the one over the two streams after it.
            self.hybrid = _d_net(4 if mode == "hybrid" else 2, hidden, 2)
        elif mode == "hybrid":
            # eq. 7: one D per stream, on that stream's two softmax weights.
            self.hybrid_text = _d_net(2, hidden, 1)
            self.hybrid_image = _d_net(2, hidden, 1)
        self.neck, width = neck(2 * dim if fuse == "concat" else dim, fc_hidden, dropout)
        self.fc = nn.Linear(width, self.num_classes)

    def scores(self, v_t: Tensor, v_i: Tensor) -> Tensor:
        """The raw scores D sees: (B, 4) [s_l; s_b], or (B, 2) in an ablation mode."""
        parts = []
        if self.mode != "keybased":
            parts.append(torch.cat([self.text_keyless(v_t), self.image_keyless(v_i)], dim=-1))
        if self.mode != "keyless":
            k_t, q_t = self.text_key(v_t), self.text_query(v_t)  # (B, d_k)
            k_i, q_i = self.image_key(v_i), self.image_query(v_i)
            s_b = torch.stack([(k_t * q_i).sum(-1), (k_i * q_t).sum(-1)], dim=-1)
            parts.append(s_b / k_t.shape[-1] ** 0.5)
        return torch.cat(parts, dim=-1)

    def paper_weights(self, scores: Tensor, valid: Tensor | None = None) -> Tensor:
        """eqs. 3, 5, 7: softmax each score pair over the streams, then D_t / D_i per stream
        (hybrid mode) or the softmax weights themselves (keyless / keybased: no D)."""
        everywhere = (torch.ones(scores.shape[0], 2, dtype=torch.bool, device=scores.device)
                      if valid is None else valid)
        pairs = [masked_softmax(pair, valid) for pair in scores.split(2, dim=-1)]  # (B, 2) each
        names = {"hybrid": ("keyless", "keybased"), "keyless": ("keyless",),
                 "keybased": ("keybased",)}[self.mode]
        for name, pair in zip(names, pairs, strict=True):
            self.expose(name, pair, everywhere)
        if self.mode != "hybrid":
            return pairs[0]
        s_l, s_b = pairs
        alpha = torch.cat([self.hybrid_text(torch.stack([s_l[:, 0], s_b[:, 0]], dim=-1)),
                           self.hybrid_image(torch.stack([s_l[:, 1], s_b[:, 1]], dim=-1))], dim=-1)
        return alpha if valid is None else alpha * valid.to(alpha.dtype)

    def forward_features(self, batch: Batch) -> Tensor:
        t, t_attn = self.text_pool(batch)  # (B, Dt)
        i, i_attn = self.image_pool(batch)  # (B, Di)
        if t_attn is not None:
            self.expose("text", *t_attn)
        if i_attn is not None:
            self.expose("image", *i_attn)
        t_ok, i_ok = batch.present("text"), batch.present("image")
        t, i = _zero_absent(t, t_ok), _zero_absent(i, i_ok)
        v_t, v_i = self.text_proj(t), self.image_proj(i)  # (B, d) each
        valid = None  # (B, 2): the streams each item has
        if t_ok is not None or i_ok is not None:
            ones = torch.ones(v_t.shape[0], dtype=torch.bool, device=v_t.device)
            valid = torch.stack([ones if t_ok is None else t_ok.to(v_t.device),
                                 ones if i_ok is None else i_ok.to(v_t.device)], dim=-1)
        if self.hybrid_form == "joint":
            alpha = masked_softmax(self.hybrid(self.scores(v_t, v_i)), valid)  # (B, 2)
            self.expose("streams", alpha, torch.ones_like(alpha, dtype=torch.bool)
                        if valid is None else valid)
        else:
            alpha = self.paper_weights(self.scores(v_t, v_i), valid)
            self.internals["streams"] = alpha.detach()
        self.internals.update(v_text=v_t.detach(), v_image=v_i.detach())
        if self.fuse == "concat":
            return torch.cat([alpha[:, :1] * v_t, alpha[:, 1:] * v_i], dim=-1)  # (B, 2d)
        return alpha[:, :1] * v_t + alpha[:, 1:] * v_i  # (B, d)
