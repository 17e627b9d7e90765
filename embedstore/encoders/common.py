"""Helpers shared by the encoder backends: devices and precision, weights files and their
digests, default feature-set names, seeding, and the picklable image loader."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file

from ..errors import EncoderSpecError, ImageLoadError

__all__ = [
    "MODALITIES",
    "PRECISIONS",
    "ImageLoader",
    "autocast",
    "check_device_precision",
    "effective_precision",
    "feature_name",
    "library_versions",
    "load_state_dict_file",
    "name_from_path",
    "seeded",
    "sha256_file",
]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODALITIES = ("text", "image")


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
    def open(source: str | os.PathLike | bytes) -> Image.Image:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, what = bytes(source), f"<{len(source)} bytes>"
        else:
            what = str(source)
            try:
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
