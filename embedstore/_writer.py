"""The feature-set writer: creation (exclusive), block writes, finalisation and the swap of an
``--overwrite``. See :mod:`embedstore.features` for the model and docs/format.md for the rules.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _storage
from ._claim import claim_group
from ._gallery_write import cast_rows, gallery_block, gallery_layout
from .errors import (
    FeatureChangedError,
    FeatureExistsError,
    FeatureIncompleteError,
    InvalidInputError,
    StoreIOError,
)
from .format import (
    ATTRS_KEY,
    DEFAULT_BLOCK_ROWS,
    DEFAULT_FLOAT_CODEC,
    MODALITIES,
    check_codec,
    derive_presence,
    feature_array_specs,
    feature_arrays,
    feature_meta,
    is_gallery,
    parse_feature_attrs,
    token_chunk_size,
    token_layout,
    utc_now,
)
from .overwrite import finish_swap
from .zarrio import create_arrays, io_call

if TYPE_CHECKING:  # annotations only: the writer is handed a Store, it never imports one
    from .store import Store

__all__ = ["FeatureWriter"]



class FeatureWriter:
    """Fills a feature set block by block. Use :meth:`Store.create_feature` or
    :meth:`Store.feature_writer` (resume) to get one.

    ``with writer: ...`` finalises on a clean exit when every block is done.
    """

    def __init__(self, store: Store, name: str, path: str):
        self.store = store
        self.name = name
        self.path = path  # group path inside the store ("features/<name>" or a temp name)
        self._open_group()
        self.n_items = int(self.meta["n_items"])
        self.block_rows = int(self.meta["block_rows"])
        self.modality = self.meta["modality"]
        self._offsets = self._lengths = None
        missing = [a for a in feature_arrays(self.modality) if a not in self._members]
        if missing:
            raise FeatureIncompleteError(
                f"feature set {name!r} in {store.url!r} was interrupted while being created "
                f"(arrays {missing} missing); pass --overwrite to start it again")
        if self.modality == "text":
            self._offsets = self._io(lambda: np.asarray(self.group["offsets"][:], np.int64),
                                     "read the layout of")
            self._lengths = self._io(lambda: np.asarray(self.group["lengths"][:], np.int64),
                                     "read the layout of")
        elif is_gallery(self.meta):  # images ragged per item, laid out like tokens (§2.6)
            self._offsets = self._io(lambda: np.asarray(self.group["image_offsets"][:],
                                                        np.int64), "read the layout of")
            self._lengths = self._io(lambda: np.asarray(self.group["n_images"][:], np.int64),
                                     "read the layout of")

    def _open_group(self) -> None:
        self.group = self._io(lambda: self.store.location.open_group(self.path, mode="r+"),
                              "open")
        self.meta = parse_feature_attrs(dict(self.group.attrs), self.name)
        self._members = set(self.group.array_keys())
        self._arrays: dict[str, Any] = {}

    def _warr(self, key: str):
        """Array ``key`` for writing. ``write_empty_chunks`` is a runtime setting, not stored in
        the metadata, so it is set again on every array opened here: a chunk of zeros must
        still be written (a missing chunk of a complete set means lost data)."""
        if key not in self._arrays:
            self._arrays[key] = self.group[key].with_config({"write_empty_chunks": True})
        return self._arrays[key]

    def _io(self, fn, verb: str, extra: str = ""):
        return io_call(fn, f"{verb} feature set {self.name!r}{extra} in {self.store.url!r}")

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, store: Store, name: str, *, modality: str, dim: int,
               lengths: Sequence[int] | np.ndarray | None = None,
               layers: Sequence[int] | None = None, n_regions: int | None = None,
               grid: Sequence[int] | None = None, prefix_tokens: int = 0,
               pooled_dim: int | None = None, block_rows: int = DEFAULT_BLOCK_ROWS,
               dtype: str = "float16", attrs: dict | None = None,
               overwrite: bool = False,
               n_images: Sequence[int] | np.ndarray | None = None,
               codec: str = DEFAULT_FLOAT_CODEC) -> FeatureWriter:
        """Create the feature set's group and arrays (all rows not done).

        The group's ``zarr.json``, with the full attributes, is written first and exclusively:
        of two writers creating the same set, one wins and the other gets
        :class:`FeatureExistsError`. Replacing an existing set (``overwrite``) builds it under
        ``features/.<name>.new`` and swaps it in at :meth:`finalize`. ``n_images`` (image
        sets): images per item; given, the set is a gallery (docs/format.md §2.6). ``codec``:
        the compressor of the float arrays (:data:`embedstore.format.FLOAT_CODECS`).
        """
        n = store.n_items
        if modality not in MODALITIES:
            raise InvalidInputError(f"modality must be 'text' or 'image', got {modality!r}")
        if block_rows < 1 or block_rows & (block_rows - 1):
            raise InvalidInputError(f"block_rows must be a power of two, got {block_rows}")
        if dtype not in ("float16", "float32"):
            raise InvalidInputError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        if dim < 1:
            raise InvalidInputError(f"dim must be >= 1, got {dim}")
        check_codec(codec)
        layout: dict[str, Any] = {}
        data: dict[str, np.ndarray] = {}
        total = 0
        if modality == "text":
            if lengths is None or layers is None:
                raise InvalidInputError("a text feature set needs lengths (tokens per item) and "
                                        "layers")
            lengths = np.asarray(lengths, dtype=np.int64)
            if lengths.shape != (n,) or (lengths < 0).any():
                raise InvalidInputError(f"lengths must be {n} non-negative ints, got shape "
                                        f"{lengths.shape}")
            token_chunk = token_chunk_size(len(layers), dim, np.dtype(dtype).itemsize)
            data["offsets"], total = token_layout(lengths, block_rows, token_chunk)
            data["lengths"] = lengths
            layout = dict(layers=list(layers), token_chunk=token_chunk,
                          n_tokens=int(lengths.sum()))
        else:
            if n_regions is None or n_regions < 1:
                raise InvalidInputError(f"an image feature set needs n_regions >= 1, got "
                                        f"{n_regions}")
            layout = dict(n_regions=n_regions, prefix_tokens=prefix_tokens, grid=grid)
            if n_images is not None:
                layout.update(gallery_layout(n, n_images, n_regions, dim, block_rows, dtype,
                                              data))
                total = int(layout.pop("total"))
        # CLIP-style encoders project the pooled vector: pooled_dim may differ from dim
        meta = feature_meta(name=name, modality=modality, dim=dim, pooled_dim=pooled_dim or dim,
                            n_items=n, block_rows=block_rows, dtype=dtype,
                            generation=uuid.uuid4().hex, attrs=attrs, **layout)
        if total == 0 and modality == "text":  # no valid token at all: write the one chunk
            data["tokens"] = np.zeros((1, len(layers), dim), dtype=dtype)
        if total == 0 and layout.get("gallery"):  # no image at all: the one chunk of each
            data.update(regions=np.zeros((1, n_regions, dim), dtype=dtype),
                        image_pooled=np.zeros((1, pooled_dim or dim), np.float32),
                        image_errors=np.array([""], dtype=object).astype(str))
        path = f"features/{name}"
        pending = f"features/.{name}.new"
        if name in store.feature_names():
            path = pending  # built aside, swapped in at finalize (overwrite)
        elif store.location.exists(f"{pending}/zarr.json"):
            if not overwrite:
                raise FeatureExistsError(
                    f"an interrupted --overwrite of feature set {name!r} is pending in "
                    f"{store.url!r}; pass --resume to finish it or --overwrite to start again")
            path = pending
        claim_group(store, name, path, meta, replace=path == pending)

        def make_arrays() -> None:
            grp = store.location.open_group(path, mode="r+")
            create_arrays(grp, feature_array_specs(meta, total, codec), data)

        what = f"feature set {name!r} in {store.url!r}"
        io_call(make_arrays, f"create {what}")
        _storage.test_pause("created")
        io_call(store.consolidate, f"register {what}")
        return cls(store, name, path)

    @classmethod
    def open(cls, store: Store, name: str) -> FeatureWriter:
        """The pending replacement ``features/.<name>.new`` if there is one, else the set."""
        pending = f"features/.{name}.new"
        with _storage.io_errors(lambda why: f"cannot open feature set {name!r} in "
                                f"{store.url!r}: {why}"):
            if store.location.exists(f"{pending}/zarr.json"):
                return cls(store, name, pending)
        store.feature_group(name)  # raises FeatureNotFoundError with the available names
        return cls(store, name, f"features/{name}")

    # -- blocks --------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return -(-self.n_items // self.block_rows)

    def block_range(self, b: int) -> tuple[int, int]:
        if not 0 <= b < self.n_blocks:
            raise InvalidInputError(f"block {b} out of range [0, {self.n_blocks})")
        return b * self.block_rows, min((b + 1) * self.block_rows, self.n_items)

    def done_mask(self) -> np.ndarray:
        """Rows marked done. A ``done`` chunk that cannot be decoded (bit rot, a torn write on
        a filesystem without atomic renames) counts as not done: its rows are written again."""
        arr = self.group["done"]
        out = np.zeros(self.n_items, dtype=bool)
        step = int(arr.chunks[0])
        for s in range(0, self.n_items, step):
            try:
                out[s : s + step] = np.asarray(arr[s : s + step], dtype=bool)
            except Exception as e:  # noqa: BLE001
                if _storage.is_io_error(e):
                    raise StoreIOError(f"cannot read the done flags of feature set {self.name!r} "
                                       f"in {self.store.url!r}: {_storage.describe(e)}") from None
        return out

    def pending_blocks(self, blocks: Iterable[int] | None = None) -> list[int]:
        """Blocks (of ``blocks``, default all) with at least one row not done."""
        done = self.done_mask()
        todo = []
        for b in range(self.n_blocks) if blocks is None else blocks:
            s, e = self.block_range(b)
            if not done[s:e].all():
                todo.append(b)
        return todo

    def lengths(self, start: int, stop: int) -> np.ndarray:
        return self._lengths[start:stop]

    def write_block(self, b: int, *, pooled: np.ndarray | None = None, tokens: Sequence[np.ndarray] |
                    np.ndarray | None = None, regions: np.ndarray | None = None,
                    errors: Sequence[str] | None = None,
                    presence: Sequence[int] | np.ndarray | None = None,
                    image_pooled: np.ndarray | None = None,
                    image_errors: Sequence[str] | None = None) -> None:
        """Write block ``b``'s data, then its errors and presence, then mark its rows done.

        ``tokens``: per-row arrays (n_i, L, D) or the rows' tokens concatenated (sum n_i, L, D);
        ``regions``: (rows, R, D); ``pooled``: (rows, pooled_dim); ``errors``: per-row reason or
        ""; ``presence``: per-row 1 / 0 / 2 (docs/format.md §2.5), derived from ``errors`` and
        the token counts when not given. Before the done flags, the writer checks that the set
        was not replaced meanwhile.

        A gallery set (docs/format.md §2.6) takes the block's images instead, concatenated in
        item order: ``regions`` (images, R, D), ``image_pooled`` (images, P) and
        ``image_errors``; the items' ``pooled``, ``errors`` and ``presence`` follow from them.
        """
        start, stop = self.block_range(b)
        n = stop - start
        writes: list[tuple[str, slice, np.ndarray]] = []
        if is_gallery(self.meta):
            pooled, errors, presence = gallery_block(self.meta, self._offsets, self._lengths,
                                                     (b, start, stop), regions, image_pooled,
                                                     image_errors, writes)
            regions = None
        if pooled is None:
            raise InvalidInputError(f"block {b}: pooled vectors are required")
        pooled = np.asarray(pooled, dtype=np.float32)
        pdim = int(self.meta.get("pooled_dim", self.meta["dim"]))
        if pooled.shape != (n, pdim):
            raise InvalidInputError(f"block {b}: pooled must be {(n, pdim)}, got "
                                    f"{pooled.shape}")
        dtype = np.dtype(self.meta["dtype"])
        if self.modality == "text":
            if tokens is None:
                raise InvalidInputError(f"block {b}: a text feature set needs tokens")
            if not isinstance(tokens, np.ndarray):
                lens = [len(t) for t in tokens]
                if lens != self._lengths[start:stop].tolist():
                    bad = next(i for i, (a, c) in enumerate(zip(lens, self._lengths[start:stop],
                                                                 strict=True)) if a != c)
                    raise InvalidInputError(
                        f"row {start + bad}: {lens[bad]} tokens given but the layout reserved "
                        f"{int(self._lengths[start + bad])} (count_tokens and encode disagree)")
                tokens = (np.concatenate(tokens) if tokens else
                          np.zeros((0, len(self.meta["layers"]), self.meta["dim"])))
            expected = int(self._lengths[start:stop].sum())
            want = (expected, len(self.meta["layers"]), self.meta["dim"])
            if tokens.shape != want:
                raise InvalidInputError(f"block {b}: tokens must be {want}, got {tokens.shape}")
            t0 = int(self._offsets[start])
            if expected:
                writes.append(("tokens", slice(t0, t0 + expected), cast_rows(tokens, dtype)))
        elif not is_gallery(self.meta):
            want = (n, self.meta["n_regions"], self.meta["dim"])
            if regions is None or regions.shape != want:
                got = None if regions is None else regions.shape
                raise InvalidInputError(f"block {b}: regions must be {want}, got {got}")
            writes.append(("regions", slice(start, stop), cast_rows(regions, dtype)))
        writes.append(("pooled", slice(start, stop), pooled))
        errs = np.array(["" if e is None else str(e) for e in (errors or [""] * n)], dtype=object)
        if len(errs) != n:
            raise InvalidInputError(f"block {b}: {len(errs)} error entries for {n} rows")
        writes.append(("errors", slice(start, stop), errs.astype(str)))
        if "presence" in self._members:  # sets created before presence existed have none
            pres = (derive_presence(self.modality, errs, None if self._lengths is None
                                    else self._lengths[start:stop])
                    if presence is None else np.asarray(presence, dtype=np.uint8))
            if pres.shape != (n,) or (pres > 2).any():
                raise InvalidInputError(f"block {b}: presence must be {n} values in 0, 1, 2, "
                                        f"got shape {pres.shape}")
            writes.append(("presence", slice(start, stop), pres))
        where = f" (block {b}, rows {start}..{stop - 1})"
        _storage.test_pause("before_block", b)
        for key, sel, data in writes:
            self._io(lambda key=key, sel=sel, data=data: self._warr(key).__setitem__(sel, data),
                     "write", where)
        _storage.test_pause("after_data", b)
        self._check_generation()
        self._io(lambda: self._warr("done").__setitem__(slice(start, stop),
                                                       np.ones(n, dtype=bool)),
                 "write", where)  # last: marks the rows finished
        _storage.test_pause("after_done", b)

    def _check_generation(self) -> None:
        live = self.store.location.live_generation(self.path, self.name)
        if live != self.meta.get("generation"):
            raise FeatureChangedError(
                f"feature set {self.name!r} in {self.store.url!r} was replaced or removed by "
                "another writer while this one was filling it; this writer stopped before "
                "marking its rows done. Use --resume to join the current set")

    # -- finalisation --------------------------------------------------------------------
    def finalize(self, **attrs: Any) -> bool:
        """Merge ``attrs`` into the metadata; flip status to ``complete`` if every row is done.

        Returns whether the feature set is complete. An overwrite is swapped into place here.
        """
        target = f"features/{self.name}"
        if self.path != target and not self.store.location.exists(f"{self.path}/zarr.json"):
            # another process (a second rank) finalised and swapped it already
            self.path = target
            self._open_group()
        complete = bool(self.done_mask().all())
        if not complete and not attrs:
            return False  # nothing to record (and never undo a concurrent writer's "complete")
        live = self._io(lambda: self.store.location.open_group(self.path).attrs[ATTRS_KEY],
                        "finalise")
        meta = {**live, **attrs}
        if complete:
            meta["status"] = "complete"
            meta["finished"] = utc_now()

        def write_attrs() -> None:
            self.group.attrs[ATTRS_KEY] = meta

        self._io(write_attrs, "finalise")
        self.meta = meta
        _storage.test_pause("finalize")
        if complete and self.path != target:
            self._io(lambda: finish_swap(self.store, self.name), "swap in")
            self.path = target
            self._open_group()
        self._io(self.store.consolidate, "finalise")
        self.store.features.forget(self.name)
        return complete

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()

