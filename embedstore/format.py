"""Store format version 1: the one place that knows the schema (see docs/format.md).

Validators are named ``parse_*``; each raises :class:`StoreFormatError` naming the field, the
expected value and the value found.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from .errors import StoreFormatError

__all__ = [
    "FORMAT_VERSION",
    "ATTRS_KEY",
    "TEXT_ARRAYS",
    "IMAGE_ARRAYS",
    "parse_root_attrs",
    "parse_feature_attrs",
    "token_layout",
    "token_chunk_size",
    "region_chunk_rows",
    "fingerprint_ids",
    "fingerprint_folds",
    "expected_chunks",
    "DEFAULT_BLOCK_ROWS",
]

FORMAT_VERSION = 1
ATTRS_KEY = "embedstore"  # all our metadata lives under this key of the zarr attributes
DEFAULT_BLOCK_ROWS = 1024  # rows per write unit (must be a power of two)
TEXT_ARRAYS = ("tokens", "offsets", "lengths", "pooled", "done", "errors")
IMAGE_ARRAYS = ("regions", "pooled", "done", "errors")
_TOKEN_CHUNK_BYTES = 512 * 1024
_REGION_CHUNK_BYTES = 4 * 1024 * 1024


def _field(attrs: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in attrs:
        raise StoreFormatError(f"{where}: field {key!r} is missing; the store was not written by "
                               "embedstore or is damaged (run `embedstore verify`)")
    value = attrs[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise StoreFormatError(f"{where}: field {key!r} must be {names}, found "
                               f"{type(value).__name__} {value!r}")
    return value


def parse_root_attrs(attrs: dict, url: str = "") -> dict:
    """Validate the root ``embedstore`` attributes and return them."""
    where = f"store {url!r}" if url else "store"
    if ATTRS_KEY not in attrs:
        raise StoreFormatError(f"{where} has no {ATTRS_KEY!r} attributes: it is a Zarr group but "
                               "not an embedstore store (create one with `embedstore extract`)")
    meta = attrs[ATTRS_KEY]
    if not isinstance(meta, dict):
        raise StoreFormatError(f"{where}: attribute {ATTRS_KEY!r} must be an object, found "
                               f"{type(meta).__name__}")
    version = _field(meta, "format", int, where)
    if version > FORMAT_VERSION:
        raise StoreFormatError(f"{where} has format {version}, newer than this embedstore "
                               f"understands ({FORMAT_VERSION}); upgrade embedstore "
                               "(pip install -U embedstore-fusion)")
    if version < 1:
        raise StoreFormatError(f"{where} has format {version}; only format 1 exists")
    _field(meta, "n_items", int, where)
    folds = _field(meta, "folds", dict, where)
    for key, typ in (("k", int), ("seed", int), ("holdout", (int, float))):
        _field(folds, key, typ, f"{where} folds")
    classes = meta.get("classes")
    if classes is not None and not isinstance(classes, list):
        raise StoreFormatError(f"{where}: field 'classes' must be a list or null, found "
                               f"{type(classes).__name__}")
    return meta


def parse_feature_attrs(attrs: dict, name: str) -> dict:
    """Validate a feature set's ``embedstore`` attributes and return them."""
    where = f"feature set {name!r}"
    meta = attrs.get(ATTRS_KEY)
    if not isinstance(meta, dict):
        raise StoreFormatError(f"{where} has no {ATTRS_KEY!r} attributes object; it is damaged: "
                               "re-extract it with --overwrite")
    modality = _field(meta, "modality", str, where)
    if modality not in ("text", "image"):
        raise StoreFormatError(f"{where}: modality must be 'text' or 'image', found {modality!r}")
    kind = _field(meta, "kind", str, where)
    expected = "tokens" if modality == "text" else "regions"
    if kind != expected:
        raise StoreFormatError(f"{where}: kind must be {expected!r} for {modality}, found {kind!r}")
    _field(meta, "dim", int, where)
    _field(meta, "n_items", int, where)
    _field(meta, "block_rows", int, where)
    status = _field(meta, "status", str, where)
    if status not in ("writing", "complete"):
        raise StoreFormatError(f"{where}: status must be 'writing' or 'complete', found {status!r}")
    if modality == "text":
        layers = _field(meta, "layers", list, where)
        if not all(isinstance(x, int) for x in layers):
            raise StoreFormatError(f"{where}: layers must be a list of int, found {layers!r}")
        _field(meta, "token_chunk", int, where)
    else:
        _field(meta, "n_regions", int, where)
        _field(meta, "prefix_tokens", int, where)
    _field(meta, "encoder", dict, where)
    if meta.get("generation") is not None:
        _field(meta, "generation", str, where)
    return meta


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def token_chunk_size(n_layers: int, dim: int, itemsize: int = 2) -> int:
    """Tokens per chunk of the ragged ``tokens`` array (~512 KiB chunks, 64..4096 tokens)."""
    return int(min(4096, max(64, _pow2_floor(_TOKEN_CHUNK_BYTES / (n_layers * dim * itemsize)))))


def region_chunk_rows(n_regions: int, dim: int, block_rows: int, itemsize: int = 2) -> int:
    """Rows per chunk of ``regions`` (~4 MiB chunks); a power of two dividing ``block_rows``."""
    return int(min(block_rows, _pow2_floor(_REGION_CHUNK_BYTES / (n_regions * dim * itemsize))))


def token_layout(lengths: np.ndarray, block_rows: int, token_chunk: int) -> tuple[np.ndarray, int]:
    """Offsets for ragged tokens such that every write block starts on a chunk boundary.

    Rows are grouped in blocks of ``block_rows``; block ``b`` owns the token chunks from its
    aligned start to the next block's start, so writers of different blocks never touch the same
    chunk (no read-modify-write races between processes). Returns ``(offsets [N+1], total)``:
    item ``i`` is ``tokens[offsets[i] : offsets[i] + lengths[i]]``; inside a block
    ``offsets[i+1] == offsets[i] + lengths[i]``; the last row of a block may be followed by a gap
    of fewer than ``token_chunk`` unused (zero) tokens.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    offsets = np.zeros(n + 1, dtype=np.int64)
    pos = 0
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        pos = -(-pos // token_chunk) * token_chunk  # align the block's first token
        cum = np.cumsum(lengths[start:stop])
        offsets[start] = pos
        offsets[start + 1 : stop + 1] = pos + cum
        pos = int(offsets[stop])
    offsets[n] = pos
    return offsets, pos


def expected_chunks(n_chunks: int, chunk_rows: int, offsets: np.ndarray | None = None,
                    lengths: np.ndarray | None = None) -> np.ndarray:
    """Indices (along axis 0) of the chunks a *complete* array must hold.

    Row-chunked arrays: all of them. The ragged ``tokens`` array (pass ``offsets`` and
    ``lengths``): the chunks holding at least one valid token; with no tokens at all, chunk 0
    (written as zeros at creation). Gaps between blocks never fill a whole chunk, so in practice
    this is every chunk too, but the rule is stated on the rows.
    """
    if offsets is None:
        return np.arange(n_chunks)
    offsets = np.asarray(offsets, dtype=np.int64)[: len(lengths)]
    lengths = np.asarray(lengths, dtype=np.int64)
    used = lengths > 0
    if not used.any():
        return np.array([0])
    first = offsets[used] // chunk_rows
    last = (offsets[used] + lengths[used] - 1) // chunk_rows
    cover = np.zeros(n_chunks + 1, dtype=np.int64)
    np.add.at(cover, first, 1)
    np.add.at(cover, last + 1, -1)
    return np.flatnonzero(np.cumsum(cover)[:n_chunks] > 0)


def fingerprint_ids(ids: np.ndarray, labels: np.ndarray | None) -> str:
    """sha256 over the ids (and labels) in store order: same dataset <=> same fingerprint."""
    h = hashlib.sha256()
    for i in ids.tolist():
        h.update(str(i).encode("utf-8"))
        h.update(b"\0")
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    return h.hexdigest()[:16]


def fingerprint_folds(folds: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(folds, dtype=np.int8).tobytes()).hexdigest()[:16]
