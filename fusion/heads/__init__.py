"""Fusion heads: one registry, one contract (:class:`FusionHead`), one module per family.

Importing this package registers the built-in heads; ``list_heads()`` shows them together with
heads that installed packages advertise in the ``fusion.heads`` entry-point group.
"""

from fusion.heads.base import BATCH_FIELDS, FusionHead
from fusion.heads.coattention import CoAttentionHead, MaskedBiLSTM
from fusion.heads.film import FiLMBlock, FiLMHead
from fusion.heads.gated_xattn import GatedCrossAttentionHead
from fusion.heads.hanet import HANetHead
from fusion.heads.late import LateHead
from fusion.heads.layers import (
    POOLS,
    AttentionPool,
    MaskedAttention,
    Missing,
    Pool,
    ScalarMix,
    masked_mean,
    masked_softmax,
    present_mask,
)
from fusion.heads.lowrank import LowRankFusionHead
from fusion.heads.mlb import MLBHead
from fusion.heads.mult import CrossModalLayer, MulTHead
from fusion.heads.registry import (
    create_head,
    head_options,
    list_heads,
    register_head,
    resolve_head,
    spec_of,
)
from fusion.heads.shallow import AddHead, ConcatHead
from fusion.heads.tensor import TensorFusionHead
from fusion.heads.unimodal import ImageHead, TextHead

__all__ = [
    "BATCH_FIELDS",
    "POOLS",
    "AddHead",
    "AttentionPool",
    "CoAttentionHead",
    "ConcatHead",
    "CrossModalLayer",
    "FiLMBlock",
    "FiLMHead",
    "FusionHead",
    "GatedCrossAttentionHead",
    "HANetHead",
    "ImageHead",
    "LateHead",
    "LowRankFusionHead",
    "MLBHead",
    "MaskedAttention",
    "MaskedBiLSTM",
    "Missing",
    "MulTHead",
    "Pool",
    "ScalarMix",
    "TensorFusionHead",
    "TextHead",
    "create_head",
    "head_options",
    "list_heads",
    "masked_mean",
    "masked_softmax",
    "present_mask",
    "register_head",
    "resolve_head",
    "spec_of",
]
