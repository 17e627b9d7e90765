"""`embedstore extract CATALOG --store S --fill NAME`: write a feature set's missing segments.

An append with ``--only`` leaves the sets it did not name without the new segment's rows; such
a set is "partial" (docs/format.md §2.3) and readers refuse it. Filling it extracts, for each
appended segment that lacks the set (or holds an interrupted part of it), the catalog's rows
with that segment's ids into the segment, with the set's recorded encoder and options: the
same code path, crash safety and ``--resume`` behaviour as adding a feature set to a store.
The catalog may be the full catalog or any file holding those items; it is checked whole
before anything is written. Segment 0 is never written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..catalog import read_catalog
from ..errors import InvalidInputError
from ..format import segment_path
from ..provenance import ProvenanceError, encoder_from_feature, weights_mismatch
from ..store import open_store
from .append import set_config
from .pipeline import extract_catalog
from .progress import Progress

__all__ = ["fill"]


def fill(catalog: str | os.PathLike, store_url: str | os.PathLike, names: Sequence[str], *,
         progress: Progress | None = None, storage_options: dict | None = None,
         **overrides: Any) -> list:
    """Write the missing segment parts of feature sets ``names``; returns the extraction
    results (empty when nothing was missing). ``overrides`` as for ``append``."""
    url, catalog = os.fspath(store_url), os.fspath(catalog)
    store = open_store(url, mode="r", storage_options=storage_options)
    jobs = []
    for name in dict.fromkeys(names):
        if name not in store.features:
            raise InvalidInputError(f"--fill {name}: store {url!r} has no such feature set; it "
                                    f"has {list(store.features)}")
        fs = store.features[name]
        segs = [(s, p) for s, p in zip(store.segments[1:], store.segment_stores, strict=True)
                if name not in p.features or p.features[name].status != "complete"]
        if not segs:
            continue
        cfg = set_config(fs, resume=True, storage_options=storage_options, **overrides)
        enc = encoder_from_feature(fs, flag="--fill")
        wm = weights_mismatch(fs, enc)
        if wm:
            raise ProvenanceError(f"{wm}; a fill must encode with the set's recorded encoder")
        cat = read_catalog(catalog, id_col=cfg.id_col, text_cols=cfg.text_cols,
                           image_col=cfg.image_col, label_col=None, need_text=bool(cfg.text),
                           need_image=bool(cfg.image))
        index = {v: i for i, v in enumerate(cat.ids)}
        for seg, part in segs:
            ids = part.ids.tolist()
            lost = [v for v in ids if v not in index]
            if lost:
                raise InvalidInputError(
                    f"catalog {cat.path!r} lacks {len(lost)} item(s) of segment {seg['id']} "
                    f"(e.g. {lost[0]!r}); --fill needs every item of the segments it fills "
                    f"(the segment was appended from {seg.get('source')!r})")
            jobs.append((f"{url.rstrip('/')}/{segment_path(seg['id'])}",
                         cat.take([index[v] for v in ids]), cfg))
    results = []
    for seg_url, sub, cfg in jobs:
        results += extract_catalog(sub, seg_url, cfg, progress=progress)
    if jobs:
        open_store(url, mode="r+", storage_options=storage_options)  # re-consolidate the root
    return results
