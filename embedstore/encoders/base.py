"""Encoder registry, spec parsing and the two encoder contracts (text tokens, image regions).

A spec is ``BACKEND:MODEL[@WEIGHTS]`` and is recorded verbatim in a feature set's provenance:
``hf:/models/minilm``, ``timm:tf_efficientnet_lite0@/w/lite0.safetensors``,
``open_clip:ViT-B-32@random``. Backends register themselves with :func:`register_backend`;
importing :mod:`embedstore.encoders` fills the registry, and the heavy libraries (transformers,
timm, open_clip) are imported only when a backend builds an encoder.

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
import hashlib
import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import EncoderSpecError, ImageLoadError

__all__ = [
    "EncoderSpec",
    "EncoderOptions",
    "TextEncoder",
    "ImageEncoder",
    "Encoder",
    "ImageLoader",
    "parse_spec",
    "parse_layers",
    "register_backend",
    "create_encoder",
    "list_backends",
    "sha256_file",
    "feature_name",
    "effective_precision",
]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODALITIES = ("text", "image")


# ----------------------------------------------------------------------------------------------
# spec and options


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderSpec:
        return cls(**d)


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderOptions:
        d = dict(d)
        if isinstance(d.get("layers"), list):
            d["layers"] = tuple(d["layers"])
        return cls(**d)


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


# ----------------------------------------------------------------------------------------------
# helpers shared by the backends

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, memoised on (real path, size, mtime) so re-opening is free."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


_GENERIC_DIR_NAMES = {"model", "models", "weights", "checkpoint", "checkpoints", "snapshot"}


def feature_name(raw: str) -> str:
    """A readable default feature-set name: lower case, ``[a-z0-9.-]`` only."""
    name = re.sub(r"[^a-z0-9.]+", "-", raw.lower()).strip("-.")
    return name or "features"


def name_from_path(path: Path) -> str:
    """Feature name for a local model directory/file, skipping generic folder names."""
    parts = [p for p in path.resolve().parts if p not in ("/", "")]
    for part in reversed(parts):
        stem = Path(part).stem if "." in part else part
        if stem.lower() in _GENERIC_DIR_NAMES or re.fullmatch(r"[0-9a-f]{40}", stem):
            continue
        if stem.lower() == "snapshots" or stem.lower() == "blobs":
            continue
        return feature_name(stem.removeprefix("models--").replace("--", "-"))
    return "features"


def library_versions(*dists: str) -> dict[str, str]:
    out = {}
    for d in ("torch", *dists):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return out


def check_device_precision(device: str, precision: str, where: str) -> torch.device:
    if precision not in PRECISIONS:
        raise EncoderSpecError(
            f"{where}: precision {precision!r} is not one of {sorted(PRECISIONS)}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EncoderSpecError(
            f"{where}: device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderSpecError(
            f"{where}: device {device!r} asked for but CUDA is not available; use --device cpu"
        )
    return dev


def effective_precision(device: torch.device, precision: str) -> str:
    """AMP runs on CUDA only; elsewhere the encoder computes (and records) fp32."""
    return precision if device.type == "cuda" else "fp32"


def load_state_dict_file(path: Path, where: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or a ``.pth/.pt/.bin/.ckpt`` checkpoint (also when
    nested under ``state_dict``/``model``), loaded with ``weights_only=True``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoder error means the same thing to the user
        raise EncoderSpecError(
            f"{where}: weights file {str(path)!r} could not be read "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass a "
            ".safetensors or torch state-dict file"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderSpecError(
            f"{where}: weights file {str(path)!r} holds no state dict of tensors; pass a "
            ".safetensors or torch state-dict file"
        )
    return {k.removeprefix("module."): v for k, v in sd.items()}


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """AMP on CUDA when precision is fp16/bf16; full precision elsewhere."""
    if device.type == "cuda" and precision != "fp32":
        with torch.autocast("cuda", dtype=PRECISIONS[precision]):
            yield
    else:
        yield


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for a random init without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------
# images


class ImageLoader:
    """Picklable ``source -> (3, H, W) tensor``: a path, fsspec URL or raw bytes, decoded with
    PIL, converted to RGB, then passed through the encoder's transform.

    Raises :class:`ImageLoadError` (one line, with the reason) for a missing, empty or corrupt
    image, so the extraction loop can record the row and go on.
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor]):
        self.transform = transform

    def __call__(self, source: str | os.PathLike | bytes) -> torch.Tensor:
        return self.transform(self.open(source))

    @staticmethod
    def open(source: str | os.PathLike | bytes):  # -> PIL.Image.Image
        from PIL import Image, UnidentifiedImageError

        if isinstance(source, (bytes, bytearray, memoryview)):
            data, what = bytes(source), f"<{len(source)} bytes>"
        else:
            what = str(source)
            try:
                import fsspec

                with fsspec.open(what, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise ImageLoadError(f"image {what!r} not found") from None
            except Exception as e:  # noqa: BLE001 - fsspec backends raise many kinds
                raise ImageLoadError(f"image {what!r} could not be read: {e}") from None
        if not data:
            raise ImageLoadError(f"image {what!r} is empty (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()  # decode now: a truncated file fails here, not later in a worker
            return img.convert("RGB")
        except UnidentifiedImageError:
            raise ImageLoadError(f"image {what!r} is not a recognised image format") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageLoadError(f"image {what!r} is corrupt or truncated: {e}") from None


# ----------------------------------------------------------------------------------------------
# the two contracts


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


# ----------------------------------------------------------------------------------------------
# registry

Backend = Callable[[EncoderSpec, EncoderOptions], Encoder]
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    """Decorator: ``@register_backend("timm")`` makes ``timm:...`` specs build with the function."""

    def deco(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        return fn

    return deco


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


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
    if parsed.backend not in _BACKENDS:
        raise EncoderSpecError(
            f"unknown encoder backend {parsed.backend!r} in spec {spec!r}; available backends: "
            f"{list_backends()}"
        )
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
    return _BACKENDS[parsed.backend](parsed, opts)
