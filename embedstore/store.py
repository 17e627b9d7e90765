"""Create and open stores: one dataset (ids, labels, canonical folds) + its feature sets."""

from __future__ import annotations

import datetime as _dt
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from . import __version__
from .errors import (
    FeatureExistsError,
    FeatureNotFoundError,
    InvalidInputError,
    StoreCorruptError,
    StoreExistsError,
    StoreFormatError,
    StoreNotFoundError,
)
from .format import (
    ATTRS_KEY,
    FORMAT_VERSION,
    fingerprint_folds,
    fingerprint_ids,
    parse_root_attrs,
)

__all__ = ["Store", "create_store", "open_store", "make_folds", "codecs"]

warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
warnings.filterwarnings("ignore", message=".*vlen-utf8.*")
warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3.*")


def codecs() -> list:
    """Compression + checksum for every array: zstd, then a crc32c of the compressed chunk, so a
    flipped byte is detected on read."""
    return [zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _zarr_store(url: str, *, read_only: bool, storage_options: dict | None):
    url = os.fspath(url)
    if _is_local(url):
        return zarr.storage.LocalStore(_local_path(url), read_only=read_only)
    try:
        return zarr.storage.FsspecStore.from_url(
            url, storage_options=storage_options or None, read_only=read_only
        )
    except (ImportError, ValueError) as e:
        proto = url.split("://", 1)[0]
        raise InvalidInputError(
            f"cannot open {url!r}: {e}; install the fsspec backend for {proto!r} "
            f"(e.g. pip install 'embedstore-fusion[remote]')"
        ) from None


def _exists(url: str, storage_options: dict | None) -> bool:
    if _is_local(url):
        return os.path.exists(os.path.join(_local_path(url), "zarr.json"))
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    try:
        return fs.exists(path.rstrip("/") + "/zarr.json")
    except Exception as e:  # noqa: BLE001 - report any backend failure as one line
        raise StoreNotFoundError(f"cannot reach {url!r}: {type(e).__name__}: {e}") from None


def make_folds(labels: np.ndarray | None, n: int, *, k: int = 5, seed: int = 0,
               holdout: float = 0.2) -> tuple[np.ndarray, bool]:
    """Canonical fold per item: 0..k-1, or -1 for the holdout share.

    Stratified (scikit-learn) when labels are given and every class has enough items; otherwise
    a seeded shuffle. Returns ``(folds int8 [N], stratified)``.
    """
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    if k < 2:
        raise InvalidInputError(f"folds must be >= 2, got {k}; pass --folds 5 (or any k >= 2)")
    if not 0 <= holdout < 1:
        raise InvalidInputError(f"holdout must be in [0, 1), got {holdout}; pass e.g. --holdout 0.2")
    idx = np.arange(n)
    folds = np.full(n, -1, dtype=np.int8)
    stratified = False
    if labels is not None:
        counts = np.bincount(labels)
        counts = counts[counts > 0]
        stratified = bool(len(counts) > 1 and counts.min() >= 2)
    n_hold = int(round(holdout * n))
    if n_hold > 0:
        strat = labels if stratified else None
        try:
            train_idx, _ = train_test_split(idx, test_size=n_hold, random_state=seed,
                                            stratify=strat)
        except ValueError:  # too few items per class for a stratified holdout
            train_idx, _ = train_test_split(idx, test_size=n_hold, random_state=seed)
            stratified = False
    else:
        train_idx = idx
    if len(train_idx) < k:
        raise InvalidInputError(f"{len(train_idx)} trainable items cannot be split into {k} "
                                "folds; lower --folds or --holdout")
    parts = None
    if stratified:
        tr_counts = np.bincount(labels[train_idx])
        if tr_counts[tr_counts > 0].min() >= k:
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
            parts = splitter.split(train_idx, labels[train_idx])
        else:
            stratified = False
    if parts is None:
        parts = KFold(n_splits=k, shuffle=True, random_state=seed).split(train_idx)
    for f, (_, test) in enumerate(parts):
        folds[train_idx[test]] = f
    return folds, stratified


def _encode_labels(labels: Sequence[Any], n: int, classes: Sequence[Any] | None):
    labels = list(labels)
    if len(labels) != n:
        raise InvalidInputError(f"labels has {len(labels)} values but there are {n} ids; "
                                "pass one label per id")
    for i, v in enumerate(labels):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise InvalidInputError(f"label of item {i} is missing (NaN/None); drop the item or "
                                    "give it a label")
    if classes is None:
        uniq = set(labels)
        try:
            classes = sorted(uniq)
        except TypeError:  # mixed types: order by their string form, stable
            classes = sorted(uniq, key=lambda v: (type(v).__name__, str(v)))
    classes = [c.item() if isinstance(c, np.generic) else c for c in classes]
    index = {c: j for j, c in enumerate(classes)}
    try:
        codes = np.array([index[v] for v in labels], dtype=np.int32)
    except KeyError as e:
        raise InvalidInputError(f"label {e.args[0]!r} is not in classes; add it to classes") from None
    return codes, classes


def create_store(url: str | os.PathLike, ids: Sequence[Any], labels: Sequence[Any] | None = None,
                 *, classes: Sequence[Any] | None = None, folds: int = 5, seed: int = 0,
                 holdout: float = 0.2, source: str | None = None,
                 storage_options: dict | None = None, overwrite: bool = False) -> Store:
    """Create a store for a dataset: ids (unique), optional labels, canonical stratified folds.

    Nothing is written unless every input is valid; ``zarr.json`` of the root is written last,
    so a store whose creation was interrupted is not mistaken for a valid one.
    """
    url = os.fspath(url)
    if _exists(url, storage_options):
        if not overwrite:
            raise StoreExistsError(f"a store already exists at {url!r}; open it to add feature "
                                   "sets, or pass overwrite=True (--overwrite) to replace it")
    ids_arr = np.asarray([str(i) for i in ids], dtype=object)
    n = len(ids_arr)
    if n == 0:
        raise InvalidInputError("the id list is empty; a store needs at least one item")
    kinds = {type(i).__name__ for i in ids}
    if len(kinds) > 1:
        raise InvalidInputError(f"ids mix types ({', '.join(sorted(kinds))}); make them all "
                                "strings (or all ints) so '1' and 1 cannot collide")
    uniq, counts = np.unique(ids_arr.astype(str), return_counts=True)
    if len(uniq) != n:
        dup = uniq[counts > 1][:5].tolist()
        raise InvalidInputError(f"ids are not unique: {dup} appear more than once; "
                                "de-duplicate the catalog")
    codes = None
    if labels is not None:
        codes, classes = _encode_labels(labels, n, classes)
    fold_arr, stratified = make_folds(codes, n, k=folds, seed=seed, holdout=holdout)
    zstore = _zarr_store(url, read_only=False, storage_options=storage_options)
    root = zarr.open_group(store=zstore, mode="w")
    kw = {"compressors": codecs()}
    a = root.create_array("ids", shape=(n,), dtype=str, chunks=(min(n, 65536),), **kw)
    a[:] = ids_arr.astype(str)
    if codes is not None:
        root.create_array("labels", shape=(n,), dtype="int32", chunks=(min(n, 262144),),
                          **kw)[:] = codes
    root.create_array("folds", shape=(n,), dtype="int8", chunks=(min(n, 262144),),
                      **kw)[:] = fold_arr
    root.create_group("features")
    meta = {
        "format": FORMAT_VERSION,
        "n_items": n,
        "created": _now(),
        "versions": {"embedstore": __version__, "zarr": zarr.__version__},
        "dataset": {"source": source, "fingerprint": fingerprint_ids(ids_arr, codes)},
        "classes": list(classes) if codes is not None else None,
        "folds": {"k": folds, "seed": seed, "holdout": holdout, "stratified": stratified,
                  "fingerprint": fingerprint_folds(fold_arr)},
    }
    root.attrs[ATTRS_KEY] = meta
    zarr.consolidate_metadata(zstore)
    return open_store(url, mode="r+", storage_options=storage_options)


def open_store(url: str | os.PathLike, mode: str = "r", *,
               storage_options: dict | None = None) -> Store:
    """Open an existing store (local path or fsspec URL). ``mode`` is ``"r"`` or ``"r+"``."""
    url = os.fspath(url)
    if mode not in ("r", "r+"):
        raise InvalidInputError(f"mode must be 'r' or 'r+', got {mode!r}")
    if not _exists(url, storage_options):
        raise StoreNotFoundError(f"no store at {url!r}; check the path/URL, or create one with "
                                 "`embedstore extract CATALOG --store URL`")
    zstore = _zarr_store(url, read_only=(mode == "r"), storage_options=storage_options)
    try:
        root = zarr.open_group(store=zstore, mode="r" if mode == "r" else "r+")
    except Exception as e:  # noqa: BLE001
        raise StoreFormatError(f"{url!r} is not a readable Zarr v3 group ({e})") from None
    return Store(url, root, zstore, mode=mode, storage_options=storage_options)


class Store:
    """An open store. Cheap to create; arrays are read lazily and cached."""

    def __init__(self, url: str, root: zarr.Group, zstore, *, mode: str,
                 storage_options: dict | None):
        self.url = url
        self.mode = mode
        self.storage_options = storage_options
        self._root = root
        self._zstore = zstore
        self.meta = parse_root_attrs(dict(root.attrs), url)
        self.n_items: int = self.meta["n_items"]
        self._cache: dict[str, np.ndarray] = {}
        self.features = _Features(self)

    def __repr__(self) -> str:
        return (f"Store({self.url!r}, n_items={self.n_items}, "
                f"features={list(self.features)})")

    # -- dataset -------------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            try:
                arr = self._root[name]
            except KeyError:
                raise StoreCorruptError(f"store {self.url!r} lacks the {name!r} array; it is "
                                        "damaged: re-create it with `embedstore extract`") from None
            self._cache[name] = read_array(arr, f"{name}")
        return self._cache[name]

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
    def _feature_group(self, name: str) -> zarr.Group:
        try:
            return self._root[f"features/{name}"]
        except KeyError:
            raise FeatureNotFoundError(
                f"feature set {name!r} is not in store {self.url!r}; available: "
                f"{sorted(self.features) or 'none'} (see `embedstore info`)") from None

    def _feature_names(self) -> list[str]:
        try:
            grp = self._root["features"]
        except KeyError:
            return []
        return sorted(k for k in grp.group_keys() if not k.startswith("."))

    def create_feature(self, name: str, **kwargs) -> FeatureWriter:
        """Create a feature set and return its writer (see :class:`FeatureWriter`)."""
        from .features import FeatureWriter

        self._require_writable()
        _check_name(name)
        if name in self._feature_names():
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
        from .features import FeatureWriter

        self._require_writable()
        return FeatureWriter.open(self, name)

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise InvalidInputError(f"store {self.url!r} is open read-only; open it with "
                                    "mode='r+' to write")

    def _consolidate(self) -> None:
        zarr.consolidate_metadata(self._zstore)
        self._root = zarr.open_group(store=self._zstore, mode="r+")

    def refresh(self) -> Store:
        """Re-read metadata (another process may have added or finished feature sets)."""
        self._root = zarr.open_group(store=self._zstore, mode="r" if self.mode == "r" else "r+")
        self.meta = parse_root_attrs(dict(self._root.attrs), self.url)
        self.features = _Features(self)
        return self

    def loader(self, rows: Sequence[int] | np.ndarray, **kwargs):
        """Padded batches over ``rows``; see :class:`embedstore.loader.BatchLoader`."""
        from .loader import BatchLoader

        return BatchLoader(self, rows, **kwargs)


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise InvalidInputError(f"feature set name {name!r} is not valid; use letters, digits, "
                                "'-', '_' or '.', not starting with '.'")


def read_array(arr, what: str) -> np.ndarray:
    """Read a whole Zarr array, turning codec failures into one-line corruption errors."""
    try:
        return np.asarray(arr[...])
    except Exception as e:  # noqa: BLE001 - zarr raises various errors for bad chunks
        raise StoreCorruptError(f"array {what!r} cannot be read: {type(e).__name__}: {e}; "
                                "the store is damaged (run `embedstore verify`)") from None


class _Features(Mapping):
    def __init__(self, store: Store):
        self._store = store
        self._open: dict[str, Any] = {}

    def __getitem__(self, name: str):
        from .features import FeatureSet

        if name not in self._open:
            self._open[name] = FeatureSet(self._store, name, self._store._feature_group(name))
        return self._open[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store._feature_names())

    def __len__(self) -> int:
        return len(self._store._feature_names())

    def __contains__(self, name: object) -> bool:
        return name in self._store._feature_names()


from .features import FeatureWriter  # noqa: E402  (type re-export for annotations)
