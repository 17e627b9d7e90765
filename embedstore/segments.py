"""Format 2 reading: a feature set whose rows lie in several segments, seen as one.

A format-2 store (docs/format.md §2.1) is segment 0 (the root arrays) followed by segments
``segments/<s>/``, each laid out as a format-1 store. :class:`SegmentedFeatureSet` is a
:class:`~embedstore.features.FeatureSet` over the parts of one set in every segment: global row
``r`` is row ``r - start_s`` of segment ``s``, and the ragged token arrays are read as the
concatenation of the segments' ``tokens`` arrays (each part's offsets shifted by the token rows
of the parts before it). Only the array reads are replaced; every row, block and RAM method of
``FeatureSet`` works unchanged on top, so the loader, training and prediction see one set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .errors import FeatureIncompleteError
from .features import FeatureSet

__all__ = ["SegmentedFeatureSet"]


class _Shape(NamedTuple):
    """Shape and dtype of a virtual (concatenated) array."""

    shape: tuple[int, ...]
    dtype: np.dtype


class SegmentedFeatureSet(FeatureSet):
    """Feature set ``name`` over ``parts`` (one :class:`FeatureSet` per segment, in row order)."""

    def __init__(self, store: Any, name: str, parts: Sequence[FeatureSet],
                 missing: Sequence[int] = ()):
        # no FeatureSet.__init__: there is no single group to parse; the parts did that
        self.store, self.name, self.parts = store, name, list(parts)
        # ids of segments appended without this set (`--append --only`): the set is "partial"
        # until `embedstore extract CATALOG --store S --fill NAME` writes their parts
        self.missing = list(missing)
        self.group = self.parts[0].group
        self._ram: dict[str, np.ndarray] = {}
        self._small: dict[str, np.ndarray] = {}
        meta = dict(self.parts[0].meta)
        meta["n_items"] = store.n_items if self.missing else sum(p.n_items for p in self.parts)
        meta["status"] = ("partial" if self.missing else
                          "complete" if all(p.status == "complete" for p in self.parts)
                          else "writing")
        if self.missing:
            meta["missing_segments"] = self.missing
        gens = [p.generation for p in self.parts]
        meta["generation"] = None if None in gens else "+".join(gens)
        self.meta = meta
        self._rows = np.cumsum([0] + [p.n_items for p in self.parts])
        if meta["modality"] == "text":
            self._tokens = np.cumsum([0] + [p.shape[0] for p in self.parts])

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, segments={len(self.parts)})"

    # counts are sums over the parts written, so `info` can show a partial set
    @property
    def n_done(self) -> int:
        return sum(p.n_done for p in self.parts)

    @property
    def n_errors(self) -> int:
        return sum(p.n_errors for p in self.parts)

    def presence_counts(self) -> dict[str, int]:
        counts = [p.presence_counts() for p in self.parts]
        return {k: sum(c[k] for c in counts) for k in counts[0]}

    def presence(self) -> np.ndarray:
        """Each segment's own presence (stored, or derived for a part written without it)."""
        if self.missing:
            self.require_complete()
        if "presence" not in self._small:
            self._small["presence"] = np.concatenate([p.presence() for p in self.parts])
        return self._small["presence"]

    def check_unchanged(self) -> None:
        for p in self.parts:
            p.check_unchanged()

    def _arr(self, name: str) -> _Shape:
        first = self.parts[0].read_array(name, slice(0, 0))
        n = int(self._tokens[-1]) if name == "tokens" else self.n_items + (name == "offsets")
        return _Shape((n, *first.shape[1:]), first.dtype)

    def require_complete(self) -> None:
        if self.missing:
            raise FeatureIncompleteError(
                f"feature set {self.name!r} lacks the rows of appended segment(s) "
                f"{self.missing} (appended with --only); fill them: embedstore extract CATALOG "
                f"--store {self.store.url} --fill {self.name}")
        super().require_complete()

    def _read(self, names_sels: Sequence[tuple[str, Any]]) -> list[np.ndarray]:
        if self.missing:
            self.require_complete()
        return [self._read_one(key, sel) for key, sel in names_sels]

    def _read_one(self, key: str, sel: slice) -> np.ndarray:
        if key == "offsets":  # global token coordinates; the last entry closes the last part
            whole = np.concatenate(
                [p.offsets()[:-1] + base for p, base in zip(self.parts, self._tokens,
                                                             strict=False)]
                + [np.array([self._tokens[-1]], np.int64)])
            return whole[sel]
        base = self._tokens if key == "tokens" else self._rows
        start, stop, step = sel.indices(int(base[-1]))
        if step != 1:
            raise ValueError(f"strided reads of {key!r} are not supported")
        pieces = []
        for s, p in enumerate(self.parts):
            lo, hi = max(start, int(base[s])), min(stop, int(base[s + 1]))
            if lo < hi or (not pieces and s == len(self.parts) - 1):
                pieces.append(p.read_array(key, slice(lo - int(base[s]),
                                                      max(lo, hi) - int(base[s]))))
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
