"""Reading product catalogs (CSV, Parquet, JSONL) for extraction."""

from __future__ import annotations

import hashlib
import html
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CatalogError

__all__ = ["IMAGE_SEP", "Catalog", "join_text", "read_catalog", "strip_html"]

# A CSV/TSV image cell holding several paths separates them with this (docs/extract.md);
# JSONL and Parquet cells hold a list instead. A path containing it cannot be given in a CSV.
IMAGE_SEP = "|"

_TAG = re.compile(r"<[^>]*>")
_WS = re.compile(r"\s+")


def strip_html(text: Any) -> str:
    """Tags removed, entities decoded, whitespace collapsed; missing values -> ''."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    s = str(text)
    if "<" in s:
        s = _TAG.sub(" ", s)
    if "&" in s:
        s = html.unescape(s)
    return _WS.sub(" ", s).strip()


def join_text(values: Sequence[Any]) -> str:
    """One item's text from its text columns' values, as extraction encodes it: each
    HTML-stripped (:func:`strip_html`), the non-empty ones joined by a space."""
    return " ".join(p for p in (strip_html(v) for v in values) if p)


@dataclass
class Catalog:
    path: str
    ids: list[str]
    texts: list[str] | None  # joined, HTML-stripped
    # absolute paths or URLs; None = missing value; a list = several images (a gallery)
    images: list[str | None | list[str]] | None
    labels: list[Any] | None
    fingerprint: str
    groups: list[str] | None = None  # --group-col: items of one group share a fold

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def gallery(self) -> bool:
        """Some item lists more than one image (extraction then writes a gallery set)."""
        return any(isinstance(v, list) and len(v) > 1 for v in self.images or [])

    def image_paths(self, i: int) -> list[str]:
        """Item ``i``'s image paths (0, 1 or several), in catalog order."""
        v = (self.images or [None] * len(self.ids))[i]
        return [] if v is None else list(v) if isinstance(v, list) else [v]

    def take(self, rows: Sequence[int]) -> Catalog:
        """The catalog of items ``rows`` (in that order): every per-item list is subset."""
        n = len(self.ids)
        return replace(self, **{f.name: [v[i] for i in rows] for f in fields(self)
                                if isinstance(v := getattr(self, f.name), list) and len(v) == n})


def _read_frame(path: str, str_cols: dict[str, type]):
    import pandas as pd

    low = path.lower()
    try:
        if low.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        if low.endswith((".jsonl", ".ndjson", ".json")):
            return pd.read_json(path, lines=True, dtype=False, encoding_errors="replace")
        if low.endswith((".csv", ".tsv", ".csv.gz")):
            return pd.read_csv(path, sep="\t" if low.endswith(".tsv") else ",",
                               dtype=str_cols, keep_default_na=True,
                               encoding_errors="replace")
    except FileNotFoundError:
        raise CatalogError(f"catalog {path!r} does not exist; check the path") from None
    except Exception as e:  # noqa: BLE001 - pandas raises many parser errors
        raise CatalogError(f"catalog {path!r} cannot be parsed: {type(e).__name__}: {e}") from None
    raise CatalogError(f"catalog {path!r}: unknown format; use .csv, .tsv, .parquet or .jsonl")


def read_catalog(path: str | os.PathLike, *, id_col: str = "id",
                 text_cols: Sequence[str] | None = ("title", "description"),
                 image_col: str | None = "image", label_col: str | None = "label",
                 need_text: bool = True, need_image: bool = True,
                 group_col: str | None = None, labels_optional: bool = False) -> Catalog:
    """Load and validate a catalog. Every problem is a :class:`CatalogError` raised before any
    encoding starts. ``group_col``: the column whose equal values must share a fold.
    ``labels_optional`` (appends): a missing or empty label column means unlabelled items, and
    one class is enough (the store holds the others)."""
    path = os.fspath(path)
    if "://" not in path and not os.path.exists(path):
        raise CatalogError(f"catalog {path!r} does not exist; check the path")
    df = _read_frame(path, {c: str for c in (id_col, group_col) if c})
    if len(df) == 0:
        raise CatalogError(f"catalog {path!r} has no rows")
    cols = list(df.columns)
    wanted = [id_col] + (list(text_cols or []) if need_text else [])
    wanted += [image_col] if need_image and image_col else []
    if labels_optional and label_col and (label_col not in cols or df[label_col].isna().all()):
        label_col = None  # unlabelled items (for prediction only)
    wanted += [label_col] if label_col else []
    wanted += [group_col] if group_col else []
    missing = [c for c in wanted if c not in cols]
    if missing:
        raise CatalogError(f"catalog {path!r} lacks column(s) {missing}; it has {cols}. Name them "
                           "with --id-col/--text-cols/--image-col/--label-col/--group-col")
    raw_ids = df[id_col].tolist()
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in raw_ids):
        raise CatalogError(f"catalog {path!r}: column {id_col!r} has missing ids; every row "
                           "needs one")
    kinds = {type(v).__name__ for v in raw_ids}
    if len(kinds) > 1:
        raise CatalogError(f"catalog {path!r}: id column {id_col!r} mixes types "
                           f"({', '.join(sorted(kinds))}); make every id a string")
    ids = [str(v) for v in raw_ids]
    uniq, counts = np.unique(np.array(ids, dtype=object).astype(str), return_counts=True)
    if len(uniq) != len(ids):
        raise CatalogError(f"catalog {path!r}: duplicate ids {uniq[counts > 1][:5].tolist()}; "
                           "de-duplicate the catalog")
    texts = None
    if need_text and text_cols:
        texts = [join_text(row) for row in zip(*(df[c].tolist() for c in text_cols),
                                               strict=True)]
    images = None
    if need_image and image_col:
        base = Path(path).parent if "://" not in path else None
        images = [_image_cell(v, base, path) for v in df[image_col].tolist()]
    labels = None
    if label_col:
        labels = df[label_col].tolist()
        bad = [ids[i] for i, v in enumerate(labels)
               if v is None or (isinstance(v, float) and math.isnan(v))]
        if bad:
            raise CatalogError(f"catalog {path!r}: {len(bad)} rows have no label (first: "
                               f"{bad[:3]}); fill them, drop them, or omit --label-col")
        labels = [v.item() if isinstance(v, np.generic) else v for v in labels]
        if len(set(labels)) < 2 and not labels_optional:
            raise CatalogError(f"catalog {path!r}: label column {label_col!r} has a single class "
                               f"{labels[0]!r}; a classifier needs >= 2 (omit --label-col to "
                               "store no labels)")
    groups = _groups(df, group_col, ids, path) if group_col else None
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode() + b"\0")
    return Catalog(path=path, ids=ids, texts=texts, images=images, labels=labels,
                   fingerprint=h.hexdigest()[:16], groups=groups)


def _groups(df, group_col: str, ids: list[str], path: str) -> list[str]:
    """The group column as strings; an empty cell is refused (it would silently be a group)."""
    values = df[group_col].tolist()
    bad = [ids[i] for i, v in enumerate(values)
           if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == ""]
    if bad:
        raise CatalogError(f"catalog {path!r}: group column {group_col!r} is empty in {len(bad)} "
                           f"rows (first: {bad[:3]}); fill them (an item with no copies can use "
                           "its own id) or omit --group-col")
    return [str(v.item() if isinstance(v, np.generic) else v) for v in values]


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == ""


def _resolve(v: str, base: Path | None, path: str) -> str:
    """One image value as an absolute path or URL (relative paths: from the catalog's folder)."""
    if "://" in v or base is None or os.path.isabs(v):
        return v if base is not None or "://" in v else path.rsplit("/", 1)[0] + "/" + v
    return str((base / v).resolve())


def _image_cell(v: Any, base: Path | None, path: str) -> str | None | list[str]:
    """A cell of the image column: None (no image), one path, or a list of several paths (a
    JSONL/Parquet list, or a CSV value split on :data:`IMAGE_SEP`). Empty entries are dropped;
    a list of one path is that path, so a one-image catalog reads exactly as before."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        parts = [str(x).strip() for x in v if not _is_missing(x)]
    elif _is_missing(v):
        return None
    else:
        parts = [p.strip() for p in str(v).split(IMAGE_SEP)] if IMAGE_SEP in str(v) else [str(v)]
        parts = [p for p in parts if p]
    paths = [_resolve(p, base, path) for p in parts]
    return None if not paths else paths[0] if len(paths) == 1 else paths
