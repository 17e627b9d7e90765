"""From a spec string to an encoder: the ``BACKEND:MODEL[@WEIGHTS]`` grammar, the options every
backend receives, the layer selection, and the registry of backends.

A spec is recorded verbatim in a feature set's provenance: ``hf:/models/minilm``,
``timm:tf_efficientnet_lite0@/w/lite0.safetensors``, ``open_clip:ViT-B-32@random``. Backends
register a factory ``(EncoderSpec, EncoderOptions) -> Encoder`` with :func:`register_backend`
(the one :class:`embedstore.registry.Registry`); importing :mod:`embedstore.encoders` fills it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import EncoderSpecError
from ..registry import Registry
from .base import Encoder
from .common import MODALITIES, check_device_precision

__all__ = [
    "BACKENDS",
    "EncoderOptions",
    "EncoderSpec",
    "create_encoder",
    "list_backends",
    "parse_layers",
    "parse_spec",
    "register_backend",
]

# backend name -> factory(EncoderSpec, EncoderOptions) -> Encoder
BACKENDS: Registry[Callable[..., Any]] = Registry(
    "encoder backend", error=EncoderSpecError, normalize=lambda name: name.strip().lower(),
    entry_point_group="embedstore.encoders",
    hint="Write BACKEND:MODEL[@WEIGHTS], e.g. 'hf:/path/to/model' or 'timm:resnet50@random'")


def register_backend(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@register_backend("timm")`` makes ``timm:...`` specs build with the function."""
    return BACKENDS.register(name)


def list_backends() -> list[str]:
    return BACKENDS.names()


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed ``BACKEND:MODEL[@WEIGHTS]`` string; ``raw`` is kept for provenance."""

    raw: str
    backend: str
    model: str
    weights: str | None = None

    @property
    def rest(self) -> str:
        """Everything after ``BACKEND:``."""
        return f"{self.model}@{self.weights}" if self.weights is not None else self.model

    def split_first(self) -> tuple[str, str | None]:
        """(model, weights) split at the *first* ``@``: for backends whose model names never
        hold ``@`` but whose weights may be a path that does."""
        model, sep, weights = self.rest.partition("@")
        return model, (weights if sep else None)


def parse_spec(spec: str) -> EncoderSpec:
    """Split ``BACKEND:MODEL[@WEIGHTS]`` at the first ``:`` and the last ``@``.

    A local path that itself contains ``@`` is still usable: backends check whether
    ``MODEL@WEIGHTS`` as a whole names an existing path before using the split.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise EncoderSpecError(
            f"encoder spec {spec!r} has no backend prefix; write BACKEND:MODEL[@WEIGHTS] with "
            f"BACKEND one of {list_backends()}, e.g. 'hf:/path/to/model' or "
            "'timm:resnet50@random'"
        )
    backend, rest = spec.split(":", 1)
    backend = backend.strip().lower()
    if not rest:
        raise EncoderSpecError(f"encoder spec {spec!r} names no model after {backend!r}:")
    model, sep, weights = rest.rpartition("@")
    if not sep:
        model, weights = rest, ""
    if not model:
        raise EncoderSpecError(f"encoder spec {spec!r} names no model before '@{weights}'")
    return EncoderSpec(raw=spec, backend=backend, model=model, weights=weights or None)


@dataclass(frozen=True)
class EncoderOptions:
    """Everything :func:`create_encoder` passes to a backend besides the spec."""

    modality: str | None = None
    layers: str | tuple[int, ...] = "-1"
    max_length: int = 256
    image_size: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    seed: int = 0


def parse_layers(layers: str | int | Sequence[int], n_hidden: int, where: str) -> list[int]:
    """Resolve a layer selection against ``n_hidden`` hidden states (index 0 = embeddings).

    Accepts ``"all"``, an int, a comma-separated string (``"-4,-3,-2,-1"``) or a list of ints;
    negative indices count from the last layer. Order is kept; duplicates are refused.
    """
    if isinstance(layers, str):
        text = layers.strip().lower()
        if text == "all":
            return list(range(n_hidden))
        try:
            raw = [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise EncoderSpecError(
                f"{where}: layers {layers!r} is not 'all' or a comma-separated list of ints "
                "(e.g. '-1' or '-4,-3,-2,-1')"
            ) from None
    elif isinstance(layers, int):
        raw = [layers]
    else:
        raw = [int(x) for x in layers]
    if not raw:
        raise EncoderSpecError(f"{where}: layers {layers!r} selects no layer; use e.g. '-1'")
    out = []
    for i in raw:
        j = i + n_hidden if i < 0 else i
        if not 0 <= j < n_hidden:
            raise EncoderSpecError(
                f"{where}: layer {i} is out of range; this model has {n_hidden} hidden states "
                f"(0 = embeddings .. {n_hidden - 1} = last; negatives count from the end)"
            )
        out.append(j)
    if len(set(out)) != len(out):
        raise EncoderSpecError(f"{where}: layers {layers!r} selects a layer twice ({out})")
    return out


def create_encoder(
    spec: str,
    *,
    modality: str | None = None,
    layers: str | int | Sequence[int] = "-1",
    max_length: int = 256,
    image_size: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
) -> Encoder:
    """Build the encoder a spec names; see the module docstring for the spec grammar.

    ``modality`` picks the tower of a two-tower model (open_clip) and is checked against
    single-tower backends; ``layers`` applies to text encoders, ``image_size`` to image encoders.
    Nothing is ever downloaded: hub ids and pretrained tags resolve from local caches only.
    """
    parsed = parse_spec(spec)
    try:
        backend = BACKENDS.get(parsed.backend)
    except EncoderSpecError as e:
        raise EncoderSpecError(f"encoder spec {spec!r}: {e}") from None
    if modality is not None and modality not in MODALITIES:
        raise EncoderSpecError(f"{spec}: modality {modality!r} is not one of {list(MODALITIES)}")
    if not isinstance(max_length, int) or max_length < 2:
        raise EncoderSpecError(f"{spec}: max_length must be an int >= 2, got {max_length!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise EncoderSpecError(f"{spec}: image_size must be an int >= 8, got {image_size!r}")
    if isinstance(layers, int):
        layers = str(layers)
    elif not isinstance(layers, str):
        layers = tuple(int(x) for x in layers)
    opts = EncoderOptions(
        modality=modality,
        layers=layers,
        max_length=max_length,
        image_size=image_size,
        device=device,
        precision=precision,
        seed=seed,
    )
    check_device_precision(device, precision, spec)
    return backend(parsed, opts)
