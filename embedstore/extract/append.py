"""`embedstore extract NEW --store S --append`: new items become an immutable segment.

docs/format.md §2.3, in three steps:

1. **Checks** before anything is written (one clear line each; the store is untouched): the
   store has feature sets and all are complete; the catalog has the columns each set was
   extracted from; no new id is already in the store; every set's encoder rebuilds from its
   provenance with weights whose sha256 matches the recorded one.
2. **Write** the new items as a format-1 store under ``segments/.<s>.new/``: ids, labels
   (global class codes; new classes are appended to the store's list), folds (a hash of the id,
   or of the group on a grouped store: :func:`embedstore.create.hash_folds`; ``-2`` = no fold for
   unlabelled items and ``--no-folds``), then every feature set through the normal extraction
   with the set's recorded options. Crash-safe like extract: ``--resume`` continues it.
3. **Commit**: rename the segment to ``segments/<s>`` and write the root attributes (format 2,
   the manifest, ``n_items``, classes, fingerprints) in one object write, then consolidate.
   Readers see the store before or after the append, never between.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from .. import _storage
from ..catalog import read_catalog
from ..create import create_store, hash_folds
from ..errors import InvalidInputError, StoreExistsError
from ..format import (
    ATTRS_KEY,
    SEGMENTS_GROUP,
    fingerprint_folds,
    fingerprint_ids,
    segment_path,
    utc_now,
)
from ..provenance import ProvenanceError, encoder_from_feature, weights_mismatch
from ..store import Store, open_store
from .config import ExtractConfig
from .pipeline import extract
from .progress import Progress

__all__ = ["append", "set_config"]

NO_FOLD = -2  # folds value of rows trained on by no fold (docs/format.md §2.2)


def set_config(fs, **over: Any) -> ExtractConfig:
    """The extraction options feature set ``fs`` was written with, for its part of a segment."""
    rec = dict(fs.meta.get("extract") or {})
    if not rec:
        raise ProvenanceError(f"feature set {fs.name!r} has no extract provenance; it cannot be "
                              "appended to: re-extract it with this version")
    known = {f.name for f in fields(ExtractConfig)}
    opts = {k: (tuple(v) if k == "text_cols" else v) for k, v in rec.items() if k in known}
    opts.setdefault("codec", "zstd")  # sets extracted before the option were all zstd
    spec = (fs.meta.get("encoder") or {}).get("spec")
    opts.update(text=spec if fs.modality == "text" else None,
                image=spec if fs.modality == "image" else None,
                text_name=fs.name if fs.modality == "text" else None,
                image_name=fs.name if fs.modality == "image" else None,
                label_col=None, group_col=None, overwrite=False)
    opts.update({k: v for k, v in over.items() if v is not None})
    return ExtractConfig(**opts)


def _checks(store: Store, catalog: str, no_folds: bool, only: Sequence[str] | None = None
            ) -> tuple[Any, list, dict]:
    names = list(store.features)
    if not names:
        raise InvalidInputError(f"store {store.url!r} has no feature sets to fill; extract one "
                                "before appending")
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise InvalidInputError(f"--only {unknown[0]}: store {store.url!r} has no such feature "
                                f"set; it has {names}")
    sets = [store.features[n] for n in (list(dict.fromkeys(only)) if only else names)]
    writing = [fs.name for fs in sets if fs.status == "writing"]
    if writing:
        raise InvalidInputError(f"feature set {writing[0]!r} of {store.url!r} is incomplete; "
                                "finish it (`embedstore extract ... --resume`) before appending")
    if not only:  # a set a previous `--only` append left partial is filled for the new rows
        sets = [fs for fs in sets if fs.status in ("complete", "partial")]
    gallery = [n for n in names if store.features[n].meta.get("gallery")]
    if gallery:  # segments of ragged images are not read yet (docs/format.md §2.6)
        raise InvalidInputError(f"feature set {gallery[0]!r} of {store.url!r} is a gallery "
                                "(several images per item), which cannot be appended to yet; "
                                "extract the old and new items together into a new store")
    confs = [set_config(fs) for fs in sets]
    rec = confs[0]
    text = next((c for c in confs if c.text), None)
    image = next((c for c in confs if c.image), None)
    label_col = (sets[0].meta.get("extract") or {}).get("label_col")
    group_col = store.fold_info.get("group_col") if store.fold_info.get("grouped") else None
    cat = read_catalog(catalog, id_col=rec.id_col, text_cols=text.text_cols if text else None,
                       image_col=image.image_col if image else None,
                       label_col=label_col if store.classes is not None else None,
                       need_text=text is not None, need_image=image is not None,
                       group_col=group_col, labels_optional=True)
    have = set(store.ids.tolist())
    dup = [i for i in cat.ids if i in have]
    if dup:
        raise InvalidInputError(f"{len(dup)} id(s) of {cat.path!r} are already in store "
                                f"{store.url!r} (e.g. {dup[0]!r}); an append adds new items "
                                "only: drop them from the catalog")
    for fs in sets:
        enc = encoder_from_feature(fs, flag="--append")
        wm = weights_mismatch(fs, enc)
        if wm:
            raise ProvenanceError(f"{wm}; an append must encode with the store's encoder")
    classes = list(store.classes) if store.classes is not None else None
    if cat.labels is not None:
        new = sorted({v for v in cat.labels if v not in set(classes)}, key=str)
        classes = classes + new  # existing codes never change
    return cat, sets, {"classes": classes, "no_folds": no_folds or cat.labels is None}


def _pending(store: Store) -> list[int]:
    """Ids of appends started but not committed (``segments/.<s>.new``)."""
    try:  # live metadata: a reader's consolidated snapshot may predate the segment
        keys = list(store.location.open_group(SEGMENTS_GROUP).group_keys())
    except (KeyError, FileNotFoundError):
        return []
    return sorted(int(k[1:-4]) for k in keys if k.startswith(".") and k.endswith(".new")
                  and k[1:-4].isdigit())


def append(catalog: str | os.PathLike, store_url: str | os.PathLike, *, resume: bool = False,
           no_folds: bool = False, only: Sequence[str] | None = None,
           progress: Progress | None = None, storage_options: dict | None = None,
           **overrides: Any) -> list:
    """Append ``catalog``'s items to the store as a new segment and fill every feature set for
    them (``only``: just these sets; the others stay "partial" until
    :func:`embedstore.extract.fill.fill` writes their part); returns the per-set extraction
    results. ``overrides``: ExtractConfig fields that do not change what is stored
    (``device``, ``batch_size``, ``num_workers``, ``precision``)."""
    url, catalog = os.fspath(store_url), os.fspath(catalog)
    store = open_store(url, mode="r", storage_options=storage_options)
    cat, sets, plan = _checks(store, catalog, no_folds, only)
    pending = _pending(store)
    seg_id = (max(s["id"] for s in store.segments) + 1)
    if pending and not resume:
        raise InvalidInputError(f"an append to {url!r} was interrupted (segment {pending[0]}); "
                                "finish it with the same command and --resume")
    if pending:
        seg_id = pending[0]
    sub = f"{url.rstrip('/')}/{segment_path(seg_id, pending=True)}"
    info = store.fold_info
    k, holdout = int(info["k"]), float(info["holdout"])
    salt = str(info.get("hash_salt") or store.fingerprint)
    keys = cat.groups if cat.groups is not None else cat.ids
    folds = (np.full(len(cat.ids), NO_FOLD, np.int8) if plan["no_folds"]
             else hash_folds(keys, k=k, holdout=holdout, salt=salt))
    renamed = _storage.exists(url, storage_options, f"{segment_path(seg_id)}/zarr.json")
    if renamed and not resume:  # renamed into place, manifest not yet written
        raise InvalidInputError(f"an append to {url!r} was interrupted while committing "
                                f"segment {seg_id}; finish it with the same command and --resume")
    if not _storage.exists(url, storage_options, f"{SEGMENTS_GROUP}/zarr.json"):
        _storage.put(url, storage_options, f"{SEGMENTS_GROUP}/zarr.json", json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": {}}).encode())
    results = []
    if not renamed:
        labelled = cat.labels is not None and store.classes is not None
        try:  # a creation that was interrupted is finished by creating the same dataset
            create_store(sub, cat.ids, cat.labels if labelled else None,
                         classes=plan["classes"] if labelled else None, folds=k,
                         holdout=holdout, source=cat.path, storage_options=storage_options,
                         groups=cat.groups, group_col=info.get("group_col"), assignment=folds)
        except StoreExistsError:  # created by the interrupted run: --resume goes on
            pass
        for fs in sets:
            cfg = set_config(fs, resume=True, storage_options=storage_options, **overrides)
            results += extract(catalog, sub, cfg, progress=progress)
    _commit(url, storage_options, store, seg_id, cat, plan, folds, salt)
    return results


def _commit(url: str, so: dict | None, store: Store, seg_id: int, cat, plan: dict,
            folds: np.ndarray, salt: str) -> None:
    """Rename the finished segment into place, then write the root attributes (manifest,
    n_items, classes, fingerprints over every row) in one object write, then consolidate."""
    if _storage.exists(url, so, f"{segment_path(seg_id, pending=True)}/zarr.json"):
        _storage.swap_group(url, so, segment_path(seg_id, pending=True), segment_path(seg_id))
    meta = json.loads(json.dumps(store.meta))
    segs = store.segments
    start = segs[-1]["start"] + segs[-1]["n_items"]
    segs.append({"id": seg_id, "start": start, "n_items": len(cat.ids), "created": utc_now(),
                 "source": cat.path, "folds": "none" if plan["no_folds"] else "hash"})
    meta.update(format=2, n_items=start + len(cat.ids), segments=segs)
    labels = None
    if store.classes is not None:
        meta["classes"] = plan["classes"]
        index = {c: j for j, c in enumerate(plan["classes"])}
        new = (np.array([index[v] for v in cat.labels], np.int32) if cat.labels is not None
               else np.full(len(cat.ids), -1, np.int32))
        labels = np.concatenate([store.labels.astype(np.int32), new])
    ids = np.asarray(store.ids.tolist() + list(cat.ids), dtype=object)
    meta["dataset"] = {**meta["dataset"], "fingerprint": fingerprint_ids(ids, labels)}
    meta["folds"] = {**meta["folds"], "hash_salt": salt,
                     "fingerprint": fingerprint_folds(np.concatenate([store.folds, folds]))}
    _storage.test_pause("append_commit")
    root = json.loads(_storage.read(url, so, "zarr.json"))
    root.setdefault("attributes", {})[ATTRS_KEY] = meta
    _storage.put(url, so, "zarr.json", json.dumps(root).encode())  # the commit
    open_store(url, mode="r+", storage_options=so)  # r+ re-consolidates the metadata
