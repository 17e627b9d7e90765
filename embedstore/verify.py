"""Integrity checks over a whole store (`embedstore verify`).

Full mode reads every chunk of every array (the crc32c codec fails on any flipped byte) and
checks values; ``fast`` checks metadata, counts and that every chunk a complete array must
hold is present (a listing, no chunk data is read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _storage
from .errors import EmbedStoreError
from .format import (
    GALLERY_ARRAYS,
    check_presence,
    expected_chunks,
    feature_arrays,
    is_gallery,
    main_array,
    parse_feature_attrs,
)

__all__ = ["VerifyReport", "verify_store"]


@dataclass
class VerifyReport:
    url: str
    problems: list[str] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "problems": self.problems, "checked": self.checked}


def _has_crc(arr) -> bool:
    return any(type(c).__name__ == "Crc32cCodec" for c in arr.metadata.codecs) or any(
        type(c).__name__ == "Crc32cCodec" for c in getattr(arr, "compressors", ()))


def _chunks(arr, what: str, report: VerifyReport, check_finite: bool = False,
            skip: set[int] | frozenset[int] = frozenset()):
    """Read ``arr`` chunk by chunk; record unreadable chunks and non-finite values.
    Yields (start, data) for readable pieces."""
    n = arr.shape[0]
    step = max(1, arr.chunks[0])
    for i, start in enumerate(range(0, n, step)):
        if i in skip:
            continue
        try:
            data = np.asarray(arr[start : start + step])
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"{what}: chunk {i} (rows {start}..{min(n, start + step) - 1}) "
                                   f"unreadable: {_storage.describe(e)}")
            continue
        if check_finite and data.dtype.kind == "f" and not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            report.problems.append(f"{what}: chunk {i} has {bad} NaN/Inf values")
        yield start, data


def _read_all(arr, what: str, rep: VerifyReport, skip=frozenset()) -> np.ndarray | None:
    parts = []
    before = len(rep.problems)
    for _, d in _chunks(arr, what, rep, skip=skip):
        parts.append(d)
    if len(rep.problems) != before or skip:
        return None
    return np.concatenate(parts) if parts else np.zeros(0, arr.dtype)


def _missing(store, path: str, arr, want: np.ndarray, rep: VerifyReport) -> set[int]:
    """Chunks of ``want`` not stored for the array at ``path``; each is one problem."""
    try:
        have = _storage.list_chunk_indices(store.url, store.storage_options, path)
    except Exception as e:  # noqa: BLE001
        rep.problems.append(f"{path}: cannot list chunks: {_storage.describe(e)}")
        return set()
    lost = sorted(set(int(c) for c in want) - have)
    step = int(arr.chunks[0])
    for c in lost[:20]:
        last = min(arr.shape[0], (c + 1) * step) - 1
        rep.problems.append(f"{path}: chunk {c} (rows {c * step}..{last}) missing: its data was "
                            "lost")
    if len(lost) > 20:
        rep.problems.append(f"{path}: {len(lost) - 20} more chunks missing")
    return set(lost)


def verify_store(store, *, fast: bool = False, features: list[str] | None = None) -> VerifyReport:
    """Check schema, completeness, chunk presence, ragged offsets, finiteness and checksums.

    ``fast`` checks metadata and counts only (no tensor data is read).
    """
    if store.segment_stores:  # format 2: every segment is checked as the store it is
        rep = VerifyReport(store.url)
        for seg, part in zip(store.segments, store.parts(), strict=True):
            sub = verify_store(part, fast=fast, features=features)
            rep.problems += [f"segment {seg['id']}: {p}" for p in sub.problems]
            for name, info in sub.checked.items():
                rep.checked.setdefault(name, {**info, "n_done": 0})
                rep.checked[name]["n_done"] += info.get("n_done", 0)
                rep.checked[name]["ok"] = rep.checked[name].get("ok", True) and info.get("ok")
        return rep
    rep = VerifyReport(store.url)
    n = store.n_items
    _check_consolidated(store, rep)
    root = store.group
    grouped = bool(store.fold_info.get("grouped"))
    wanted = [("ids", True), ("folds", True), ("labels", store.classes is not None),
              ("groups", grouped)]
    values: dict[str, np.ndarray | None] = {}
    for name, required in wanted:
        try:
            arr = root[name]
        except KeyError:
            if required:
                rep.problems.append(f"{name}: array missing")
            continue
        except Exception as e:  # noqa: BLE001
            rep.problems.append(f"{name}: unreadable metadata: {_storage.describe(e)}")
            continue
        if not _has_crc(arr):
            rep.problems.append(f"{name}: no crc32c checksum codec")
        if arr.shape[0] != n:
            rep.problems.append(f"{name}: {arr.shape[0]} values, attrs say n_items={n}")
        lost = set()
        if store.meta.get("all_chunks"):
            lost = _missing(store, name, arr, expected_chunks(-(-arr.shape[0] // arr.chunks[0]),
                                                              arr.chunks[0]), rep)
        values[name] = _read_all(arr, name, rep, skip=lost)
    ids, folds, labels = values.get("ids"), values.get("folds"), values.get("labels")
    if ids is not None and len(np.unique(ids)) != len(ids):
        rep.problems.append("ids: not unique")
    if folds is not None:
        k = store.fold_info["k"]
        if ((folds < -1) | (folds >= k)).any():
            rep.problems.append(f"folds: values outside [-1, {k})")
    if grouped and folds is not None and values.get("groups") is not None:
        _check_groups(values["groups"], folds, rep)
    if labels is not None and labels.size and (labels.min() < 0
                                               or labels.max() >= len(store.classes)):
        rep.problems.append(f"labels: codes outside [0, {len(store.classes)})")
    names = features if features is not None else list(store.features)
    for name in names:
        rep.checked[name] = _verify_feature(store, name, rep, fast)
    return rep


def _check_groups(groups: np.ndarray, folds: np.ndarray, rep: VerifyReport) -> None:
    """A grouped store keeps every group in one fold (or wholly in the holdout)."""
    codes = np.unique(groups, return_inverse=True)[1].reshape(-1)
    pairs = np.unique(np.stack([codes, folds.astype(np.int64)]), axis=1)
    split = np.flatnonzero(np.bincount(pairs[0]) > 1)
    if split.size:
        where = np.flatnonzero(codes == split[0])
        rep.problems.append(
            f"groups: {split.size} group(s) span several folds, e.g. {groups[where[0]]!r} in folds "
            f"{sorted(set(folds[where].tolist()))}; re-create the store (--group-col)")


def _check_consolidated(store, rep: VerifyReport) -> None:
    try:
        if not store.location.consolidated_is_current():
            rep.problems.append("consolidated metadata (root zarr.json) is out of date: a writer "
                                "stopped between a change and its consolidation; readers see an "
                                "old view. Any `embedstore extract ... --resume` on this store "
                                "rewrites it")
    except Exception as e:  # noqa: BLE001
        rep.problems.append(f"metadata cannot be walked: {_storage.describe(e)}")


def _verify_feature(store, name: str, rep: VerifyReport, fast: bool) -> dict[str, Any]:
    where = f"features/{name}"
    try:
        grp = store.feature_group(name)
        meta = parse_feature_attrs(dict(grp.attrs), name)
    except EmbedStoreError as e:
        rep.problems.append(str(e))
        return {"ok": False}
    n = store.n_items
    before = len(rep.problems)
    gallery = is_gallery(meta)  # images ragged per item (§2.6): checked like text tokens
    text = meta["modality"] == "text" or gallery
    main = main_array(meta["modality"])
    required = list(feature_arrays(meta["modality"])) + list(GALLERY_ARRAYS if gallery else ())
    arrays = {}
    for a in required:
        try:
            arrays[a] = grp[a]
        except KeyError:
            rep.problems.append(f"{where}/{a}: array missing")
    real = {"offsets": "image_offsets", "lengths": "n_images"} if gallery else {}
    for alias, a in real.items():  # a gallery's layout under the token names, checked alike
        if a in arrays:
            arrays[alias] = arrays.pop(a)
    try:  # optional: sets written before presence existed derive it (docs/format.md §2.5)
        arrays["presence"] = grp["presence"]
    except KeyError:
        pass
    for a, arr in arrays.items():
        if not _has_crc(arr):
            rep.problems.append(f"{where}/{a}: no crc32c checksum codec")
    if meta["n_items"] != n:
        rep.problems.append(f"{where}: n_items={meta['n_items']} but the store has {n}")
    for a in ("pooled", "done", "errors", "lengths", "presence"):
        if a in arrays and arrays[a].shape[0] != n:
            rep.problems.append(f"{where}/{a}: {arrays[a].shape[0]} rows, expected {n}")
    pdim = meta.get("pooled_dim", meta["dim"])
    if "pooled" in arrays and arrays["pooled"].shape[1:] != (pdim,):
        rep.problems.append(f"{where}/pooled: shape {arrays['pooled'].shape}, pooled_dim={pdim}")
    complete = meta["status"] == "complete"
    # every chunk must exist: complete, by a writer that stores all (sets with a generation)
    strict = complete and meta.get("generation") is not None
    if strict:  # a chunk vanishing between the listing and the read is an error, not zeros
        store.location.mark_complete(f"{where}/")
    small: dict[str, np.ndarray | None] = {}
    lost: dict[str, set[int]] = {}
    for a in ("offsets", "lengths", "done", "presence"):
        if a in arrays:
            arr = arrays[a]
            if strict:
                want = expected_chunks(-(-arr.shape[0] // arr.chunks[0]), arr.chunks[0])
                lost[a] = _missing(store, f"{where}/{real.get(a, a)}", arr, want, rep)
            small[a] = _read_all(arr, f"{where}/{real.get(a, a)}", rep,
                                 skip=lost.get(a, frozenset()))
    n_done = None
    done = small.get("done")
    if done is not None:
        n_done = int(done.astype(bool).sum())
        if complete and (len(done) != n or not done.all()):
            rep.problems.append(f"{where}: status is 'complete' but {n - n_done} rows are not "
                                "done")
    if not fast and small.get("presence") is not None and "errors" in arrays:
        errs = _read_all(arrays["errors"], f"{where}/errors", rep)
        why = None if errs is None else check_presence(small["presence"], errs)
        if why:
            rep.problems.append(f"{where}/presence: {why}; re-extract the set with --overwrite")
    off, ln = small.get("offsets"), small.get("lengths")
    if text and off is not None and ln is not None:
        off, ln = off.astype(np.int64), ln.astype(np.int64)
        total = arrays[main].shape[0] if main in arrays else None
        if len(off) != n + 1:
            rep.problems.append(f"{where}/offsets: {len(off)} values, expected {n + 1}")
        elif (np.diff(off) < 0).any():
            rep.problems.append(f"{where}/offsets: not monotonic")
        elif (off[:-1] + ln > off[1:]).any():
            bad = int(np.flatnonzero(off[:-1] + ln > off[1:])[0])
            rep.problems.append(f"{where}/offsets: item {bad} overlaps the next item")
        elif total is not None and off[-1] > total:
            rep.problems.append(f"{where}/offsets: last offset {off[-1]} past the token count "
                                f"{total}")
        if int(ln.sum()) != int(meta.get("n_tokens", ln.sum())):
            rep.problems.append(f"{where}/lengths: sum {int(ln.sum())} != n_tokens "
                                f"{meta.get('n_tokens')}")
    if not text and main in arrays:
        want = (n, meta["n_regions"], meta["dim"])
        if arrays[main].shape != want:
            rep.problems.append(f"{where}/regions: shape {arrays[main].shape}, expected {want}")
    per_image = ("regions", "image_pooled", "image_errors") if gallery else ()
    for a in (main, "pooled", "errors", *per_image[1:]):
        if a not in arrays:
            continue
        arr = arrays[a]
        if strict:
            n_chunks = -(-arr.shape[0] // arr.chunks[0])
            if a == "tokens" or a in per_image:
                if off is None or ln is None:
                    want = np.arange(0)  # the layout is unreadable: reported above
                else:
                    want = expected_chunks(n_chunks, arr.chunks[0], off, ln)
            else:
                want = expected_chunks(n_chunks, arr.chunks[0])
            lost[a] = _missing(store, f"{where}/{a}", arr, want, rep)
        if not fast:
            for _ in _chunks(arr, f"{where}/{a}", rep, check_finite=not a.endswith("errors"),
                             skip=lost.get(a, frozenset())):
                pass
    return {"ok": len(rep.problems) == before, "status": meta["status"], "n_done": n_done,
            "fast": fast}
