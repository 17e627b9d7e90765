"""Integrity checks over a whole store (`embedstore verify`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import EmbedStoreError
from .format import parse_feature_attrs

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


def _chunks(arr, what: str, report: VerifyReport, check_finite: bool = False):
    """Read ``arr`` chunk row by chunk row; record unreadable chunks and non-finite values.
    Yields (start, data) for readable pieces."""
    n = arr.shape[0]
    step = max(1, arr.chunks[0])
    for i, start in enumerate(range(0, n, step)):
        try:
            data = np.asarray(arr[start : start + step])
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"{what}: chunk {i} (rows {start}..{min(n, start + step) - 1}) "
                                   f"unreadable: {type(e).__name__}: {e}")
            continue
        if check_finite and data.dtype.kind == "f" and not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            report.problems.append(f"{what}: chunk {i} has {bad} NaN/Inf values")
        yield start, data


def verify_store(store, *, fast: bool = False, features: list[str] | None = None) -> VerifyReport:
    """Check schema, completeness, ragged offsets, finiteness and chunk checksums.

    ``fast`` checks metadata and counts only (no tensor data is read).
    """
    rep = VerifyReport(store.url)
    n = store.n_items
    try:
        ids = store.ids
        if len(ids) != n:
            rep.problems.append(f"ids: {len(ids)} values, attrs say n_items={n}")
        if len(np.unique(ids)) != len(ids):
            rep.problems.append("ids: not unique")
    except EmbedStoreError as e:
        rep.problems.append(str(e))
    try:
        folds = store.folds
        k = store.fold_info["k"]
        if len(folds) != n:
            rep.problems.append(f"folds: {len(folds)} values for {n} items")
        elif ((folds < -1) | (folds >= k)).any():
            rep.problems.append(f"folds: values outside [-1, {k})")
    except EmbedStoreError as e:
        rep.problems.append(str(e))
    if store.classes is not None:
        try:
            labels = store.labels
            if len(labels) != n:
                rep.problems.append(f"labels: {len(labels)} values for {n} items")
            elif labels.size and (labels.min() < 0 or labels.max() >= len(store.classes)):
                rep.problems.append(f"labels: codes outside [0, {len(store.classes)})")
        except EmbedStoreError as e:
            rep.problems.append(str(e))
    names = features if features is not None else list(store.features)
    for name in names:
        rep.checked[name] = _verify_feature(store, name, rep, fast)
    return rep


def _verify_feature(store, name: str, rep: VerifyReport, fast: bool) -> dict[str, Any]:
    where = f"features/{name}"
    try:
        grp = store._feature_group(name)
        meta = parse_feature_attrs(dict(grp.attrs), name)
    except EmbedStoreError as e:
        rep.problems.append(str(e))
        return {"ok": False}
    n = store.n_items
    before = len(rep.problems)
    main = "tokens" if meta["modality"] == "text" else "regions"
    required = [main, "pooled", "done", "errors"] + (["offsets", "lengths"]
                                                     if meta["modality"] == "text" else [])
    arrays = {}
    for a in required:
        try:
            arrays[a] = grp[a]
        except KeyError:
            rep.problems.append(f"{where}/{a}: array missing")
    if meta["n_items"] != n:
        rep.problems.append(f"{where}: n_items={meta['n_items']} but the store has {n}")
    for a in ("pooled", "done", "errors", "lengths"):
        if a in arrays and arrays[a].shape[0] != n:
            rep.problems.append(f"{where}/{a}: {arrays[a].shape[0]} rows, expected {n}")
    pdim = meta.get("pooled_dim", meta["dim"])
    if "pooled" in arrays and arrays["pooled"].shape[1:] != (pdim,):
        rep.problems.append(f"{where}/pooled: shape {arrays['pooled'].shape}, pooled_dim={pdim}")
    n_done = None
    if "done" in arrays:
        done = np.concatenate([d for _, d in _chunks(arrays["done"], f"{where}/done", rep)] or
                              [np.zeros(0, bool)])
        n_done = int(done.sum())
        if meta["status"] == "complete" and (len(done) != n or not done.all()):
            rep.problems.append(f"{where}: status is 'complete' but {n - n_done} rows are not "
                                "done")
    if meta["modality"] == "text" and "offsets" in arrays and "lengths" in arrays:
        off = np.asarray(arrays["offsets"][:], dtype=np.int64)
        ln = np.asarray(arrays["lengths"][:], dtype=np.int64)
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
    if meta["modality"] == "image" and main in arrays:
        want = (n, meta["n_regions"], meta["dim"])
        if arrays[main].shape != want:
            rep.problems.append(f"{where}/regions: shape {arrays[main].shape}, expected {want}")
    if not fast:
        for a in (main, "pooled"):
            if a in arrays:
                for _ in _chunks(arrays[a], f"{where}/{a}", rep, check_finite=True):
                    pass
        if "errors" in arrays:
            for _ in _chunks(arrays["errors"], f"{where}/errors", rep):
                pass
    return {"ok": len(rep.problems) == before, "status": meta["status"], "n_done": n_done,
            "fast": fast}
