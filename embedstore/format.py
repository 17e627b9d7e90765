"""Store format version 1: the one place that knows the schema (see docs/format.md).

* names: which arrays a feature set of each modality holds (:func:`main_array`,
  :func:`feature_arrays`);
* builders: the metadata every writer stores (:func:`root_meta`, :func:`creating_marker`,
  :func:`feature_meta`, :func:`group_document`) and the shape/dtype/chunks of every array
  (:func:`dataset_arrays`, :func:`feature_array_specs`);
* validators named ``parse_*``; each raises :class:`StoreFormatError` naming the field, the
  expected value and the value found;
* the layout rules of ragged tokens and chunk sizes, and the dataset fingerprints.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from typing import Any, NamedTuple

import numpy as np

from .errors import InvalidInputError, StoreFormatError
from .gallery import (  # §2.6, re-exported
    GALLERY_ARRAYS,
    gallery_array_specs,
    gallery_item_rows,
    is_gallery,
)
from .presence import (  # the presence rules (§2.5), kept beside this module for its size
    ABSENT,
    ABSENT_IMAGE,
    ABSENT_TEXT,
    FAILED,
    PRESENT,
    check_presence,
    derive_presence,
)

__all__ = [
    "FORMAT_VERSION", "READ_FORMAT", "SEGMENTS_GROUP", "segment_path", "ATTRS_KEY", "MODALITIES",
    "TEXT_ARRAYS", "IMAGE_ARRAYS", "ROOT_ARRAYS", "ArraySpec", "main_array", "feature_arrays",
    "utc_now", "group_document", "creating_marker", "root_meta", "feature_meta", "dataset_arrays",
    "feature_array_specs", "parse_root_attrs", "parse_feature_attrs", "token_layout",
    "token_chunk_size", "region_chunk_rows", "fingerprint_ids", "fingerprint_folds",
    "expected_chunks", "DEFAULT_BLOCK_ROWS", "PRESENT", "ABSENT", "FAILED", "ABSENT_TEXT",
    "ABSENT_IMAGE", "derive_presence", "check_presence", "GALLERY_ARRAYS", "is_gallery",
    "gallery_item_rows", "FLOAT_CODECS", "DEFAULT_FLOAT_CODEC", "check_codec"]

FORMAT_VERSION = 1  # what a new store is written as; its first append makes it format 2
READ_FORMAT = 2  # the newest format this version reads (format 2: segments, docs/format.md)
ATTRS_KEY = "embedstore"  # all our metadata lives under this key of the zarr attributes
DEFAULT_BLOCK_ROWS = 1024  # rows per write unit (must be a power of two)
MODALITIES = ("text", "image")
TEXT_ARRAYS = ("tokens", "offsets", "lengths", "pooled", "done", "errors")
IMAGE_ARRAYS = ("regions", "pooled", "done", "errors")
ROOT_ARRAYS = ("ids", "labels", "folds", "groups")  # labels: when classes; groups: when grouped
_ARRAYS = {"text": TEXT_ARRAYS, "image": IMAGE_ARRAYS}
_TOKEN_CHUNK_BYTES = 512 * 1024
_REGION_CHUNK_BYTES = 4 * 1024 * 1024
_SMALL_CHUNK = 262144  # rows per chunk of the 1-d arrays (labels, folds, offsets, lengths)
_IDS_CHUNK = 65536
# Compressor of a feature set's float arrays, all others zstd (docs/format.md §6): "lz4" (Blosc)
# decodes at memory speed; "zstd" is smaller on sparse CNN maps, slower on every epoch.
FLOAT_CODECS = ("lz4", "zstd")
DEFAULT_FLOAT_CODEC = "lz4"


# -- names ------------------------------------------------------------------------------------


SEGMENTS_GROUP = "segments"  # format 2: segment s >= 1 is a format-1 store under segments/<s>/


def segment_path(seg_id: int, pending: bool = False) -> str:
    """Where segment ``seg_id`` lives relative to the store root (``pending``: being written)."""
    return f"{SEGMENTS_GROUP}/.{seg_id}.new" if pending else f"{SEGMENTS_GROUP}/{seg_id}"


def main_array(modality: str) -> str:
    """The big array of a feature set: ``tokens`` (text) or ``regions`` (image); also its
    ``kind``."""
    return _ARRAYS[modality][0]


def feature_arrays(modality: str) -> tuple[str, ...]:
    """Every array a feature set of ``modality`` holds, the main one first."""
    return _ARRAYS[modality]


# -- builders ---------------------------------------------------------------------------------


class ArraySpec(NamedTuple):
    """Shape, dtype, chunk shape, fill value, compressor (:data:`FLOAT_CODECS`) of an array."""

    shape: tuple[int, ...]
    dtype: Any
    chunks: tuple[int, ...]
    fill_value: Any = None
    codec: str = "zstd"


def check_codec(codec: str) -> str:
    """``codec`` if it is one of :data:`FLOAT_CODECS`, else one line naming the choices."""
    if codec not in FLOAT_CODECS:
        raise InvalidInputError(f"--codec must be one of {', '.join(FLOAT_CODECS)}, got {codec!r}: "
                               f"{DEFAULT_FLOAT_CODEC} (the default) for fast reads, zstd for "
                               "smaller stores shipped over a network")
    return codec


def utc_now() -> str:
    """The ``created`` / ``finished`` time stamp: ISO 8601 UTC, seconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def group_document(meta: dict) -> bytes:
    """A group's whole ``zarr.json`` carrying ``meta`` as its embedstore attributes (written
    with an exclusive create, so the group and its attributes appear in one step)."""
    return json.dumps({"zarr_format": 3, "node_type": "group",
                       "attributes": {ATTRS_KEY: meta}}).encode()


def creating_marker(fingerprint: str, fold_opts: dict) -> dict:
    """Root attributes while a store is being created (§2 of docs/format.md)."""
    return {"format": FORMAT_VERSION, "creating": True, "created": utc_now(),
            "dataset": {"fingerprint": fingerprint}, "folds": dict(fold_opts)}


def root_meta(*, n_items: int, versions: dict, source: str | None, fingerprint: str,
              classes: list | None, fold_opts: dict, stratified: bool,
              folds_fingerprint: str) -> dict:
    """The root attributes of a finished store."""
    return {
        "format": FORMAT_VERSION,
        "n_items": int(n_items),
        "all_chunks": True,
        "created": utc_now(),
        "versions": dict(versions),
        "dataset": {"source": source, "fingerprint": fingerprint},
        "classes": classes,
        "folds": {**fold_opts, "stratified": stratified, "fingerprint": folds_fingerprint},
    }


def dataset_arrays(n: int, has_labels: bool, has_groups: bool = False) -> dict[str, ArraySpec]:
    """The root arrays of a store of ``n`` items (``groups``: strings, laid out like ``ids``)."""
    out = {"ids": ArraySpec((n,), str, (min(n, _IDS_CHUNK),))}
    if has_labels:
        out["labels"] = ArraySpec((n,), "int32", (min(n, _SMALL_CHUNK),))
    out["folds"] = ArraySpec((n,), "int8", (min(n, _SMALL_CHUNK),))
    if has_groups:
        out["groups"] = ArraySpec((n,), str, (min(n, _IDS_CHUNK),))
    return out


def feature_meta(*, name: str, modality: str, dim: int, pooled_dim: int, n_items: int,
                 block_rows: int, dtype: str, generation: str, attrs: dict | None = None,
                 layers: list[int] | None = None, token_chunk: int | None = None,
                 n_tokens: int | None = None, n_regions: int | None = None,
                 prefix_tokens: int = 0, grid: list[int] | None = None,
                 gallery: bool = False) -> dict:
    """The attributes of a new feature set (status ``writing``). Provenance ``attrs`` are
    merged in, but never over a schema field; their ``encoder`` object is the provenance."""
    meta: dict[str, Any] = {
        "name": name,
        "modality": modality,
        "kind": main_array(modality),
        "dim": int(dim),
        "pooled_dim": int(pooled_dim),
        "n_items": int(n_items),
        "block_rows": int(block_rows),
        "dtype": dtype,
        "status": "writing",
        "generation": generation,
        "created": utc_now(),
        "encoder": {},
    }
    if modality == "text":
        meta.update(layers=[int(x) for x in layers or []], token_chunk=int(token_chunk or 0),
                    n_tokens=int(n_tokens or 0))
    else:
        meta.update(n_regions=int(n_regions or 0), prefix_tokens=int(prefix_tokens),
                    grid=list(grid) if grid is not None else None)
        if gallery:  # several images per item (§2.6); absent = one image per item
            meta.update(gallery=True, n_images_total=int(n_tokens or 0))
    for k, v in (attrs or {}).items():
        if k not in meta:
            meta[k] = v
    meta["encoder"] = dict((attrs or {}).get("encoder", {}))
    return meta


def feature_array_specs(meta: dict, total_tokens: int = 0,
                        codec: str = DEFAULT_FLOAT_CODEC) -> dict[str, ArraySpec]:
    """Every array of the feature set ``meta`` describes (``total_tokens``: the ragged
    layout's length: tokens, or a gallery's image rows), in :func:`feature_arrays` order; its
    float arrays compressed with ``codec``, the others with zstd."""
    n, dim, block = int(meta["n_items"]), int(meta["dim"]), int(meta["block_rows"])
    pdim, dtype = int(meta.get("pooled_dim", dim)), meta["dtype"]
    rows = (min(block, n),)
    out: dict[str, ArraySpec] = {}
    if meta["modality"] == "text":
        n_layers, tc = len(meta["layers"]), int(meta["token_chunk"])
        out["tokens"] = ArraySpec((max(total_tokens, 1), n_layers, dim), dtype,
                                  (tc, n_layers, dim), 0)
        out["offsets"] = ArraySpec((n + 1,), "int64", (min(n + 1, _SMALL_CHUNK),))
        out["lengths"] = ArraySpec((n,), "int32", (min(n, _SMALL_CHUNK),))
    else:
        n_reg = int(meta["n_regions"])
        rc = region_chunk_rows(n_reg, dim, block, np.dtype(dtype).itemsize)
        out["regions"] = ArraySpec((n, n_reg, dim), dtype, (rc, n_reg, dim), 0)
        if is_gallery(meta):
            out.update({k: ArraySpec(*v) for k, v in gallery_array_specs(meta, total_tokens,
                                                                         rc).items()})
    out["pooled"] = ArraySpec((n, pdim), "float32", (min(block, n), pdim), 0)
    out["done"] = ArraySpec((n,), "bool", rows, False)
    out["errors"] = ArraySpec((n,), str, rows, "")
    out["presence"] = ArraySpec((n,), "uint8", rows, ABSENT)
    check_codec(codec)
    return {k: v._replace(codec=codec) if np.dtype(v.dtype).kind == "f" else v
            for k, v in out.items()}


# -- validators -------------------------------------------------------------------------------


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
    if version > READ_FORMAT:
        raise StoreFormatError(f"{where} has format {version}, newer than this embedstore "
                               f"understands ({READ_FORMAT}); upgrade embedstore "
                               "(pip install -U embedstore-fusion)")
    if version < 1:
        raise StoreFormatError(f"{where} has format {version}; only format 1 exists")
    _field(meta, "n_items", int, where)
    folds = _field(meta, "folds", dict, where)
    for key, typ in (("k", int), ("seed", int), ("holdout", (int, float))):
        _field(folds, key, typ, f"{where} folds")
    if folds.get("grouped") is not None:  # optional: folds made by groups (docs/format.md §2)
        _field(folds, "grouped", bool, f"{where} folds")
    if folds.get("group_col") is not None:
        _field(folds, "group_col", str, f"{where} folds")
    if version >= 2:
        segs = _field(meta, "segments", list, where)
        start = 0
        for seg in segs:
            if not isinstance(seg, dict) or seg.get("start") != start or not isinstance(
                    seg.get("n_items"), int) or not isinstance(seg.get("id"), int):
                raise StoreFormatError(f"{where}: segment entry {seg!r} is not "
                                       f"{{'id', 'start' = {start}, 'n_items'}}; the store's "
                                       "manifest is damaged")
            start += seg["n_items"]
        if not segs or segs[0]["id"] != 0 or start != meta["n_items"]:
            raise StoreFormatError(f"{where}: segments cover {start} rows from id "
                                   f"{segs[0]['id'] if segs else None}, n_items is "
                                   f"{meta['n_items']}; the store's manifest is damaged")
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
    if modality not in MODALITIES:
        raise StoreFormatError(f"{where}: modality must be 'text' or 'image', found {modality!r}")
    kind = _field(meta, "kind", str, where)
    expected = main_array(modality)
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


# -- layout rules -----------------------------------------------------------------------------


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

