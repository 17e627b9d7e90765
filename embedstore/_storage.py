"""Storage plumbing under :mod:`embedstore.store` and :mod:`embedstore.features`.

* URLs -> Zarr stores: local paths and ``file://`` use zarr's ``LocalStore`` (atomic
  temp-file + rename writes); anything else goes through fsspec (``s3://``, ``gs://``,
  ``memory://``, ``http(s)://`` read-only) with the caller's ``storage_options``.
* :class:`StrictStore`: a missing chunk of a *complete* array is an error, not fill values.
* Exclusive creation of one key (the claim that makes "two writers create the same feature set"
  safe), removal and swap of a group, a test pause hook.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import WrapperStore

from .errors import EmbedStoreError, InvalidInputError, StoreCorruptError, StoreIOError

__all__ = [
    "PrefixSet",
    "StrictStore",
    "is_local",
    "local_path",
    "protocol",
    "zarr_store",
    "filesystem",
    "exists",
    "read",
    "nbytes",
    "put",
    "put_exclusive",
    "remove_prefix",
    "list_chunk_indices",
    "swap_group",
    "invalidate",
    "describe",
    "is_io_error",
    "test_pause",
]

READ_ONLY_PROTOCOLS = ("http", "https")
# Defaults under the user's storage options. Listings are never cached: other processes add
# and finish feature sets, and a cached listing would make this one consolidate a stale view.
# s3fs issues a HEAD before every GET when max_concurrency > 1 (to split big objects); chunks
# here are <= ~4 MiB, so that would only double the request count.
_NO_CACHE = {"use_listings_cache": False}
_DEFAULT_OPTIONS = {"s3": {**_NO_CACHE, "max_concurrency": 1},
                    "s3a": {**_NO_CACHE, "max_concurrency": 1},
                    "gs": _NO_CACHE, "gcs": _NO_CACHE, "abfs": _NO_CACHE, "az": _NO_CACHE}


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol(url) == "file"


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _options(url: str, storage_options: dict | None) -> dict:
    return {**_DEFAULT_OPTIONS.get(protocol(url), {}), **(storage_options or {})}


def _cannot_open(url: str, e: Exception) -> InvalidInputError:
    return InvalidInputError(
        f"cannot open {url!r}: {type(e).__name__}: {e}; install the fsspec backend for "
        f"{protocol(url)!r} (e.g. pip install 'embedstore-fusion[remote]') and check the "
        "--storage-option values")


def filesystem(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fsspec filesystem, root path)``; local stores get fsspec's local filesystem."""
    if is_local(url):
        return LocalFileSystem(), os.path.abspath(local_path(url))
    try:
        fs, root = fsspec.core.url_to_fs(url, **_options(url, storage_options))
    except (ImportError, ValueError, TypeError) as e:
        raise _cannot_open(url, e) from None
    return fs, root.rstrip("/")


class PrefixSet:
    """Key prefixes, safe to read from Zarr's I/O thread while another thread adds one: every
    change swaps in a new frozenset (copy on write) instead of mutating a shared set."""

    def __init__(self) -> None:
        self.items: frozenset[str] = frozenset()

    def add(self, prefix: str) -> None:
        self.items = self.items | {prefix}

    def keep_only(self, prefixes: set[str]) -> None:
        self.items = self.items & frozenset(prefixes)

    def matches(self, key: str) -> bool:
        return any(key.startswith(p) for p in self.items)


class StrictStore(WrapperStore):
    """Zarr store wrapper: reading a chunk key under one of ``strict`` prefixes that does not
    exist raises :class:`StoreCorruptError` instead of returning nothing (which Zarr would
    silently turn into fill values). Every chunk of a complete array exists (arrays are written
    with ``write_empty_chunks=True``), so a missing one is lost data."""

    def __init__(self, store, strict: PrefixSet | None = None, url: str = ""):
        super().__init__(store)
        self.strict = strict if strict is not None else PrefixSet()
        self.url = url

    def _with_store(self, store):
        return type(self)(store, self.strict, self.url)

    async def get(self, key: str, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None and "/c/" in key and self.strict.matches(key):
            array = key.split("/c/", 1)[0]
            raise StoreCorruptError(
                f"chunk {key!r} of array {array!r} is missing in {self.url!r}, but the array is "
                "complete: its data was lost (run `embedstore verify`; re-extract the feature "
                "set with --overwrite)")
        return buf


def invalidate(zstore) -> None:
    """Drop any listing cache of the filesystem under a Zarr store (before walking it)."""
    fs = getattr(getattr(zstore, "_store", zstore), "fs", None)
    if fs is not None:
        fs.invalidate_cache()


def zarr_store(url: str, *, read_only: bool, storage_options: dict | None) -> StrictStore:
    url = os.fspath(url)
    if is_local(url):
        return StrictStore(zarr.storage.LocalStore(local_path(url), read_only=read_only),
                           url=url)
    if protocol(url) in READ_ONLY_PROTOCOLS:
        read_only = True
    try:
        inner = zarr.storage.FsspecStore.from_url(
            url, storage_options=_options(url, storage_options) or None, read_only=read_only)
    except (ImportError, ValueError, TypeError) as e:
        raise _cannot_open(url, e) from None
    return StrictStore(inner, url=url)


def exists(url: str, storage_options: dict | None, key: str) -> bool:
    fs, root = filesystem(url, storage_options)
    fs.invalidate_cache()
    return bool(fs.exists(f"{root}/{key}"))


def read(url: str, storage_options: dict | None, key: str) -> bytes:
    """The bytes of ``key``; ``FileNotFoundError`` when it does not exist."""
    fs, root = filesystem(url, storage_options)
    return fs.cat_file(f"{root}/{key}")


def nbytes(url: str, storage_options: dict | None, path: str) -> int:
    """Bytes stored under ``path`` (0 when it cannot be measured)."""
    fs, root = filesystem(url, storage_options)
    try:
        return int(fs.du(f"{root}/{path}"))
    except (OSError, EmbedStoreError):
        return 0


def put_exclusive(url: str, storage_options: dict | None, key: str, data: bytes) -> None:
    """Write ``key`` only if it does not exist; raise ``FileExistsError`` if it does.

    Local: hard link of a complete temp file (atomic, also on NFS). S3: a conditional PUT
    (``If-None-Match: *``), atomic on AWS S3, MinIO and moto. Other fsspec backends: an
    existence check then a write, which is *not* atomic (documented in docs/reliability.md).
    """
    fs, root = filesystem(url, storage_options)
    path = f"{root}/{key}"
    if is_local(url):
        tmp = _write_temp(path, data)
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
        return
    if protocol(url) in ("s3", "s3a"):
        fs.pipe_file(path, data, mode="create")  # FileExistsError on HTTP 412
    else:
        fs.invalidate_cache()
        if fs.exists(path):
            raise FileExistsError(path)
        fs.pipe_file(path, data)
    fs.invalidate_cache()


def _write_temp(path: str, data: bytes) -> str:
    """``data`` complete in a uniquely named sibling of ``path``; returns its name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp


def put(url: str, storage_options: dict | None, key: str, data: bytes) -> None:
    """Write ``key`` whole (local: a temp file renamed over it, so no reader sees half)."""
    fs, root = filesystem(url, storage_options)
    path = f"{root}/{key}"
    if is_local(url):
        os.replace(_write_temp(path, data), path)
        return
    fs.pipe_file(path, data)
    fs.invalidate_cache()


def remove_prefix(url: str, storage_options: dict | None, prefix: str,
                  keep: tuple[str, ...] = ()) -> None:
    """Delete ``prefix`` (a group path) and everything under it, or only its children not in
    ``keep``."""
    fs, root = filesystem(url, storage_options)
    base = f"{root}/{prefix}"
    fs.invalidate_cache()
    if not fs.isdir(base):
        return
    doomed = [p for p in fs.ls(base, detail=False)
              if p.rstrip("/").rsplit("/", 1)[-1] not in keep]
    for p in doomed:
        _rm_tree(fs, p)
    if not keep:
        _rm_tree(fs, base)
    fs.invalidate_cache()


def _rm_tree(fs, path: str) -> None:
    """Remove ``path`` and everything under it; what another process removes meanwhile is not
    an error."""
    for _ in range(3):
        try:
            fs.rm(path, recursive=True)
            return
        except FileNotFoundError:
            fs.invalidate_cache()
            if not fs.exists(path):
                return


def list_chunk_indices(url: str, storage_options: dict | None, array_path: str) -> set[int]:
    """First chunk index of every chunk key stored for ``array_path`` (arrays here are chunked
    along axis 0 only, so this names each chunk). Temporary files are not chunks."""
    fs, root = filesystem(url, storage_options)
    base = f"{root}/{array_path}/c/"
    fs.invalidate_cache()
    out: set[int] = set()
    for p in fs.find(base):
        parts = p[len(base) :].split("/")
        if all(x.isdigit() for x in parts):  # not a .partial temp
            out.add(int(parts[0]))
    return out


def swap_group(url: str, storage_options: dict | None, src: str, dst: str,
               placeholder: bytes | None = None) -> None:
    """Replace group ``dst`` by group ``src`` (an overwrite).

    Local: two directory renames (``dst`` -> ``.<name>.old``, ``src`` -> ``dst``); a reader
    sees the old or the new directory, or for an instant none. Object stores have no rename:
    ``dst/zarr.json`` is first replaced by ``placeholder`` (the new metadata marked
    incomplete), so readers of the old set fail their generation check from then on instead of
    reading a half-deleted set; then the rest of ``dst`` is deleted, ``src`` is copied object by
    object with its ``zarr.json`` last (the commit), and ``src`` is deleted. A process that dies
    in between leaves ``src`` complete: the swap is redone from the start.
    """
    fs, root = filesystem(url, storage_options)
    s, d = f"{root}/{src}", f"{root}/{dst}"
    if is_local(url):
        old = os.path.join(os.path.dirname(d), f".{os.path.basename(d)}.old")
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(d):
            os.rename(d, old)
        test_pause("swap")
        os.rename(s, d)
        shutil.rmtree(old, ignore_errors=True)
        return
    fs.invalidate_cache()
    if placeholder is not None:
        fs.pipe_file(f"{d}/zarr.json", placeholder)
    elif fs.exists(f"{d}/zarr.json"):
        fs.rm_file(f"{d}/zarr.json")
    fs.invalidate_cache()
    rest = [p for p in fs.find(d) if p != f"{d}/zarr.json"]
    if rest:
        fs.rm(rest)
    test_pause("swap")
    fs.invalidate_cache()
    files = [p for p in fs.find(s) if p != f"{s}/zarr.json"]
    if files:
        fs.copy(files, [d + p[len(s) :] for p in files])
    fs.copy(f"{s}/zarr.json", f"{d}/zarr.json")
    fs.invalidate_cache()
    fs.rm(fs.find(s))
    fs.invalidate_cache()


_IO_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "gcsfs",
               "s3fs", "fsspec", "adlfs", "azure")


def is_io_error(e: BaseException) -> bool:
    """Storage/network failures (disk full, permission, connection) as opposed to bad data."""
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    return any(c.__module__.split(".")[0] in _IO_MODULES for c in type(e).__mro__[:-2])


def describe(e: BaseException) -> str:
    msg = str(e).replace("\n", " ").strip()
    return f"{type(e).__name__}: {msg[:300]}"


@contextmanager
def io_errors(message: Callable[[str], str]) -> Iterator[None]:
    """A storage failure (disk full, permission, connection) inside the block becomes one
    :class:`StoreIOError` whose text is ``message(describe(error))``; our own errors and bad
    data pass through unchanged."""
    try:
        yield
    except EmbedStoreError:
        raise
    except Exception as e:  # noqa: BLE001
        if not is_io_error(e):
            raise
        raise StoreIOError(message(describe(e))) from None


def test_pause(point: str, arg: Any = None) -> None:
    """Test hook: ``EMBEDSTORE_TEST_PAUSE=point[:arg][,...]`` stops the process at that point
    (e.g. ``after_data:3``, ``finalize``, ``swap``) so a test can kill it or act meanwhile.

    On reaching a point it writes ``EMBEDSTORE_TEST_PAUSE <point>[:<arg>]`` to stderr, then
    waits until the file named by ``EMBEDSTORE_TEST_RELEASE`` exists (or 600 s). Not for users.
    """
    spec = os.environ.get("EMBEDSTORE_TEST_PAUSE")
    if not spec:
        return
    here = point if arg is None else f"{point}:{arg}"
    if here not in [s.strip() for s in spec.split(",")]:
        return
    sys.stderr.write(f"EMBEDSTORE_TEST_PAUSE {here}\n")
    sys.stderr.flush()
    release = os.environ.get("EMBEDSTORE_TEST_RELEASE")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if release and os.path.exists(release):
            return
        time.sleep(0.05)
