"""The two encoder contracts: :class:`TextEncoder` (token states) and :class:`ImageEncoder`
(spatial regions). Backends (:mod:`.hf`, :mod:`.timm`, :mod:`.openclip`) implement them; specs,
options and the backend registry are :mod:`.specs`, shared helpers :mod:`.common`.

Models are frozen (``eval()``, ``requires_grad_(False)``); ``encode`` runs under
``torch.inference_mode`` and returns tensors on the encoder's device (the caller copies them
to the host, e.g. on a writer thread). ``encode`` is meant for one thread at a time (open_clip
reads its token states through forward hooks).

Everything a DataLoader worker needs (``TextEncoder.tokenize``, ``ImageEncoder.preprocess``,
``ImageEncoder.load_image``) is a small picklable object held as an attribute, so a worker never
receives a copy of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import EncoderSpecError
from .common import ImageLoader

__all__ = ["Encoder", "ImageEncoder", "TextEncoder"]


class _EncoderBase:
    spec: str
    library: str
    name: str
    dim: int  # D of tokens / regions
    pooled_dim: int  # D of pooled (differs from dim for projected CLIP embeddings)
    device: torch.device
    precision: str  # what runs: fp16/bf16 AMP on CUDA, else fp32
    precision_requested: str
    # False: encode() runs under torch.inference_mode (extraction). `fusion train --finetune`
    # sets it True (and unfreezes the model) so the same encode() builds an autograd graph.
    trainable: bool = False

    @property
    def torch_module(self) -> torch.nn.Module:
        """The underlying torch model (fine-tuning puts its parameters in an optimiser)."""
        return self.model  # type: ignore[attr-defined]

    def grad_mode(self):
        """inference_mode for extraction; a no-op context when fine-tuning (note that
        ``inference_mode(False)`` would force grad mode on, even inside ``no_grad``)."""
        return contextlib.nullcontext() if self.trainable else torch.inference_mode()

    def _provenance(
        self, encoder: dict[str, Any], preprocess: dict[str, Any], versions: dict[str, str]
    ) -> dict[str, Any]:
        return {
            "encoder": {"spec": self.spec, "library": self.library, "name": self.name, **encoder},
            "preprocess": preprocess,
            "versions": versions,
            "device": str(self.device),
            "precision": self.precision,
            "precision_requested": self.precision_requested,
            "dim": self.dim,
            "pooled_dim": self.pooled_dim,
        }


class TextEncoder(_EncoderBase):
    """Token-level text encoder (modality ``text``, kind ``tokens``).

    ``encode`` returns every valid token (mask True), special tokens such as [CLS]/[SEP] or
    <sot>/<eot> included, for the resolved ``layers``; ``count_tokens`` returns exactly the number
    of mask-True tokens ``encode`` will emit per text, so ragged offsets can be fixed up front.
    """

    modality = "text"
    kind = "tokens"
    layers: list[int]
    n_hidden: int  # hidden states available (embeddings + blocks)
    pooling: str
    max_length: int
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]]

    def count_tokens(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        raise NotImplementedError


class ImageEncoder(_EncoderBase):
    """Spatial image encoder (modality ``image``, kind ``regions``).

    ``regions`` is (B, R, D) with ``prefix_tokens`` CLS/register tokens first and then the
    ``grid`` [H, W] cells in row-major order; ``pooled`` is the backbone's own pooled vector.
    """

    modality = "image"
    kind = "regions"
    grid: list[int] | None
    prefix_tokens: int
    n_regions: int
    image_size: int
    input_shape: tuple[int, int, int]  # (3, H, W) that preprocess() returns
    preprocess: Callable[[Any], torch.Tensor]
    load_image: ImageLoader

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        raise NotImplementedError

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise EncoderSpecError(
                f"{self.spec}: encode expects images of shape (B, 3, H, W), got "
                f"{tuple(images.shape)}; pass a stack of preprocess() outputs"
            )
        x = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x


Encoder = TextEncoder | ImageEncoder
