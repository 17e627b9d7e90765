"""Decision-level fusion: ``late`` (two unimodal classifiers, probabilities interpolated)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fusion.batch import Batch
from fusion.errors import HeadError
from fusion.heads.base import FusionHead, check_int
from fusion.heads.registry import register_head
from fusion.heads.unimodal import ImageHead, TextHead
from fusion.metrics import macro_f1

__all__ = ["LateHead"]


@register_head("late")
class LateHead(FusionHead):
    """log(alpha * p_text + (1 - alpha) * p_image) with alpha tuned on validation.

    Each half is a ``text``/``image`` head trained with its own cross-entropy (the loss is the
    sum), so neither half learns to lean on the other. ``alpha`` is a buffer (saved with the
    weights), 0.5 until :meth:`on_fit_end` picks the value on an ``alpha_grid``-point grid over
    [0, 1] that maximises validation macro-F1 (ties: lower validation log-loss). `fusion train`
    passes the fold's inner validation rows, never the rows the fold predicts.

    An item without its image is scored by the text half alone (alpha = 1 for that row), one
    without its text by the image half (alpha = 0); each half scores an item lacking its
    modality by its learned class prior (see :mod:`fusion.heads.unimodal`).
    """

    needs = TextHead.needs | ImageHead.needs
    fallback_routing = False  # scores a missing modality by the present half already

    def __init__(
        self,
        *,
        pool: str = "pooled",
        layer: int = -1,
        hidden: int = 256,
        dropout: float = 0.1,
        alpha_grid: int = 21,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        check_int(self.label, 2, alpha_grid=alpha_grid)
        self.text = TextHead(**dims, pool=pool, layer=layer, hidden=hidden, dropout=dropout)
        self.image = ImageHead(**dims, pool=pool, hidden=hidden, dropout=dropout)
        self.needs = self.text.needs | self.image.needs
        self.alpha_grid = alpha_grid
        self.register_buffer("alpha", torch.tensor(0.5))
        self._last: tuple[Tensor, Tensor] | None = None  # (output logits, unimodal logits)

    def forward_features(self, batch: Batch) -> Tensor:
        """Both halves' logits side by side: (B, 2K)."""
        parts = torch.cat([self.text(batch), self.image(batch)], dim=-1)
        for half in (self.text, self.image):
            self.attention.update(half.attention)
        return parts

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if pre_logits:
            return x
        text, image = x.split(self.num_classes, dim=-1)  # (B, K) each
        return _mix(F.log_softmax(text, -1), F.log_softmax(image, -1), self.alpha)

    def forward(self, batch: Batch) -> Tensor:
        self.attention, self.internals = {}, {}
        parts = self.forward_features(batch)
        text, image = parts.split(self.num_classes, dim=-1)  # (B, K) each
        logits = _mix(F.log_softmax(text, -1), F.log_softmax(image, -1),
                      _row_alpha(self.alpha, batch.present("text"), batch.present("image")))
        # Kept for loss() so the halves are not computed twice; only while a graph is built,
        # and dropped by loss(), so a trained head holds no graph (deepcopy keeps working).
        self._last = (logits, parts) if torch.is_grad_enabled() else None
        return logits

    def loss(self, batch: Batch, logits: Tensor, class_weight: Tensor | None = None,
             label_smoothing: float = 0.0) -> Tensor:
        """CE(text half) + CE(image half); ``logits`` must come from this head's last forward
        (otherwise both halves are recomputed)."""
        parts = self._last[1] if self._last is not None and self._last[0] is logits else None
        self._last = None
        if parts is None:
            parts = self.forward_features(batch)
        labels = self._labels(batch)
        text, image = parts.split(self.num_classes, dim=-1)
        return F.cross_entropy(
            text, labels, weight=class_weight, label_smoothing=label_smoothing
        ) + F.cross_entropy(image, labels, weight=class_weight, label_smoothing=label_smoothing)

    @torch.no_grad()
    def on_fit_end(self, val_batches: Callable[[], Iterable[Batch]]) -> dict[str, Any]:
        was_training = self.training
        self.eval()
        text_lp, image_lp, labels, t_ok, i_ok = [], [], [], [], []
        for batch in val_batches():
            batch = batch.to(self.alpha.device)  # the caller's loader may yield CPU batches
            parts = self.forward_features(batch)
            text, image = parts.split(self.num_classes, dim=-1)
            text_lp.append(F.log_softmax(text.double(), -1).cpu())
            image_lp.append(F.log_softmax(image.double(), -1).cpu())
            labels.append(self._labels(batch).cpu())
            for ok, mod in ((t_ok, "text"), (i_ok, "image")):
                have = batch.present(mod)
                ok.append(torch.ones(len(text), dtype=torch.bool) if have is None
                          else have.cpu())
        self.train(was_training)
        if not labels:
            raise HeadError("late: on_fit_end got no validation batches; alpha needs a val split")
        lt, li, y = torch.cat(text_lp), torch.cat(image_lp), torch.cat(labels)
        tok, iok = torch.cat(t_ok), torch.cat(i_ok)
        best = (-1.0, -math.inf, 0.5)  # (macro-F1, -log-loss, alpha)
        for alpha in torch.linspace(0.0, 1.0, self.alpha_grid, dtype=torch.float64):
            mixed = _mix(lt, li, _row_alpha(alpha, tok, iok))  # (N, K) log-probabilities
            f1 = macro_f1(y.numpy(), mixed.argmax(-1).numpy(), self.num_classes)
            nll = float(F.nll_loss(mixed, y))
            if (f1, -nll) > best[:2]:
                best = (float(f1), -nll, float(alpha))
        self.alpha.fill_(best[2])
        return {"alpha": best[2], "val_macro_f1": best[0], "val_nll": -best[1]}


def _row_alpha(alpha: Tensor, text_ok: Tensor | None, image_ok: Tensor | None) -> Tensor:
    """alpha per row (B, 1): 1 where only the text is there, 0 where only the image is, the
    tuned alpha elsewhere (both there, or neither: each half then gives its prior)."""
    if text_ok is None and image_ok is None:
        return alpha
    ok = text_ok if text_ok is not None else image_ok
    t = torch.ones_like(ok) if text_ok is None else text_ok
    i = torch.ones_like(ok) if image_ok is None else image_ok
    a = alpha.to(torch.float64 if alpha.dtype == torch.float64 else torch.float32)
    a = a.expand(len(ok)).to(t.device).clone()
    a[t & ~i] = 1.0
    a[~t & i] = 0.0
    return a[:, None]


def _mix(text_lp: Tensor, image_lp: Tensor, alpha: Tensor) -> Tensor:
    """log(alpha * exp(text_lp) + (1 - alpha) * exp(image_lp)).

    In log space, so alpha in {0, 1} gives exactly one half (log 0 = -inf drops the other) with
    finite gradients, and no host sync on the alpha buffer.
    """
    alpha = alpha.to(text_lp.dtype)
    return torch.logaddexp(text_lp + torch.log(alpha), image_lp + torch.log1p(-alpha))
