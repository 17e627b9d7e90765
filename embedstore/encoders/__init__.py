"""Encoder backends for ``embedstore extract``: ``hf``, ``timm`` and ``open_clip``.

Importing this package registers every backend; the libraries behind them are imported only
when :func:`create_encoder` builds one.
"""

from . import hf, openclip, timm  # noqa: F401 - importing registers the backends
from .base import Encoder, ImageEncoder, TextEncoder
from .common import ImageLoader
from .specs import (
    EncoderOptions,
    EncoderSpec,
    create_encoder,
    list_backends,
    parse_layers,
    parse_spec,
    register_backend,
)

__all__ = [
    "Encoder",
    "EncoderOptions",
    "EncoderSpec",
    "ImageEncoder",
    "ImageLoader",
    "TextEncoder",
    "create_encoder",
    "list_backends",
    "parse_layers",
    "parse_spec",
    "register_backend",
]
