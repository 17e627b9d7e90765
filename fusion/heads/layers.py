"""Masked building blocks shared by the heads (and meant for user heads too).

Every reduction over tokens takes the padding mask, so pad content never reaches the output and
a zero-length text gives zero weights and a zero vector instead of NaN. An absent modality
(``batch.text_present`` / ``image_present`` False, docs/heads.md "Missing modalities") is masked
the same way (:func:`present_mask`) and its vector replaced by a learned one (:class:`Missing`),
so its stored values never reach the output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.errors import HeadError

__all__ = [
    "POOLS",
    "AttentionPool",
    "MaskedAttention",
    "Missing",
    "Pool",
    "present_mask",
    "ScalarMix",
    "image_patches",
    "patch_mask",
    "masked_mean",
    "masked_softmax",
    "neck",
    "require",
    "text_layer",
]

POOLS = ("pooled", "mean", "attention")


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax of ``scores`` over ``dim`` restricted to ``mask``; 0 on masked entries.

    Masked scores are filled with the dtype's most negative *finite* value rather than -inf, so a
    row with no valid entry is uniform before the final multiplication by the mask and comes out
    all-zero, with finite gradients (a -inf fill gives NaN there, forward and backward).
    """
    if mask is None:
        return torch.softmax(scores, dim=dim)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``x`` (B, T, D) over valid positions of ``mask`` (B, T) -> (B, D); 0 if none."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def neck(in_dim: int, hidden: int, dropout: float, act: type[nn.Module] = nn.GELU):
    """The layers between a fused vector and the final linear: (module, its output width).

    ``hidden > 0``: Dropout -> Linear(in_dim, hidden) -> act -> Dropout; ``hidden=0``: Dropout.
    """
    if hidden <= 0:
        return nn.Dropout(dropout), in_dim
    layers = [nn.Dropout(dropout), nn.Linear(in_dim, hidden), act(), nn.Dropout(dropout)]
    return nn.Sequential(*layers), hidden


def present_mask(batch: Batch, modality: str, mask: Tensor | None = None) -> Tensor | None:
    """``mask`` (B, T) with the rows that lack ``modality`` switched off, or, without ``mask``,
    the (B,) presence itself; None when every row has the modality and there is no mask."""
    ok = batch.present(modality)
    if mask is None or ok is None:
        return ok if mask is None else mask
    return mask & ok.to(mask.device)[:, None]


def _missing_weights_default(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Weights saved before missing embeddings existed load with them at their initial value
    (zeros), so older run directories and bundles stay usable."""
    if prefix + "value" not in state_dict:
        state_dict[prefix + "value"] = torch.zeros_like(module.value)


class Missing(nn.Module):
    """A learned vector (zeros at first) standing in for an absent modality's vector.

    ``forward(x, present)``: x (B, D) or (B, N, D); rows where ``present`` (B,) is False become
    ``value`` (broadcast over N), whatever x held there. ``present=None`` returns x unchanged.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(dim))
        self.register_load_state_dict_pre_hook(_missing_weights_default)

    def forward(self, x: Tensor, present: Tensor | None) -> Tensor:
        if present is None:
            return x
        keep = present.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(keep, x, self.value.to(x.dtype))


def require(batch: Batch, field: str, head: str) -> Tensor:
    """``batch.<field>`` or a HeadError saying which head needed it."""
    value = getattr(batch, field)
    if value is None:
        raise HeadError(
            f"head '{head}' needs batch.{field} but it is None; train with a feature set of that "
            "modality, or let the loader read the fields listed in the head's `needs`"
        )
    return value


def text_layer(batch: Batch, layer: int, head: str) -> tuple[Tensor, Tensor]:
    """One cached layer of the text tokens (B, T, Dt) and the mask (B, T) bool."""
    tokens = require(batch, "text_tokens", head)  # (B, T, L, Dt)
    mask = require(batch, "text_mask", head).bool()  # (B, T)
    n_layers = tokens.shape[2]
    if not -n_layers <= layer < n_layers:
        raise HeadError(
            f"head '{head}' uses text layer {layer} but the batch has {n_layers} cached layer(s); "
            f"pass layer= in [-{n_layers}, {n_layers - 1}]"
        )
    return tokens[:, :, layer], mask


def image_patches(batch: Batch, head: str) -> Tensor:
    """Image regions after the CLS/register prefix: (B, P, Di)."""
    regions = require(batch, "image_regions", head)  # (B, R, Di)
    if regions.shape[1] <= batch.image_prefix:
        raise HeadError(
            f"head '{head}' attends over image patches but image_regions has {regions.shape[1]} "
            f"row(s) and image_prefix={batch.image_prefix}: no patch tokens are left; use a "
            "feature set with spatial regions"
        )
    return regions[:, batch.image_prefix :]


def patch_mask(batch: Batch) -> Tensor | None:
    """(B, P) bool over :func:`image_patches`: False on a gallery's padding images and failed
    images (``batch.image_mask``); None for one-image batches (every patch valid). A row with
    no valid patch at all (an item without a readable image, which the heads already treat
    as absent through ``image_present``) is all True, so it is read as before: zeros."""
    if batch.image_mask is None:
        return None
    mask = batch.image_mask[:, batch.image_prefix :].bool()
    return mask | ~mask.any(dim=1, keepdim=True)


class AttentionPool(nn.Module):
    """Keyless attention pooling (Long et al. 2018): e_k = w^T tanh(W a_k + b), softmax, sum.

    The scoring vector has no bias: softmax is shift-invariant, so a bias would never train.
    """

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (B, T, D), mask (B, T) -> pooled (B, D), weights (B, T)."""
        weights = masked_softmax(self.score(torch.tanh(self.proj(x))).squeeze(-1), mask)
        return torch.einsum("bt,btd->bd", weights, x), weights


class Pool(nn.Module):
    """Reduce one modality to one vector per item.

    ``pooled``: the store's pooled vector (CLS or masked mean, see the feature set's attrs).
    ``mean``: masked mean over text tokens / mean over image patch tokens (prefix excluded).
    ``attention``: masked keyless attention pooling over the same positions.
    """

    def __init__(self, modality: str, dim: int, mode: str, layer: int = -1, head: str = "") -> None:
        super().__init__()
        if mode not in POOLS:
            raise HeadError(f"pool={mode!r} is not one of {POOLS} (head '{head}')")
        self.modality, self.mode, self.layer, self.head = modality, mode, layer, head
        self.attn = AttentionPool(dim) if mode == "attention" else None

    @property
    def needs(self) -> frozenset[str]:
        if self.mode == "pooled":
            return frozenset({f"{self.modality}_pooled"})
        if self.modality == "text":
            return frozenset({"text_tokens", "text_mask"})
        return frozenset({"image_regions"})

    def forward(self, batch: Batch) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """-> vector (B, D) and, for attention pooling, (weights, valid_mask). Rows lacking the
        modality get no weight (their vector is for the head's :class:`Missing` to replace)."""
        if self.mode == "pooled":
            return require(batch, f"{self.modality}_pooled", self.head), None
        if self.modality == "text":
            x, mask = text_layer(batch, self.layer, self.head)
        else:
            x = image_patches(batch, self.head)
            mask = patch_mask(batch)  # galleries: padding and failed images masked out
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        mask = present_mask(batch, self.modality, mask)
        if self.attn is None:
            return masked_mean(x, mask), None
        pooled, weights = self.attn(x, mask)
        return pooled, (weights, mask)


class ScalarMix(nn.Module):
    """gamma * sum_j softmax(s)_j H_j over ALL cached layers (Peters et al. 2018).

    s starts at 0 (the layer mean) and gamma at 1. The Chordia & Kumar code zipped 13 hidden
    states against 12 unnormalised weights and so dropped the last layer; here the number of
    layers is checked on every call.
    """

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.scalars = nn.Parameter(torch.zeros(n_layers))
        self.gamma = nn.Parameter(torch.ones(1))

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, T, L, D) -> (B, T, D)."""
        if tokens.shape[2] != self.n_layers:
            raise HeadError(
                f"the scalar mix was built for text_layers={self.n_layers} but the batch has "
                f"{tokens.shape[2]} cached layer(s); create the head with "
                f"text_layers={tokens.shape[2]}"
            )
        weights = torch.softmax(self.scalars, dim=0).to(tokens.dtype)  # (L,)
        return self.gamma * torch.einsum("btld,l->btd", tokens, weights)


class MaskedAttention(nn.Module):
    """Multi-head scaled dot-product attention softmax(Q K^T / sqrt(d_k)) V with key masks.

    No output projection (MIC's SA has none). The key projection has no bias: q.(k + b) adds
    the same q.b to every key's score, which the softmax removes, so that bias would never train.
    """

    def __init__(self, q_dim: int, kv_dim: int, dim: int, heads: int = 1) -> None:
        super().__init__()
        if dim % heads:
            raise HeadError(f"dim={dim} is not divisible by heads={heads}; pick dim = k * heads")
        self.heads = heads
        self.q = nn.Linear(q_dim, dim)
        self.k = nn.Linear(kv_dim, dim, bias=False)
        self.v = nn.Linear(kv_dim, dim)

    def forward(
        self, x: Tensor, kv: Tensor, key_mask: Tensor | None, query_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """x (B, T, Dq), kv (B, S, Dk) -> out (B, T, dim), weights (B, H, T, S).

        Rows of pad queries get zero weights (their outputs are never pooled anyway).
        """
        b, t, _ = x.shape
        s = kv.shape[1]
        h = self.heads
        q = self.q(x).view(b, t, h, -1).transpose(1, 2)  # (B, H, T, dh)
        k = self.k(kv).view(b, s, h, -1).transpose(1, 2)  # (B, H, S, dh)
        v = self.v(kv).view(b, s, h, -1).transpose(1, 2)  # (B, H, S, dh)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, T, S)
        valid = torch.ones(b, 1, t, s, dtype=torch.bool, device=x.device)
        if key_mask is not None:
            valid = valid & key_mask[:, None, None, :]
        if query_mask is not None:
            valid = valid & query_mask[:, None, :, None]
        weights = masked_softmax(scores, valid)  # (B, H, T, S)
        out = (weights @ v).transpose(1, 2).reshape(b, t, -1)  # (B, T, dim)
        return out, weights
