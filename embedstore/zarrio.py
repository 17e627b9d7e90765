"""Zarr-level helpers under the feature-set reader, the writer and :class:`Store`.

* :func:`array_kwargs` / :func:`codecs`: the options of every array (zstd or Blosc-LZ4, then
  crc32c; every chunk written);
* :func:`read_array` / :func:`read_error`: whole-array reads whose failures name the array and
  the first bad chunk; :func:`io_call`: storage failures as one :class:`StoreIOError`;
* :class:`Location`: a store URL opened as a Zarr store, with the operations every layer above
  needs (open a group, mark arrays strict, consolidate the metadata, read a group's live
  ``generation``, size of a path).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import zarr
import zarr.codecs

from . import _storage
from .errors import EmbedStoreError, StoreCorruptError, StoreFormatError, StoreIOError
from .format import ATTRS_KEY, check_codec

__all__ = ["Location", "array_kwargs", "codecs", "create_arrays", "io_call", "read_array",
           "read_error"]

T = TypeVar("T")


def codecs(codec: str = "zstd", itemsize: int = 1) -> list:
    """Compression + checksum of an array (``codec``: one of
    :data:`embedstore.format.FLOAT_CODECS`): zstd level 1, or Blosc with LZ4 and no shuffle
    (``itemsize``: the dtype's bytes), then a crc32c of the compressed chunk, so a flipped byte
    is detected on read. The chain is recorded in each array's metadata: readers need no
    option to read either."""
    if check_codec(codec) == "lz4":
        comp = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle",
                                      typesize=itemsize, blocksize=0)
    else:
        comp = zarr.codecs.ZstdCodec(level=1)
    return [comp, zarr.codecs.Crc32cCodec()]


def array_kwargs(codec: str = "zstd", itemsize: int = 1) -> dict[str, Any]:
    """Options of an array: checksummed codecs, and every chunk written even when it holds
    only fill values, so that a chunk missing from a complete array means lost data."""
    return {"compressors": codecs(codec, itemsize), "config": {"write_empty_chunks": True}}


def create_arrays(group: zarr.Group, specs: dict, data: dict[str, Any] | None = None, *,
                  overwrite: bool = False) -> None:
    """Create the arrays ``specs`` (name -> :class:`embedstore.format.ArraySpec`) in ``group``,
    writing ``data[name]`` into those that have some."""
    for name, spec in specs.items():
        extra = {} if spec.fill_value is None else {"fill_value": spec.fill_value}
        kw = array_kwargs(spec.codec, np.dtype(spec.dtype).itemsize)
        arr = group.create_array(name, shape=spec.shape, dtype=spec.dtype, chunks=spec.chunks,
                                 overwrite=overwrite, **extra, **kw)
        if data is not None and name in data:
            arr[...] = data[name]


def io_call(fn: Callable[[], T], what: str) -> T:
    """Run a storage operation; storage failures (disk full, permission denied, connection
    lost) become one :class:`StoreIOError` that says finished rows are kept."""
    with _storage.io_errors(lambda why: f"cannot {what}: {why}; rows finished before are "
                            "kept: fix the cause (disk space, permissions, network) and re-run "
                            "with --resume"):
        return fn()


def read_array(arr, what: str) -> np.ndarray:
    """Read a whole Zarr array; a failure names the array and the first bad chunk."""
    try:
        return np.asarray(arr[...])
    except EmbedStoreError:
        raise
    except Exception as e:  # noqa: BLE001 - zarr raises various errors for bad chunks
        raise read_error(arr, what, slice(None), e) from None


def read_error(arr, what: str, sel: slice, e: BaseException) -> EmbedStoreError:
    """Turn a failed read of ``arr[sel]`` into one line naming the array and the chunk."""
    if _storage.is_io_error(e):
        return StoreIOError(f"cannot read array {what!r}: {_storage.describe(e)}; check the "
                            "storage/network and retry")
    step = max(1, int(arr.chunks[0]))
    n = int(arr.shape[0])
    start, stop, _ = sel.indices(n)
    for c in range(start // step, -(-stop // step)):
        lo, hi = c * step, min(n, (c + 1) * step)
        try:
            arr[lo:hi]
        except EmbedStoreError as inner:
            return inner
        except Exception as inner:  # noqa: BLE001
            key = f"{arr.path}/c/{c}" + "/0" * (arr.ndim - 1)
            return StoreCorruptError(
                f"array {what!r}, chunk {c} (key {key!r}, rows {lo}..{hi - 1}) cannot be decoded: "
                f"{_storage.describe(inner)}; the store is damaged (run `embedstore verify`; "
                "re-extract the feature set with --overwrite)")
    return StoreCorruptError(f"array {what!r} cannot be read: {_storage.describe(e)}; the store "
                             "is damaged (run `embedstore verify`)")


class Location:
    """A store URL opened as a (strict) Zarr store; ``read_only`` for ``mode="r"``."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None, *,
                 read_only: bool):
        self.url = os.fspath(url)
        self.storage_options = storage_options
        self.zstore = _storage.zarr_store(self.url, read_only=read_only,
                                          storage_options=storage_options)

    # -- groups ------------------------------------------------------------------------------
    def open_root(self, mode: str) -> zarr.Group:
        """The root group; ``mode="r"`` reads the consolidated metadata (one request)."""
        try:
            return zarr.open_group(store=self.zstore, mode=mode, zarr_format=3,
                                   use_consolidated=None if mode == "r" else False)
        except EmbedStoreError:
            raise
        except Exception as e:  # noqa: BLE001
            if _storage.is_io_error(e):
                raise StoreIOError(f"cannot read {self.url!r}: {_storage.describe(e)}") from None
            raise StoreFormatError(f"{self.url!r} is not a readable Zarr v3 group "
                                   f"({_storage.describe(e)})") from None

    def open_group(self, path: str, mode: str = "r") -> zarr.Group:
        """The group at ``path`` as stored now (live metadata, never the consolidated copy)."""
        return zarr.open_group(store=self.zstore, path=path, mode=mode, use_consolidated=False,
                               zarr_format=3)

    def live_generation(self, path: str, name: str) -> str | None:
        """The ``generation`` of the feature-set group at ``path`` as stored now (None: no
        group there, or metadata that is not a feature set's)."""
        try:
            g = self.open_group(path)
        except FileNotFoundError:  # zarr's GroupNotFoundError is one
            return None
        except Exception as e:  # noqa: BLE001
            if _storage.is_io_error(e):
                raise StoreIOError(f"cannot read feature set {name!r} in {self.url!r}: "
                                   f"{_storage.describe(e)}; check the storage/network") from None
            return None  # unparsable metadata: not the set we opened
        meta = g.attrs.get(ATTRS_KEY)
        return meta.get("generation") if isinstance(meta, dict) else None

    # -- strict reads ------------------------------------------------------------------------
    def mark_complete(self, prefix: str) -> None:
        """Every chunk under ``prefix`` exists: reading a missing one is an error, not zeros."""
        self.zstore.strict.add(prefix)

    def keep_complete(self, prefixes: set[str]) -> None:
        """Forget every strict prefix but ``prefixes`` (after a refresh)."""
        self.zstore.strict.keep_only(prefixes)

    # -- consolidated metadata ---------------------------------------------------------------
    def consolidated_is_current(self) -> bool:
        """Does the root ``zarr.json``'s snapshot equal the live metadata of every node?"""
        _storage.invalidate(self.zstore)
        cons = zarr.open_group(store=self.zstore, mode="r", use_consolidated=True,
                               zarr_format=3)
        snap = cons.metadata.consolidated_metadata
        if snap is None:
            return False
        live = zarr.open_group(store=self.zstore, mode="r", use_consolidated=False,
                               zarr_format=3)
        want = {path: node.metadata.to_dict() for path, node in live.members(max_depth=None)}
        got = {path: m.to_dict() for path, m in snap.flattened_metadata.items()}
        for d in (*want.values(), *got.values()):
            d.pop("consolidated_metadata", None)
        return want == got

    def consolidate(self) -> None:
        """Rewrite the consolidated metadata, then check it against the live metadata and redo
        it if another writer changed something meanwhile (last writer wins otherwise: its
        snapshot could lack the other's change)."""
        last: Exception | None = None
        for attempt in range(6):
            try:
                _storage.invalidate(self.zstore)
                zarr.consolidate_metadata(self.zstore, zarr_format=3)
                if self.consolidated_is_current():
                    return
            except Exception as e:  # noqa: BLE001 - a group renamed under our walk: retry
                if not (_storage.is_io_error(e) or isinstance(e, KeyError)):
                    raise
                last = e
            time.sleep(0.02 * (attempt + 1))
        if last is not None:
            raise StoreIOError(f"cannot write the consolidated metadata of {self.url!r}: "
                               f"{_storage.describe(last)}; fix the storage and re-run with "
                               "--resume (the data written so far is kept)")

    # -- objects -----------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return _storage.exists(self.url, self.storage_options, key)

    def nbytes(self, path: str) -> int:
        """Bytes stored under ``path`` (0 when it cannot be measured)."""
        return _storage.nbytes(self.url, self.storage_options, path)
