"""Create and open stores: one dataset (ids, labels, canonical folds) + its feature sets."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from . import __version__, _storage
from .errors import (
    EmbedStoreError,
    FeatureExistsError,
    FeatureNotFoundError,
    InvalidInputError,
    StoreCorruptError,
    StoreExistsError,
    StoreFormatError,
    StoreIOError,
    StoreNotFoundError,
)
from .format import (
    ATTRS_KEY,
    FORMAT_VERSION,
    fingerprint_folds,
    fingerprint_ids,
    parse_root_attrs,
)

__all__ = ["Store", "create_store", "open_store", "make_folds", "codecs", "array_kwargs",
           "read_array"]

warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
warnings.filterwarnings("ignore", message=".*vlen-utf8.*")
warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3.*")


def codecs() -> list:
    """Compression + checksum for every array: zstd, then a crc32c of the compressed chunk, so a
    flipped byte is detected on read."""
    return [zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()]


def array_kwargs() -> dict[str, Any]:
    """Options of every array: checksummed codecs, and every chunk written even when it holds
    only fill values, so that a chunk missing from a complete array means lost data."""
    return {"compressors": codecs(), "config": {"write_empty_chunks": True}}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# kept for callers that imported these helpers from here
_is_local = _storage.is_local
_local_path = _storage.local_path
_ROOT_ARRAYS = ("ids", "labels", "folds")
_ROOT_NAMES = ("ids", "labels", "folds", "features", "zarr.json")


def _zarr_store(url: str, *, read_only: bool, storage_options: dict | None):
    return _storage.zarr_store(os.fspath(url), read_only=read_only,
                               storage_options=storage_options)


def _exists(url: str, storage_options: dict | None) -> bool:
    """Is there a root ``zarr.json`` at ``url``? Unreachable storage is one clear error."""
    try:
        return _storage.exists(url, storage_options, "zarr.json")
    except InvalidInputError:
        raise
    except Exception as e:  # noqa: BLE001 - report any backend failure as one line
        raise StoreNotFoundError(f"cannot reach {url!r}: {_storage.describe(e)}; check the URL, "
                                 "the network and the credentials (--storage-option / AWS_* "
                                 "environment variables)") from None


def _read_root_attrs(url: str, storage_options: dict | None) -> dict | None:
    """The root group's attributes read straight from ``zarr.json`` (None if unparsable)."""
    fs, root = _storage.filesystem(url, storage_options)
    try:
        if fs is None:
            with open(os.path.join(root, "zarr.json"), "rb") as f:
                raw = f.read()
        else:
            raw = fs.cat_file(f"{root}/zarr.json")
        doc = json.loads(raw)
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return doc.get("attributes", {}) if isinstance(doc, dict) else {}


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
        raise InvalidInputError(f"holdout must be in [0, 1), got {holdout}; pass e.g. "
                                "--holdout 0.2")
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
        raise InvalidInputError(f"label {e.args[0]!r} is not in classes; add it to "
                                "classes") from None
    return codes, classes


def create_store(url: str | os.PathLike, ids: Sequence[Any], labels: Sequence[Any] | None = None,
                 *, classes: Sequence[Any] | None = None, folds: int = 5, seed: int = 0,
                 holdout: float = 0.2, source: str | None = None,
                 storage_options: dict | None = None, overwrite: bool = False) -> Store:
    """Create a store for a dataset: ids (unique), optional labels, canonical stratified folds.

    Nothing is written unless every input is valid. The root ``zarr.json`` first holds a
    ``creating`` marker (claimed exclusively) and gets its full attributes only after every
    array is written, so an interrupted creation is never mistaken for a store; creating the
    same dataset again (same ids, labels and fold options) finishes it.
    """
    url = os.fspath(url)
    if protocol_read_only(url):
        raise InvalidInputError(f"cannot create a store at {url!r}: {_storage.protocol(url)}:// "
                                "stores are read-only; create it locally or on s3://, gs://...")
    if not overwrite and _exists(url, storage_options):
        theirs = (_read_root_attrs(url, storage_options) or {}).get(ATTRS_KEY)
        if not (isinstance(theirs, dict) and theirs.get("creating")):
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
    fingerprint = fingerprint_ids(ids_arr, codes)
    fold_opts = {"k": folds, "seed": seed, "holdout": holdout}
    marker = {"format": FORMAT_VERSION, "creating": True, "created": _now(),
              "dataset": {"fingerprint": fingerprint}, "folds": fold_opts}
    _claim_root(url, storage_options, marker, overwrite)
    zstore = _zarr_store(url, read_only=False, storage_options=storage_options)
    kw = array_kwargs()
    try:
        a = zarr.create_array(zstore, name="ids", shape=(n,), dtype=str,
                              chunks=(min(n, 65536),), overwrite=True, **kw)
        a[:] = ids_arr.astype(str)
        if codes is not None:
            zarr.create_array(zstore, name="labels", shape=(n,), dtype="int32",
                              chunks=(min(n, 262144),), overwrite=True, **kw)[:] = codes
        zarr.create_array(zstore, name="folds", shape=(n,), dtype="int8",
                          chunks=(min(n, 262144),), overwrite=True, **kw)[:] = fold_arr
        root = zarr.open_group(store=zstore, mode="r+", use_consolidated=False, zarr_format=3)
        if "features" not in root.group_keys():
            root.create_group("features")
        _storage.test_pause("store_arrays")
        meta = {
            "format": FORMAT_VERSION,
            "n_items": n,
            "all_chunks": True,
            "created": _now(),
            "versions": {"embedstore": __version__, "zarr": zarr.__version__},
            "dataset": {"source": source, "fingerprint": fingerprint},
            "classes": list(classes) if codes is not None else None,
            "folds": {**fold_opts, "stratified": stratified,
                      "fingerprint": fingerprint_folds(fold_arr)},
        }
        root.attrs[ATTRS_KEY] = meta  # the store exists from here on
    except EmbedStoreError:
        raise
    except Exception as e:  # noqa: BLE001
        if not _storage.is_io_error(e):
            raise
        raise StoreIOError(f"cannot create the store at {url!r}: {_storage.describe(e)}; fix "
                           "the storage and run the same command again (an interrupted creation "
                           "is finished by creating the same dataset)") from None
    store = Store(url, root, zstore, mode="r+", storage_options=storage_options)
    store._consolidate()
    return store


def protocol_read_only(url: str) -> bool:
    return _storage.protocol(url) in _storage.READ_ONLY_PROTOCOLS


def _claim_root(url: str, storage_options: dict | None, marker: dict, overwrite: bool) -> None:
    """Write the ``creating`` marker as the root ``zarr.json``, exclusively unless an existing
    marker is for the same dataset (a finished or concurrent creation of identical content)."""
    doc = json.dumps({"zarr_format": 3, "node_type": "group",
                      "attributes": {ATTRS_KEY: marker}}).encode()
    for _ in range(3):
        try:
            if not _exists(url, storage_options):
                _storage.put_exclusive(url, storage_options, "zarr.json", doc)
                return
        except FileExistsError:
            continue  # someone else claimed it meanwhile: look at what they wrote
        except Exception as e:  # noqa: BLE001
            if not _storage.is_io_error(e):
                raise
            raise StoreIOError(f"cannot create the store at {url!r}: {_storage.describe(e)}; "
                               "check the path, permissions and free space") from None
        attrs = _read_root_attrs(url, storage_options) or {}
        theirs = attrs.get(ATTRS_KEY) if isinstance(attrs.get(ATTRS_KEY), dict) else None
        if theirs is not None and theirs.get("creating"):
            same = (theirs.get("dataset") == marker["dataset"]
                    and theirs.get("folds") == marker["folds"])
            if same:  # finish it (or write identical arrays beside a concurrent creator)
                return
            if not overwrite:
                raise StoreExistsError(
                    f"another store is being created at {url!r} (dataset fingerprint "
                    f"{theirs.get('dataset', {}).get('fingerprint')}, not "
                    f"{marker['dataset']['fingerprint']}), or its creation was interrupted; use "
                    "another URL, or pass overwrite=True (--overwrite) to replace it")
        elif not overwrite:
            what = ("a store already exists" if theirs is not None else
                    "a Zarr group that is not an embedstore store exists")
            raise StoreExistsError(f"{what} at {url!r}; open it to add feature sets, or pass "
                                   "overwrite=True (--overwrite) to replace it")
        for name in _ROOT_NAMES:  # only our own names: never wipe a directory we did not make
            if name != "zarr.json":
                _storage.remove_prefix(url, storage_options, name)
        _storage.put(url, storage_options, "zarr.json", doc)
        return
    raise StoreExistsError(f"could not claim {url!r}: other processes keep creating a store "
                           "there; retry")


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
    if not _exists(url, storage_options):
        raise StoreNotFoundError(f"no store at {url!r}; check the path/URL, or create one with "
                                 "`embedstore extract CATALOG --store URL`")
    zstore = _zarr_store(url, read_only=(mode == "r"), storage_options=storage_options)
    root = _open_root(zstore, url, mode)
    store = Store(url, root, zstore, mode=mode, storage_options=storage_options)
    if mode == "r+":  # repair what a writer that died mid-way left behind
        from .features import finish_interrupted_swaps

        if not finish_interrupted_swaps(store):
            try:
                current = _consolidated_is_current(zstore)
            except Exception:  # noqa: BLE001 - _consolidate retries and reports storage errors
                current = False
            if not current:
                store._consolidate()
    return store


def _open_root(zstore, url: str, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(store=zstore, mode=mode, zarr_format=3,
                               use_consolidated=None if mode == "r" else False)
    except EmbedStoreError:
        raise
    except Exception as e:  # noqa: BLE001
        if _storage.is_io_error(e):
            raise StoreIOError(f"cannot read {url!r}: {_storage.describe(e)}") from None
        raise StoreFormatError(f"{url!r} is not a readable Zarr v3 group "
                               f"({_storage.describe(e)})") from None


class Store:
    """An open store. Cheap to create; arrays are read lazily and cached."""

    def __init__(self, url: str, root: zarr.Group, zstore, *, mode: str,
                 storage_options: dict | None):
        self.url = url
        self.mode = mode
        self.storage_options = storage_options
        self._root = root
        self._zstore = zstore
        attrs = dict(root.attrs)
        if isinstance(attrs.get(ATTRS_KEY), dict) and attrs[ATTRS_KEY].get("creating"):
            raise StoreNotFoundError(
                f"the store at {url!r} is not finished: its creation is running in another "
                "process or was interrupted; run the same `embedstore extract` again to finish "
                "it")
        self.meta = parse_root_attrs(attrs, url)
        self.n_items: int = self.meta["n_items"]
        self._cache: dict[str, np.ndarray] = {}
        if self.meta.get("all_chunks"):  # written whole at creation: missing chunk = lost data
            for name in _ROOT_ARRAYS:
                zstore.strict.add(f"{name}/")
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
            self._cache[name] = read_array(arr, name)
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
            keys = list(grp.group_keys())
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
        """Rewrite the consolidated metadata, then check it against the live metadata and
        redo it if another writer changed something meanwhile (last writer wins otherwise:
        its snapshot could lack the other's change). Called after every metadata change."""
        last: Exception | None = None
        for attempt in range(6):
            try:
                _storage.invalidate(self._zstore)
                zarr.consolidate_metadata(self._zstore, zarr_format=3)
                if _consolidated_is_current(self._zstore):
                    last = None
                    break
            except Exception as e:  # noqa: BLE001 - a group renamed under our walk: retry
                if not (_storage.is_io_error(e) or isinstance(e, KeyError)):
                    raise
                last = e
            time.sleep(0.02 * (attempt + 1))
        if last is not None:
            raise StoreIOError(f"cannot write the consolidated metadata of {self.url!r}: "
                               f"{_storage.describe(last)}; fix the storage and re-run with "
                               "--resume (the data written so far is kept)")
        self._root = _open_root(self._zstore, self.url, self.mode)

    def refresh(self) -> Store:
        """Re-read metadata (another process may have added, finished or replaced sets)."""
        self._root = _open_root(self._zstore, self.url, self.mode)
        self.meta = parse_root_attrs(dict(self._root.attrs), self.url)
        self._zstore.strict.keep_only({f"{n}/" for n in _ROOT_ARRAYS
                                       if self.meta.get("all_chunks")})
        self._cache.clear()
        self.features = _Features(self)
        return self

    def loader(self, rows: Sequence[int] | np.ndarray, **kwargs):
        """Padded batches over ``rows``; see :class:`embedstore.loader.BatchLoader`."""
        from .loader import BatchLoader

        return BatchLoader(self, rows, **kwargs)


def _consolidated_is_current(zstore) -> bool:
    _storage.invalidate(zstore)
    cons = zarr.open_group(store=zstore, mode="r", use_consolidated=True, zarr_format=3)
    snap = cons.metadata.consolidated_metadata
    if snap is None:
        return False
    live = zarr.open_group(store=zstore, mode="r", use_consolidated=False, zarr_format=3)
    want = {path: node.metadata.to_dict() for path, node in live.members(max_depth=None)}
    got = {path: m.to_dict() for path, m in snap.flattened_metadata.items()}
    for d in (*want.values(), *got.values()):
        d.pop("consolidated_metadata", None)
    return want == got


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise InvalidInputError(f"feature set name {name!r} is not valid; use letters, digits, "
                                "'-', '_' or '.', not starting with '.'")


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
