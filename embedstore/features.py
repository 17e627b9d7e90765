"""Feature sets: one encoder run over every item of a store. The reader; the writer lives in
:mod:`embedstore._writer` and is re-exported here (``from embedstore.features import
FeatureWriter``).

Writers work in *blocks* of ``block_rows`` rows; every array is chunked so that a block owns
whole chunks (see :func:`embedstore.format.token_layout`), so any number of threads, processes
or machines can fill disjoint blocks of one feature set with no coordination. A block's ``done``
flags are written only after its data; the feature set's ``status`` flips to ``complete`` last.

Every feature set carries a random ``generation``. Readers check, after each read, that the set
they opened is still the one on storage: a set replaced by ``--overwrite`` meanwhile gives a
:class:`FeatureChangedError`, never a mix of old and new chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from ._writer import FeatureWriter
from .errors import (
    EmbedStoreError,
    FeatureChangedError,
    FeatureIncompleteError,
    InvalidInputError,
    StoreCorruptError,
)
from .format import (
    ABSENT,
    FAILED,
    PRESENT,
    derive_presence,
    is_gallery,
    main_array,
    parse_feature_attrs,
)
from .overwrite import finish_interrupted_swaps, finish_swap
from .zarrio import read_error

if TYPE_CHECKING:
    from .store import Store

__all__ = ["FeatureSet", "FeatureWriter", "finish_swap", "finish_interrupted_swaps"]


class FeatureSet:
    """Read access to one feature set. Row access never goes row-by-row to Zarr: arrays are
    loaded whole (:meth:`load`) or read block by block."""

    def __init__(self, store: Store, name: str, group: zarr.Group):
        self.store = store
        self.name = name
        self.group = group
        self.meta = parse_feature_attrs(dict(group.attrs), name)
        self._ram: dict[str, np.ndarray] = {}
        self._small: dict[str, np.ndarray] = {}
        if self.all_chunks:  # every chunk exists: a missing one is lost data
            store.location.mark_complete(f"{group.path}/")

    def __repr__(self) -> str:
        return (f"FeatureSet({self.name!r}, modality={self.modality!r}, dim={self.dim}, "
                f"status={self.status!r})")

    # -- metadata ------------------------------------------------------------------------
    modality = property(lambda self: self.meta["modality"])
    kind = property(lambda self: self.meta["kind"])
    dim = property(lambda self: int(self.meta["dim"]))
    pooled_dim = property(lambda self: int(self.meta.get("pooled_dim", self.meta["dim"])))
    status = property(lambda self: self.meta["status"])
    n_items = property(lambda self: int(self.meta["n_items"]))
    block_rows = property(lambda self: int(self.meta["block_rows"]))
    layers = property(lambda self: list(self.meta.get("layers") or []))
    prefix_tokens = property(lambda self: int(self.meta.get("prefix_tokens", 0)))
    n_regions = property(lambda self: int(self.meta.get("n_regions", 0)))
    grid = property(lambda self: self.meta.get("grid"))
    encoder = property(lambda self: dict(self.meta["encoder"]))
    generation = property(lambda self: self.meta.get("generation"))
    # several images per item (docs/format.md §2.6): regions are ragged per item, like tokens
    gallery = property(lambda self: is_gallery(self.meta))

    @property
    def _ragged(self) -> bool:
        return self.modality == "text" or self.gallery

    @property
    def all_chunks(self) -> bool:
        """Complete, and written by a writer that stores every chunk (sets written before
        ``generation`` existed may lack chunks holding only fill values)."""
        return self.meta["status"] == "complete" and self.generation is not None

    def _arr(self, name: str):
        try:
            return self.group[name]
        except KeyError:
            raise StoreCorruptError(f"feature set {self.name!r} lacks its {name!r} array; it is "
                                    "damaged: re-extract it with --overwrite") from None

    # -- reads: every one is checked against a concurrent replacement ----------------------
    def check_unchanged(self) -> None:
        """Raise :class:`FeatureChangedError` if the set on storage is no longer the one this
        object was opened on (replaced by ``--overwrite``, or removed)."""
        if self.generation is None:  # written before generations existed: nothing to compare
            return
        now = self.store.location.live_generation(self.group.path, self.name)
        if now != self.generation:
            what = "removed" if now is None else "replaced (--overwrite)"
            raise FeatureChangedError(
                f"feature set {self.name!r} in {self.store.url!r} was {what} after this reader "
                "opened it; the data read was discarded. Re-open the store (Store.refresh() or "
                "open_store) to read the current version; if this persists, an --overwrite was "
                "interrupted: finish it with `embedstore extract ... --resume`")

    def _read(self, names_sels: Sequence[tuple[str, Any]]) -> list[np.ndarray]:
        """Read ``[(array, selection), ...]``, then check the generation once."""
        out = []
        for key, sel in names_sels:
            arr = self._arr(key)
            try:
                out.append(np.asarray(arr[sel]))
            except Exception as e:  # noqa: BLE001 - zarr raises various errors for bad chunks
                self.check_unchanged()  # a replaced set explains any failure: say that instead
                if isinstance(e, EmbedStoreError):
                    raise
                raise read_error(arr, f"features/{self.name}/{key}",
                                 sel if isinstance(sel, slice) else slice(None), e) from None
        self.check_unchanged()
        return out

    def read_array(self, key: str, sel: slice = slice(None)) -> np.ndarray:
        """Rows ``sel`` of this set's array ``key`` (checked against a concurrent replacement)."""
        return self._read([(key, sel)])[0]

    def _small_arr(self, name: str) -> np.ndarray:
        if name not in self._small:
            self._small[name] = self._read([(name, slice(None))])[0]
        return self._small[name]

    def done(self) -> np.ndarray:
        return self._small_arr("done").astype(bool)

    @property
    def n_done(self) -> int:
        return int(self.done().sum())

    def errors(self) -> dict[int, str]:
        err = self._small_arr("errors")
        return {int(i): str(err[i]) for i in np.flatnonzero(err != "")}

    @property
    def n_errors(self) -> int:
        return int((self._small_arr("errors") != "").sum())

    def presence(self) -> np.ndarray:
        """(N,) uint8 per row: 1 present, 0 absent in the catalog, 2 failed (docs/format.md
        §2.5). Stored in ``presence``; derived from ``errors`` (and ``lengths``) for a set
        written before that array existed. Read once, then kept."""
        if "presence" not in self._small:
            try:
                has = "presence" in self.group.array_keys()
            except Exception:  # noqa: BLE001 - a listing error: read what we can
                has = False
            if has:
                self._small["presence"] = self._read([("presence", slice(None))])[0].astype(
                    np.uint8)
            else:
                self._small["presence"] = derive_presence(
                    self.modality, self._small_arr("errors"),
                    self.lengths() if self.modality == "text" else None)
        return self._small["presence"]

    def presence_counts(self) -> dict[str, int]:
        """``{"present", "absent", "failed"}`` row counts."""
        p = self.presence()
        return {"present": int((p == PRESENT).sum()), "absent": int((p == ABSENT).sum()),
                "failed": int((p == FAILED).sum())}

    @property
    def n_failed(self) -> int:
        """Rows whose content was there but could not be encoded (presence 2): what
        ``--max-error-rate`` counts. Absent rows (no image path, empty text) are not failures."""
        return int((self.presence() == FAILED).sum())

    def _layout_reads(self) -> list[tuple[str, Any]]:
        """The ragged layout's arrays: text offsets/lengths, a gallery's image_offsets/n_images
        (kept under the same names in RAM: a gallery's "lengths" are its images per item)."""
        if self.modality == "text":
            return [("offsets", slice(None)), ("lengths", slice(None))]
        return [("image_offsets", slice(None)), ("n_images", slice(None))]

    def _layout(self) -> None:
        if "offsets" not in self._small or "lengths" not in self._small:
            self._small["offsets"], self._small["lengths"] = self._read(self._layout_reads())

    def n_images(self) -> np.ndarray:
        """(N,) images stored per item: a gallery's ``n_images``; 1 for a one-image set."""
        if not self.gallery:
            return np.ones(self.n_items, dtype=np.int64)
        return self.lengths()

    def image_ok(self) -> np.ndarray:
        """(M,) bool per image row of a gallery: the image was read (``image_errors`` empty)."""
        if "image_ok" not in self._small:
            self._small["image_ok"] = self._small_arr("image_errors") == ""
        return self._small["image_ok"]

    def lengths(self) -> np.ndarray:
        self._layout()
        return self._small["lengths"].astype(np.int64)

    def offsets(self) -> np.ndarray:
        self._layout()
        return self._small["offsets"].astype(np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._arr(self._main).shape)

    @property
    def payload_nbytes(self) -> int:
        """Bytes of the main tensor array (uncompressed), what :meth:`load` would use."""
        a = self._arr(self._main)
        return int(np.prod(a.shape)) * a.dtype.itemsize + self.n_items * self.pooled_dim * 4

    def require_complete(self) -> None:
        if self.status != "complete":
            raise FeatureIncompleteError(
                f"feature set {self.name!r} is still 'writing' ({self.n_done}/{self.n_items} rows "
                "done); finish it with `embedstore extract ... --resume`")

    # -- RAM -----------------------------------------------------------------------------
    @property
    def _main(self) -> str:
        return main_array(self.modality)

    def load(self, max_ram: float | None = None) -> bool:
        """Load the arrays into RAM if they fit ``max_ram`` bytes (None = no limit). Data in
        RAM stays consistent even if the set is replaced on storage afterwards."""
        if self.in_ram:
            return True
        if max_ram is not None and self.payload_nbytes > max_ram:
            return False
        reads: list[tuple[str, Any]] = [(self._main, slice(None)), ("pooled", slice(None))]
        if self._ragged:  # the layout too: everything a row lookup needs, at once
            reads += self._layout_reads()
        got = self._read(reads)
        self._ram[self._main], self._ram["pooled"] = got[0], got[1]
        if self._ragged:
            self._small["offsets"], self._small["lengths"] = got[2], got[3]
        return True

    @property
    def in_ram(self) -> bool:
        """The main array (tokens / regions) is in RAM (see :meth:`load`)."""
        return self._main in self._ram

    def load_pooled(self) -> None:
        """Keep ``pooled`` (and the small ``done`` flags) in RAM: read once per
        :class:`FeatureSet`, not once per loader or epoch."""
        self.done()
        if "pooled" not in self._ram:
            self._ram["pooled"] = self.pooled_all()

    @property
    def pooled_in_ram(self) -> bool:
        return "pooled" in self._ram

    # -- blocks --------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return -(-self.n_items // self.block_rows)

    def block_range(self, b: int) -> tuple[int, int]:
        return b * self.block_rows, min((b + 1) * self.block_rows, self.n_items)

    def read_block(self, b: int, pooled: bool = True) -> dict[str, np.ndarray]:
        """Whole-chunk read of block ``b``: ``{"rows", "pooled", "tokens"+"offsets"+"lengths"
        (offsets relative to the block's tokens) | "regions"}``; ``pooled=False``: without
        ``pooled`` (a feed that does not use it reads no chunk of it)."""
        start, stop = self.block_range(b)
        out: dict[str, np.ndarray] = {"rows": np.arange(start, stop)}
        reads: list[tuple[str, Any]] = []
        if not pooled:
            pass
        elif "pooled" in self._ram:
            out["pooled"] = self._ram["pooled"][start:stop]
        else:
            reads.append(("pooled", slice(start, stop)))
        if self._ragged:  # text tokens, or a gallery's images (regions, rows per image)
            off, ln = self.offsets(), self.lengths()
            t0 = int(off[start])
            t1 = int(off[stop - 1] + ln[stop - 1]) if stop > start else t0
            if self.in_ram:
                out[self._main] = self._ram[self._main][t0:t1]
            else:
                reads.append((self._main, slice(t0, t1)))
            out["offsets"] = off[start:stop] - t0
            out["lengths"] = ln[start:stop]
            if self.gallery:
                out["image_ok"] = self.image_ok()[t0:t1]
        elif self.in_ram:
            out["regions"] = self._ram["regions"][start:stop]
        else:
            reads.append(("regions", slice(start, stop)))
        if reads:
            for (key, _), data in zip(reads, self._read(reads), strict=True):
                out[key] = data
        return out

    def _gather(self, key: str, rows: np.ndarray) -> Any:
        """Rows of ``pooled``/``regions``/``tokens`` via RAM or whole blocks."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_items):
            raise InvalidInputError(f"row index out of range [0, {self.n_items}) for feature set "
                                    f"{self.name!r}")
        ragged = key == "tokens" or (key == "regions" and self.gallery)
        if self.in_ram or (key == "pooled" and "pooled" in self._ram):
            if ragged:
                off, ln, t = self.offsets(), self.lengths(), self._ram[key]
                return [t[off[r] : off[r] + ln[r]] for r in rows]
            return self._ram[key][rows]
        blocks = rows // self.block_rows
        out: list[Any] = [None] * len(rows)
        for b in np.unique(blocks):
            data = self.read_block(int(b))
            start = int(b) * self.block_rows
            for j in np.flatnonzero(blocks == b):
                r = int(rows[j]) - start
                if ragged:
                    o, n = data["offsets"][r], data["lengths"][r]
                    out[j] = data[key][o : o + n]
                else:
                    out[j] = data[key][r]
        if ragged:
            return out
        if not out:
            return np.zeros((0,) + self._row_shape(key), dtype=np.float32)
        return np.stack(out)

    def _row_shape(self, key: str) -> tuple[int, ...]:
        if key == "pooled":
            return (self.pooled_dim,)
        return tuple(self._arr(key).shape[1:])

    def tokens(self, i: int) -> np.ndarray:
        """Valid tokens of item ``i``: (n_i, L, D)."""
        return self._gather("tokens", np.array([i]))[0]

    def tokens_rows(self, rows: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        return self._gather("tokens", np.asarray(rows))

    def regions(self, i: int) -> np.ndarray:
        """Regions of item ``i``: (R, D), prefix tokens first; a gallery's: (n_i, R, D), its
        images in catalog order (:meth:`regions_rows` gives a list of those)."""
        return self._gather("regions", np.array([i]))[0]

    def regions_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._gather("regions", np.asarray(rows))

    def regions_range(self, start: int, stop: int) -> np.ndarray:
        return self.regions_rows(np.arange(start, stop))

    def pooled(self, i: int) -> np.ndarray:
        return self._gather("pooled", np.array([i]))[0]

    def pooled_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._gather("pooled", np.asarray(rows))

    def pooled_range(self, start: int, stop: int) -> np.ndarray:
        return self.pooled_rows(np.arange(start, stop))

    def pooled_all(self) -> np.ndarray:
        if "pooled" in self._ram:
            return self._ram["pooled"]
        return self._read([("pooled", slice(None))])[0]
