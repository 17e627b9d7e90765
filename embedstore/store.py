"""Open stores: one dataset (ids, labels, canonical folds) + its feature sets.

:class:`Store` sits on top of the feature-set reader (:mod:`embedstore.features`) and writer
(:mod:`embedstore._writer`); creating a store is :mod:`embedstore.create`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from . import _storage
from ._writer import FeatureWriter
from .errors import (
    FeatureExistsError,
    FeatureNotFoundError,
    InvalidInputError,
    StoreCorruptError,
    StoreIOError,
    StoreNotFoundError,
)
from .features import FeatureSet
from .format import ATTRS_KEY, ROOT_ARRAYS, parse_root_attrs, segment_path
from .loader import BatchLoader
from .overwrite import finish_interrupted_swaps
from .segments import SegmentedFeatureSet
from .zarrio import Location, read_array

__all__ = ["Store", "open_store", "store_exists", "protocol_read_only"]


def protocol_read_only(url: str) -> bool:
    return _storage.protocol(url) in _storage.READ_ONLY_PROTOCOLS


def store_exists(url: str, storage_options: dict | None) -> bool:
    """Is there a root ``zarr.json`` at ``url``? Unreachable storage is one clear error."""
    try:
        return _storage.exists(url, storage_options, "zarr.json")
    except InvalidInputError:
        raise
    except Exception as e:  # noqa: BLE001 - report any backend failure as one line
        raise StoreNotFoundError(f"cannot reach {url!r}: {_storage.describe(e)}; check the URL, "
                                 "the network and the credentials (--storage-option / AWS_* "
                                 "environment variables)") from None


def open_store(url: str | os.PathLike, mode: str = "r", *,
               storage_options: dict | None = None) -> Store:
    """Open an existing store (local path or fsspec URL). ``mode`` is ``"r"`` or ``"r+"``.

    Read-only stores are opened from the consolidated metadata in the root ``zarr.json``: one
    request, whatever the number of arrays. ``r+`` (writers) reads the live metadata instead.
    """
    url = os.fspath(url)
    if mode not in ("r", "r+"):
        raise InvalidInputError(f"mode must be 'r' or 'r+', got {mode!r}")
    if mode == "r+" and protocol_read_only(url):
        raise InvalidInputError(f"{url!r} is read-only ({_storage.protocol(url)}:// cannot be "
                                "written); open it with mode='r', or copy the store to a "
                                "writable location")
    if not store_exists(url, storage_options):
        raise StoreNotFoundError(f"no store at {url!r}; check the path/URL, or create one with "
                                 "`embedstore extract CATALOG --store URL`")
    loc = Location(url, storage_options, read_only=(mode == "r"))
    store = Store(loc, loc.open_root(mode), mode=mode)
    if mode == "r+":  # repair what a writer that died mid-way left behind
        if not finish_interrupted_swaps(store):
            try:
                current = loc.consolidated_is_current()
            except Exception:  # noqa: BLE001 - consolidate() retries and reports storage errors
                current = False
            if not current:
                store.consolidate()
    return store


class Store:
    """An open store. Cheap to create; arrays are read lazily and cached.

    ``location`` is the URL opened as a Zarr store; ``group`` the root Zarr group.
    """

    def __init__(self, location: Location, root: zarr.Group, *, mode: str,
                 segment0: bool = False):
        self.location = location
        self.url = location.url
        self.storage_options = location.storage_options
        self.mode = mode
        self.group = root
        attrs = dict(root.attrs)
        if isinstance(attrs.get(ATTRS_KEY), dict) and attrs[ATTRS_KEY].get("creating"):
            raise StoreNotFoundError(
                f"the store at {self.url!r} is not finished: its creation is running in another "
                "process or was interrupted; run the same `embedstore extract` again to finish "
                "it")
        self.meta = parse_root_attrs(attrs, self.url)
        if segment0 and self.meta.get("segments"):  # the root arrays alone, as format 1
            self.meta = {**{k: v for k, v in self.meta.items() if k != "segments"},
                         "format": 1, "n_items": self.meta["segments"][0]["n_items"]}
        self.n_items: int = self.meta["n_items"]
        self._cache: dict[str, np.ndarray] = {}
        if self.meta.get("all_chunks"):  # written whole at creation: missing chunk = lost data
            for name in ROOT_ARRAYS:
                location.mark_complete(f"{name}/")
        self.segment_stores = self._open_segments()
        self.features = FeatureSets(self)

    def _open_segments(self) -> list[Store]:
        """Format 2: the appended segments (each a format-1 store), in row order."""
        out = []
        for seg in (self.meta.get("segments") or [])[1:]:
            url = f"{self.url.rstrip('/')}/{segment_path(seg['id'])}"
            loc = Location(url, self.storage_options, read_only=(self.mode == "r"))
            part = Store(loc, loc.open_root(self.mode), mode=self.mode)
            if part.n_items != seg["n_items"]:
                raise StoreCorruptError(f"segment {seg['id']} of {self.url!r} has "
                                        f"{part.n_items} rows, the manifest says "
                                        f"{seg['n_items']}; the store is damaged")
            out.append(part)
        return out

    def parts(self) -> list[Store]:
        """One format-1 store per segment, in row order (``[self]`` for a format-1 store)."""
        if not self.segment_stores:
            return [self]
        return [Store(self.location, self.group, mode=self.mode, segment0=True),
                *self.segment_stores]

    @property
    def segments(self) -> list[dict]:
        """The manifest: ``[{"id", "start", "n_items", ...}]`` (one entry for format 1)."""
        return list(self.meta.get("segments") or [
            {"id": 0, "start": 0, "n_items": self.n_items}])

    def __repr__(self) -> str:
        return (f"Store({self.url!r}, n_items={self.n_items}, "
                f"features={list(self.features)})")

    # -- dataset -------------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            try:
                arr = self.group[name]
            except KeyError:
                raise StoreCorruptError(f"store {self.url!r} lacks the {name!r} array; it is "
                                        "damaged: re-create it with `embedstore extract`") from None
            data = read_array(arr, name)
            if self.segment_stores:  # format 2: the segments' rows follow segment 0's
                data = np.concatenate([data] + [p._segment_array(name)
                                                for p in self.segment_stores])
            self._cache[name] = data
        return self._cache[name]

    def _segment_array(self, name: str) -> np.ndarray:
        """Array ``name`` of this segment; an unlabelled segment's labels are -1 and its
        ``groups`` empty strings (docs/format.md §2.2)."""
        if name == "labels" and self.meta.get("classes") is None:
            return np.full(self.n_items, -1, np.int32)
        if name == "groups" and not self.meta["folds"].get("grouped"):
            return np.array([""] * self.n_items, dtype=self.ids.dtype)
        return self._array(name)

    @property
    def ids(self) -> np.ndarray:
        return self._array("ids")

    @property
    def labels(self) -> np.ndarray | None:
        if self.meta.get("classes") is None:
            return None
        return self._array("labels")

    @property
    def classes(self) -> list[Any] | None:
        return self.meta.get("classes")

    @property
    def folds(self) -> np.ndarray:
        return self._array("folds")

    @property
    def groups(self) -> np.ndarray | None:
        """The group of each item (strings) when the folds were made by groups, else None."""
        return self._array("groups") if self.meta["folds"].get("grouped") else None

    @property
    def fold_info(self) -> dict:
        return dict(self.meta["folds"])

    @property
    def fingerprint(self) -> str:
        return self.meta["dataset"]["fingerprint"]

    @property
    def folds_fingerprint(self) -> str:
        return self.meta["folds"]["fingerprint"]

    def row_of(self, ids: Sequence[Any]) -> np.ndarray:
        index = {v: i for i, v in enumerate(self.ids.tolist())}
        try:
            return np.array([index[str(i)] for i in ids], dtype=np.int64)
        except KeyError as e:
            raise InvalidInputError(f"id {e.args[0]!r} is not in store {self.url!r}") from None

    # -- feature sets --------------------------------------------------------------------
    def feature_group(self, name: str) -> zarr.Group:
        """The Zarr group of feature set ``name`` (:class:`FeatureNotFoundError` listing the
        available ones when there is none)."""
        try:
            return self.group[f"features/{name}"]
        except KeyError:
            raise FeatureNotFoundError(
                f"feature set {name!r} is not in store {self.url!r}; available: "
                f"{sorted(self.features) or 'none'} (see `embedstore info`)") from None

    def feature_names(self) -> list[str]:
        """Names of the feature sets, sorted (pending replacements ``.<name>.new`` excluded)."""
        try:
            keys = list(self.group["features"].group_keys())
        except KeyError:
            return []
        except Exception as e:  # noqa: BLE001
            if _storage.is_io_error(e):
                raise StoreIOError(f"cannot list the feature sets of {self.url!r}: "
                                   f"{_storage.describe(e)}") from None
            raise
        return sorted(k for k in keys if not k.startswith("."))

    def create_feature(self, name: str, **kwargs) -> FeatureWriter:
        """Create a feature set and return its writer (see :class:`FeatureWriter`)."""
        self._require_writable()
        _check_name(name)
        if name in self.feature_names():
            existing = self.features[name]
            if existing.status == "complete" and not kwargs.get("overwrite"):
                raise FeatureExistsError(f"feature set {name!r} is complete in {self.url!r}; pass "
                                         "--overwrite to replace it, or --text-name/--image-name "
                                         "to add it under another name")
            if existing.status == "writing" and not kwargs.get("overwrite"):
                raise FeatureExistsError(f"feature set {name!r} in {self.url!r} is incomplete; "
                                         "pass --resume to finish it or --overwrite to restart")
        return FeatureWriter.create(self, name, **kwargs)

    def feature_writer(self, name: str) -> FeatureWriter:
        """Re-open an existing (usually incomplete) feature set for writing (resume)."""
        self._require_writable()
        return FeatureWriter.open(self, name)

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise InvalidInputError(f"store {self.url!r} is open read-only; open it with "
                                    "mode='r+' to write")

    def consolidate(self) -> None:
        """Rewrite the consolidated metadata (after every metadata change) and re-read the
        root."""
        self.location.consolidate()
        self.group = self.location.open_root(self.mode)

    def refresh(self) -> Store:
        """Re-read metadata (another process may have added, finished or replaced sets)."""
        self.group = self.location.open_root(self.mode)
        self.meta = parse_root_attrs(dict(self.group.attrs), self.url)
        self.location.keep_complete({f"{n}/" for n in ROOT_ARRAYS
                                     if self.meta.get("all_chunks")})
        self._cache.clear()
        self.segment_stores = self._open_segments()
        self.features = FeatureSets(self)
        return self

    def loader(self, rows: Sequence[int] | np.ndarray, **kwargs) -> BatchLoader:
        """Padded batches over ``rows``; see :class:`embedstore.loader.BatchLoader`."""
        return BatchLoader(self, rows, **kwargs)


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise InvalidInputError(f"feature set name {name!r} is not valid; use letters, digits, "
                                "'-', '_' or '.', not starting with '.'")


class FeatureSets(Mapping):
    """``store.features``: name -> :class:`FeatureSet`, opened once and kept."""

    def __init__(self, store: Store):
        self._store = store
        self._open: dict[str, FeatureSet] = {}

    def __getitem__(self, name: str) -> FeatureSet:
        if name not in self._open:
            fs = FeatureSet(self._store, name, self._store.feature_group(name))
            if self._store.segment_stores:  # format 2: one part per segment
                segs = self._store.segments[1:]
                missing = [s["id"] for s, p in zip(segs, self._store.segment_stores,
                                                   strict=True) if name not in p.features]
                fs = SegmentedFeatureSet(self._store, name, [fs] + [
                    p.features[name] for p in self._store.segment_stores
                    if name in p.features], missing=missing)
            self._open[name] = fs
        return self._open[name]

    def forget(self, name: str) -> None:
        """Drop the kept reader of ``name`` (its writer changed it)."""
        self._open.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._store.feature_names())

    def __len__(self) -> int:
        return len(self._store.feature_names())

    def __contains__(self, name: object) -> bool:
        return name in self._store.feature_names()
