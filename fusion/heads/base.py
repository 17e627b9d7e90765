"""The contract every fusion head follows (timm-style features/head split)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.batch import Batch
from fusion.errors import HeadError

__all__ = ["BATCH_FIELDS", "CORE_ARGS", "MODALITIES", "FusionHead", "head_signature",
           "options_of"]

BATCH_FIELDS = frozenset(
    {"text_tokens", "text_mask", "text_pooled", "image_regions", "image_pooled"}
)
MODALITIES = ("text", "image")
CORE_ARGS = ("text_dim", "image_dim", "num_classes", "text_layers")  # every head takes these


def head_signature(obj: Any) -> inspect.Signature:
    """The signature a head class (its ``__init__``) or factory is called with."""
    return inspect.signature(obj.__init__ if isinstance(obj, type) else obj)


def options_of(obj: Any) -> dict[str, Any]:
    """Option -> default of a head class or factory: its keyword arguments beyond
    :data:`CORE_ARGS` (``inspect.Parameter.empty`` for an option without a default)."""
    return {
        p.name: p.default
        for p in head_signature(obj).parameters.values()
        if p.name not in (*CORE_ARGS, "self")
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


class FusionHead(nn.Module):
    """Base class: a module that maps a :class:`~fusion.batch.Batch` to logits (B, K).

    Subclasses set ``modalities`` and ``needs``, build ``self.fc`` (the last linear layer) and
    optionally ``self.neck`` (what comes between the fused vector and ``fc``), and implement
    :meth:`forward_features`. Options are keyword arguments of ``__init__`` with defaults;
    :func:`~fusion.heads.create_head` checks them against the signature.

    ``needs`` is declared on the class as every field the head may read; a head whose fields
    depend on its options (``pool=...``) narrows it on the instance, so the loader should read
    ``head.needs`` from the built head.
    """

    name: ClassVar[str] = ""  # set by @register_head
    modalities: ClassVar[tuple[str, ...]] = MODALITIES
    needs: ClassVar[frozenset[str]] = BATCH_FIELDS
    # False for heads that score a missing modality themselves (late, unimodal): no fallback
    fallback_routing: ClassVar[bool] = True

    def __init__(
        self,
        *,
        text_dim: int,
        image_dim: int,
        num_classes: int,
        text_layers: int = 1,
        fallback: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        if options:
            raise HeadError(
                f"unknown option {sorted(options)[0]!r} for head '{self.label}'; accepted "
                f"options: {', '.join(options_of(type(self))) or '(none)'}"
            )
        check_int(self.label, text_dim=text_dim, image_dim=image_dim, text_layers=text_layers)
        check_int(self.label, 2, num_classes=num_classes)
        self.text_dim = text_dim
        self.image_dim = image_dim
        self.num_classes = num_classes
        self.text_layers = text_layers
        self.neck: nn.Module = nn.Identity()
        # Filled on every forward by heads that attend: name -> (weights, valid_mask), detached;
        # weights sum to 1 over valid positions along the last dim (0 where a row has none).
        self.attention: dict[str, tuple[Tensor, Tensor]] = {}
        # Other detached tensors of the last forward worth inspecting (gates, affinities...).
        self.internals: dict[str, Tensor] = {}
        # Set by create_head: {"head": spec, "dims": {...}, "options": {...}} to rebuild it.
        self.config: dict[str, Any] = {}
        # fallback=True (docs/heads.md §6): one small classifier per modality on its pooled
        # vector, trained (auxiliary loss) on every item that has that modality; an item
        # lacking a modality is scored by the classifier of the one it has
        self.fallback = bool(fallback) and self.fallback_routing and set(
            self.modalities) == set(MODALITIES)
        if self.fallback:
            self.fallback_text = _fallback_classifier(text_dim, num_classes)
            self.fallback_image = _fallback_classifier(image_dim, num_classes)
        self._aux: tuple[Tensor, Tensor] | None = None

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def forward_features(self, batch: Batch) -> Tensor:
        """The fused vector (B, F)."""
        raise NotImplementedError(f"head '{self.label}' does not implement forward_features")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, F) -> logits (B, K), or the input of the last linear layer if ``pre_logits``."""
        x = self.neck(x)
        if pre_logits:
            return x
        fc = getattr(self, "fc", None)
        if fc is None:
            raise HeadError(
                f"head '{self.label}' has no `fc` module; set self.fc = nn.Linear(F, num_classes) "
                "in __init__ or override forward_head"
            )
        return fc(x)

    def forward(self, batch: Batch) -> Tensor:
        """Logits (B, K)."""
        self.attention = {}
        self.internals = {}
        logits = self.forward_head(self.forward_features(batch))
        return self._fallback_route(batch, logits) if self.fallback else logits

    def _fallback_route(self, batch: Batch, logits: Tensor) -> Tensor:
        """Rows without their image take the text classifier's logits, rows without their
        text the image classifier's (a row with neither keeps the fused logits)."""
        t_ok, i_ok = batch.present("text"), batch.present("image")
        training = torch.is_grad_enabled()
        if t_ok is None and i_ok is None and not training:
            return logits  # every row has both: nothing to route, no auxiliary loss
        text = self.fallback_text(batch.text_pooled)  # (B, K)
        image = self.fallback_image(batch.image_pooled)  # (B, K)
        self._aux = (text, image) if training else None
        if i_ok is not None:
            keep = i_ok if t_ok is None else i_ok | ~t_ok
            logits = torch.where(keep[:, None], logits, text)
        if t_ok is not None:
            keep = t_ok if i_ok is None else t_ok | ~i_ok
            logits = torch.where(keep[:, None], logits, image)
        return logits

    def loss(self, batch: Batch, logits: Tensor, class_weight: Tensor | None = None,
             label_smoothing: float = 0.0) -> Tensor:
        """Cross-entropy of ``logits`` against ``batch.labels`` (mean over the batch), plus,
        with ``fallback``, each fallback classifier's cross-entropy on the rows that have its
        modality. Training passes ``label_smoothing`` only when it is not 0."""
        y = self._labels(batch)
        out = F.cross_entropy(logits, y, weight=class_weight, label_smoothing=label_smoothing)
        if not self.fallback:
            return out
        aux = self._aux or (self.fallback_text(batch.text_pooled),
                            self.fallback_image(batch.image_pooled))
        self._aux = None
        for logit, mod in zip(aux, MODALITIES, strict=True):
            ok = batch.present(mod)
            ok = torch.ones_like(y, dtype=torch.bool) if ok is None else ok
            if ok.any():
                out = out + F.cross_entropy(logit[ok], y[ok], weight=class_weight,
                                            label_smoothing=label_smoothing)
        return out

    def on_fit_end(self, val_batches: Callable[[], Iterable[Batch]]) -> dict[str, Any]:
        """Hook called once after training with a fresh iterator factory over validation
        batches; returns metrics/choices to record in the run (default: nothing)."""
        return {}

    def _labels(self, batch: Batch) -> Tensor:
        if batch.labels is None:
            raise HeadError(
                f"head '{self.label}' needs batch.labels to compute a loss, but they are None; "
                "train on a store with labels"
            )
        return batch.labels.long()

    def expose(self, key: str, weights: Tensor, valid: Tensor) -> None:
        """Record attention ``weights`` and their validity mask (broadcast to one shape)."""
        self.attention[key] = (weights.detach(), valid.expand_as(weights).detach())

    def extra_repr(self) -> str:
        return (
            f"text_dim={self.text_dim}, image_dim={self.image_dim}, "
            f"num_classes={self.num_classes}, text_layers={self.text_layers}"
        )


def _fallback_classifier(dim: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Dropout(0.1), nn.Linear(dim, 256), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(256, k))


def check_choice(head: str, option: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise HeadError(f"{option}={value!r} for head '{head}' must be one of {choices}")


def check_int(head: str, minimum: int = 1, **values: Any) -> None:
    """Each keyword must be an int >= ``minimum``."""
    for option, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise HeadError(f"{option}={value!r} for head '{head}' must be an integer >= {minimum}")


def check_dropout(head: str, dropout: Any) -> None:
    if not isinstance(dropout, int | float) or not 0.0 <= float(dropout) < 1.0:
        raise HeadError(f"dropout={dropout!r} for head '{head}' must be a number in [0, 1)")


def check_layer(head: str, layer: Any, text_layers: int) -> None:
    if (
        isinstance(layer, bool)
        or not isinstance(layer, int)
        or not (-text_layers <= layer < text_layers)
    ):
        raise HeadError(
            f"layer={layer!r} for head '{head}' is outside the {text_layers} cached text "
            f"layer(s); pass an index in [-{text_layers}, {text_layers - 1}] (-1 = last)"
        )
