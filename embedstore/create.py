"""Creating a store: the dataset (unique ids, optional labels, canonical folds) and the
exclusive claim of the root that makes an interrupted or concurrent creation safe."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from sklearn.model_selection import (
    KFold,
    StratifiedGroupKFold,
    StratifiedKFold,
    train_test_split,
)

from . import _storage
from .errors import InvalidInputError, StoreExistsError, StoreIOError
from .format import (
    ATTRS_KEY,
    ROOT_ARRAYS,
    creating_marker,
    dataset_arrays,
    fingerprint_folds,
    fingerprint_ids,
    group_document,
    root_meta,
)
from .store import Store, protocol_read_only, store_exists
from .version import __version__
from .zarrio import Location, create_arrays

__all__ = ["hash_folds", "SKLEARN_MAX_GROUPS", "create_store", "group_holdout", "grouped_folds", "majority_class",
           "make_folds", "pooled_strata", "round_robin_folds"]

_ROOT_NAMES = (*ROOT_ARRAYS, "features", "zarr.json")


def make_folds(labels: np.ndarray | None, n: int, *, k: int = 5, seed: int = 0,
               holdout: float = 0.2, groups: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Canonical fold per item: 0..k-1, or -1 for the holdout share.

    Stratified (scikit-learn) when labels are given, best-effort with a long tail (the classes
    too small for a split share one stratum, :func:`pooled_strata`; ``stratified`` is then
    False); a seeded shuffle without labels. With ``groups`` (a group code per item) every group lands in one fold or
    wholly in the holdout (:func:`grouped_folds`). Returns ``(folds int8 [N], stratified)``.
    """
    if k < 2:
        raise InvalidInputError(f"folds must be >= 2, got {k}; pass --folds 5 (or any k >= 2)")
    if not 0 <= holdout < 1:
        raise InvalidInputError(f"holdout must be in [0, 1), got {holdout}; pass e.g. "
                                "--holdout 0.2")
    if groups is not None:
        return grouped_folds(labels, np.asarray(groups), k=k, seed=seed, holdout=holdout)
    idx = np.arange(n)
    folds = np.full(n, -1, dtype=np.int8)
    stratified = False
    if labels is not None:
        counts = np.bincount(labels)
        counts = counts[counts > 0]
        stratified = bool(len(counts) > 1 and counts.min() >= 2)
    n_hold = int(round(holdout * n))
    if n_hold > 0:
        strata = None if labels is None else pooled_strata(labels, 2)
        try:
            train_idx, _ = train_test_split(idx, test_size=n_hold, random_state=seed,
                                            stratify=strata)
        except ValueError:  # fewer held-out items than strata
            train_idx, _ = train_test_split(idx, test_size=n_hold, random_state=seed)
            stratified = False
    else:
        train_idx = idx
    if len(train_idx) < k:
        raise InvalidInputError(f"{len(train_idx)} trainable items cannot be split into {k} "
                                "folds; lower --folds or --holdout")
    parts = None
    if labels is not None:
        tr_counts = np.bincount(labels[train_idx])
        stratified = stratified and bool(tr_counts[tr_counts > 0].min() >= k)
        strata = pooled_strata(labels[train_idx], k)
        if strata is not None:
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
            parts = splitter.split(train_idx, strata)
    if parts is None:
        parts = KFold(n_splits=k, shuffle=True, random_state=seed).split(train_idx)
    for f, (_, test) in enumerate(parts):
        folds[train_idx[test]] = f
    return folds, stratified


def pooled_strata(labels: np.ndarray, need: int) -> np.ndarray | None:
    """Strata for a best-effort stratified split: each class with at least ``need`` items is its
    own stratum; the rarer classes share one pooled stratum (folded into the largest class when
    the pool itself has fewer than ``need`` items). ``None`` when fewer than two strata are left
    (nothing to stratify). A class too small for every fold to get one of its items is spread
    like the pool, so a long tail keeps the head classes' folds balanced (issue 15)."""
    codes, counts = np.unique(labels, return_inverse=True, return_counts=True)[1:]
    codes = codes.reshape(-1)
    rare = counts < need
    if not rare.any():
        return codes if len(counts) > 1 else None
    strata = np.where(rare[codes], len(counts), codes)
    if counts[rare].sum() < need:
        strata[rare[codes]] = int(np.argmax(counts))
    return strata if len(np.unique(strata)) > 1 else None


def hash_folds(keys: Sequence[str], *, k: int, holdout: float, salt: str) -> np.ndarray:
    """Folds of appended rows, a pure function of each key (the id, or the group of a grouped
    store): ``u = sha256(salt + key)[:8] / 2**64``; holdout (-1) when ``u < holdout``, else
    fold ``floor((u - holdout) / (1 - holdout) * k)`` (docs/format.md §2.3). Independent of the
    order and batching of appends."""
    out = np.empty(len(keys), np.int8)
    for i, key in enumerate(keys):
        h = hashlib.sha256((salt + str(key)).encode("utf-8")).digest()[:8]
        u = int.from_bytes(h, "big") / 2.0**64
        out[i] = -1 if u < holdout else min(k - 1, int((u - holdout) / (1 - holdout) * k))
    return out


SKLEARN_MAX_GROUPS = 20_000  # StratifiedGroupKFold loops over groups in Python (~1 ms each)


def grouped_folds(labels: np.ndarray | None, groups: np.ndarray, *, k: int, seed: int,
                  holdout: float) -> tuple[np.ndarray, bool]:
    """Folds that never split a group: a group-aware holdout (:func:`group_holdout`), then
    scikit-learn's ``StratifiedGroupKFold`` over the other items, or :func:`round_robin_folds`
    above :data:`SKLEARN_MAX_GROUPS` trainable groups. Stratified when every class has >= k
    trainable items, else best-effort (:func:`pooled_strata`). Returns ``(folds int8 [N], stratified)``."""
    codes = np.unique(groups, return_inverse=True)[1].reshape(-1)
    y = np.zeros(len(codes), np.int64) if labels is None else np.asarray(labels, np.int64)
    folds = np.full(len(codes), -1, dtype=np.int8)
    train_idx = np.flatnonzero(~group_holdout(y, codes, holdout, seed))
    n_groups = len(np.unique(codes[train_idx]))
    if n_groups < k:
        raise InvalidInputError(f"{n_groups} groups of trainable items cannot be split into {k} "
                                "folds; lower --folds or --holdout, or group by a finer column")
    counts = np.bincount(y[train_idx])
    counts = counts[counts > 0]
    stratified = bool(labels is not None and len(counts) > 1 and counts.min() >= k)
    target = y[train_idx] if stratified else pooled_strata(y[train_idx], k)
    if target is None:
        target = np.zeros(len(train_idx), np.int64)
    if n_groups > SKLEARN_MAX_GROUPS:
        folds[train_idx] = round_robin_folds(target, codes[train_idx], k, seed)
    else:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        for f, (_, test) in enumerate(splitter.split(train_idx, target, codes[train_idx])):
            folds[train_idx[test]] = f
    empty = sorted(set(range(k)) - set(np.unique(folds[train_idx]).tolist()))
    if empty:
        raise InvalidInputError(f"grouping leaves fold(s) {empty} empty ({n_groups} groups "
                                f"for {k} folds); lower --folds or group by a finer column")
    return folds, stratified


def majority_class(y: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The most frequent class of each group code (ties: the lowest class), vectorised."""
    n_cls = int(y.max()) + 1
    pairs, cnt = np.unique(codes.astype(np.int64) * n_cls + y, return_counts=True)
    g, c = pairs // n_cls, pairs % n_cls
    order = np.lexsort((-cnt, g))  # by group, then most frequent class first
    first = np.r_[True, g[order][1:] != g[order][:-1]]
    major = np.zeros(int(codes.max()) + 1, np.int64)
    major[g[order][first]] = c[order][first]
    return major


def _groups_by_class(y: np.ndarray, codes: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """Group codes sorted by majority class, seeded random order inside a class; returns
    ``(order, major)``."""
    major = majority_class(y, codes)
    perm = np.random.default_rng(seed).permutation(len(major))
    return perm[np.argsort(major[perm], kind="stable")], major


def round_robin_folds(y: np.ndarray, codes: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Folds for many groups in O(N log N): groups sorted by majority class (random inside a
    class) are dealt to folds 0..k-1 in turn, continuing across classes."""
    codes = np.unique(codes, return_inverse=True)[1].reshape(-1)
    order, _ = _groups_by_class(y, codes, seed)
    fold_of = np.empty(len(order), np.int8)
    fold_of[order] = np.arange(len(order)) % k
    return fold_of[codes]


def group_holdout(y: np.ndarray, codes: np.ndarray, holdout: float, seed: int) -> np.ndarray:
    """A holdout mask made of whole groups, stratified best-effort (the share is approximate).

    Each group counts for its majority class (ties: the lowest class code). Per class, the
    groups are taken in a seeded random order while the class's held-out items stay within
    ``holdout`` x its items, plus the first group past that budget when it lands nearer to it.
    """
    hold = np.zeros(len(codes), dtype=bool)
    if holdout <= 0:
        return hold
    size = np.bincount(codes)
    perm, major = _groups_by_class(y, codes, seed)
    starts = np.searchsorted(major[perm], np.arange(int(y.max()) + 2))
    taken = []
    for cls in range(len(starts) - 1):
        gs = perm[starts[cls]:starts[cls + 1]]
        if len(gs) == 0:
            continue
        cum = np.cumsum(size[gs])
        budget = holdout * cum[-1]
        m = int(np.searchsorted(cum, budget, side="right"))  # groups within the budget
        below = cum[m - 1] if m else 0
        if m < len(gs) and cum[m] - budget < budget - below:
            m += 1
        taken.append(gs[:m])
    if taken:
        hold[np.isin(codes, np.concatenate(taken))] = True
    return hold


def _check_groups(groups: Sequence[Any], n: int) -> np.ndarray:
    groups = list(groups)
    if len(groups) != n:
        raise InvalidInputError(f"groups has {len(groups)} values but there are {n} ids; "
                                "pass one group per id")
    bad = [i for i, v in enumerate(groups)
           if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == ""]
    if bad:
        raise InvalidInputError(f"{len(bad)} items have an empty group (first: item {bad[0]}); "
                                "give every item a group (its own id when it has no copies)")
    return np.asarray([str(v) for v in groups], dtype=object)


def _check_ids(ids: Sequence[Any]) -> np.ndarray:
    ids_arr = np.asarray([str(i) for i in ids], dtype=object)
    if len(ids_arr) == 0:
        raise InvalidInputError("the id list is empty; a store needs at least one item")
    kinds = {type(i).__name__ for i in ids}
    if len(kinds) > 1:
        raise InvalidInputError(f"ids mix types ({', '.join(sorted(kinds))}); make them all "
                                "strings (or all ints) so '1' and 1 cannot collide")
    uniq, counts = np.unique(ids_arr.astype(str), return_counts=True)
    if len(uniq) != len(ids_arr):
        dup = uniq[counts > 1][:5].tolist()
        raise InvalidInputError(f"ids are not unique: {dup} appear more than once; "
                                "de-duplicate the catalog")
    return ids_arr


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
                 storage_options: dict | None = None, overwrite: bool = False,
                 groups: Sequence[Any] | None = None, group_col: str | None = None,
                 assignment: np.ndarray | None = None) -> Store:
    """Create a store for a dataset: ids (unique), optional labels, canonical stratified folds.

    ``groups`` (one value per id, e.g. a product family): no group is split across folds or
    between the folds and the holdout; stored as the ``groups`` array, with ``folds.grouped``
    and ``folds.group_col`` (the column it came from, or None) in the root attributes.

    Nothing is written unless every input is valid. The root ``zarr.json`` first holds a
    ``creating`` marker (claimed exclusively) and gets its full attributes only after every
    array is written, so an interrupted creation is never mistaken for a store; creating the
    same dataset again (same ids, labels and fold options) finishes it.
    """
    url = os.fspath(url)
    if protocol_read_only(url):
        raise InvalidInputError(f"cannot create a store at {url!r}: {_storage.protocol(url)}:// "
                                "stores are read-only; create it locally or on s3://, gs://...")
    if not overwrite and store_exists(url, storage_options):
        theirs = (_read_root_attrs(url, storage_options) or {}).get(ATTRS_KEY)
        if not (isinstance(theirs, dict) and theirs.get("creating")):
            raise StoreExistsError(f"a store already exists at {url!r}; open it to add feature "
                                   "sets, or pass overwrite=True (--overwrite) to replace it")
    ids_arr = _check_ids(ids)
    n = len(ids_arr)
    codes = None
    if labels is not None:
        codes, classes = _encode_labels(labels, n, classes)
    group_arr = None if groups is None else _check_groups(groups, n)
    if assignment is not None:  # the folds of an appended segment (hash_folds), as given
        fold_arr, stratified = np.asarray(assignment, np.int8), False
        if fold_arr.shape != (n,) or ((fold_arr < -2) | (fold_arr >= folds)).any():
            raise InvalidInputError(f"assignment must be {n} fold values in [-2, {folds})")
    else:
        fold_arr, stratified = make_folds(codes, n, k=folds, seed=seed, holdout=holdout,
                                          groups=None if group_arr is None
                                          else group_arr.astype(str))
    fingerprint = fingerprint_ids(ids_arr, codes)
    fold_opts: dict[str, Any] = {"k": folds, "seed": seed, "holdout": holdout}
    if group_arr is not None:
        fold_opts.update(grouped=True, group_col=group_col,
                         groups_fingerprint=fingerprint_ids(group_arr, None))
    _claim_root(url, storage_options, creating_marker(fingerprint, fold_opts), overwrite)
    loc = Location(url, storage_options, read_only=False)
    with _storage.io_errors(lambda why: f"cannot create the store at {url!r}: {why}; fix the "
                            "storage and run the same command again (an interrupted creation "
                            "is finished by creating the same dataset)"):
        root = loc.open_group("", mode="r+")
        create_arrays(root, dataset_arrays(n, codes is not None, group_arr is not None),
                      {"ids": ids_arr.astype(str), "labels": codes, "folds": fold_arr,
                       "groups": None if group_arr is None else group_arr.astype(str)},
                      overwrite=True)
        if "features" not in root.group_keys():
            root.create_group("features")
        _storage.test_pause("store_arrays")
        meta = root_meta(n_items=n, source=source, fingerprint=fingerprint,
                         versions={"embedstore": __version__, "zarr": zarr.__version__},
                         classes=list(classes) if codes is not None else None,
                         fold_opts=fold_opts, stratified=stratified,
                         folds_fingerprint=fingerprint_folds(fold_arr))
        root.attrs[ATTRS_KEY] = meta  # the store exists from here on
    store = Store(loc, root, mode="r+")
    store.consolidate()
    return store


def _read_root_attrs(url: str, storage_options: dict | None) -> dict | None:
    """The root group's attributes read straight from ``zarr.json`` (None if unparsable)."""
    try:
        doc = json.loads(_storage.read(url, storage_options, "zarr.json"))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return doc.get("attributes", {}) if isinstance(doc, dict) else {}


def _claim_root(url: str, storage_options: dict | None, marker: dict, overwrite: bool) -> None:
    """Write the ``creating`` marker as the root ``zarr.json``, exclusively unless an existing
    marker is for the same dataset (a finished or concurrent creation of identical content)."""
    doc = group_document(marker)
    for _ in range(3):
        try:
            if not store_exists(url, storage_options):
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
