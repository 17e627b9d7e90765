"""A new head in a few lines: the Gated Multimodal Unit (Arevalo et al. 2017), checked.

Train it with ``fusion.train(store, head=GMUHead, ...)`` or ``fusion train --head
examples/custom_head.py:GMUHead``; run this file to see the property suite.
"""

import torch
from torch import nn

from fusion.checks import check_head
from fusion.heads import FusionHead, Missing, masked_mean


class GMUHead(FusionHead):
    """z = sigmoid(W_z [t; i]); f = z * tanh(W_t t) + (1 - z) * tanh(W_i i) -> Linear -> K."""

    needs = frozenset({"text_tokens", "text_mask", "image_pooled"})

    def __init__(self, *, dim: int = 128, **dims):  # dims: text_dim, image_dim, num_classes...
        super().__init__(**dims)
        self.text_proj = nn.Linear(self.text_dim, dim)
        self.image_proj = nn.Linear(self.image_dim, dim)
        self.gate = nn.Linear(self.text_dim + self.image_dim, dim)
        self.fc = nn.Linear(dim, self.num_classes)
        # an item without text or image (batch.text_present / image_present False) gets a
        # learned vector instead of its stored zeros
        self.text_missing, self.image_missing = Missing(self.text_dim), Missing(self.image_dim)

    def forward_features(self, batch):
        t = masked_mean(batch.text_tokens[:, :, -1], batch.text_mask)  # (B, Dt), pads ignored
        t = self.text_missing(t, batch.text_present)
        i = self.image_missing(batch.image_pooled, batch.image_present)  # (B, Di)
        z = torch.sigmoid(self.gate(torch.cat([t, i], dim=-1)))  # (B, dim)
        return z * torch.tanh(self.text_proj(t)) + (1 - z) * torch.tanh(self.image_proj(i))


if __name__ == "__main__":
    results = check_head(GMUHead)
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.name:<20} {r.detail}")
    raise SystemExit(0 if all(r.passed for r in results) else 1)
