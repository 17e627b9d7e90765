"""Feature sets: one encoder run over every item of a store. Reader and writer.

Writers work in *blocks* of ``block_rows`` rows; every array is chunked so that a block owns
whole chunks (see :func:`embedstore.format.token_layout`), so any number of threads, processes
or machines can fill disjoint blocks of one feature set with no coordination. A block's ``done``
flags are written only after its data; the feature set's ``status`` flips to ``complete`` last.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .errors import (
    FeatureIncompleteError,
    InvalidInputError,
    StoreCorruptError,
)
from .format import (
    ATTRS_KEY,
    DEFAULT_BLOCK_ROWS,
    parse_feature_attrs,
    region_chunk_rows,
    token_chunk_size,
    token_layout,
)

if TYPE_CHECKING:
    from .store import Store

__all__ = ["FeatureSet", "FeatureWriter"]

_F16_MAX = float(np.finfo(np.float16).max)


def _read(arr, sel, what: str) -> np.ndarray:
    try:
        return np.asarray(arr[sel])
    except Exception as e:  # noqa: BLE001
        raise StoreCorruptError(f"array {what!r} cannot be read at {sel!r}: {type(e).__name__}: "
                                f"{e}; the store is damaged (run `embedstore verify`)") from None


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

    def _arr(self, name: str):
        try:
            return self.group[name]
        except KeyError:
            raise StoreCorruptError(f"feature set {self.name!r} lacks its {name!r} array; it is "
                                    "damaged: re-extract it with --overwrite") from None

    def _small_arr(self, name: str) -> np.ndarray:
        if name not in self._small:
            self._small[name] = _read(self._arr(name), slice(None), f"{self.name}/{name}")
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

    def lengths(self) -> np.ndarray:
        return self._small_arr("lengths").astype(np.int64)

    def offsets(self) -> np.ndarray:
        return self._small_arr("offsets").astype(np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        key = "tokens" if self.modality == "text" else "regions"
        return tuple(self._arr(key).shape)

    @property
    def payload_nbytes(self) -> int:
        """Bytes of the main tensor array (uncompressed), what :meth:`load` would use."""
        key = "tokens" if self.modality == "text" else "regions"
        a = self._arr(key)
        return int(np.prod(a.shape)) * a.dtype.itemsize + self.n_items * self.pooled_dim * 4

    def require_complete(self) -> None:
        if self.status != "complete":
            raise FeatureIncompleteError(
                f"feature set {self.name!r} is still 'writing' ({self.n_done}/{self.n_items} rows "
                "done); finish it with `embedstore extract ... --resume`")

    # -- RAM -----------------------------------------------------------------------------
    @property
    def _main(self) -> str:
        return "tokens" if self.modality == "text" else "regions"

    def load(self, max_ram: float | None = None) -> bool:
        """Load the arrays into RAM if they fit ``max_ram`` bytes (None = no limit)."""
        if self.in_ram:
            return True
        if max_ram is not None and self.payload_nbytes > max_ram:
            return False
        key = "tokens" if self.modality == "text" else "regions"
        self._ram[key] = _read(self._arr(key), slice(None), f"{self.name}/{key}")
        self._ram["pooled"] = _read(self._arr("pooled"), slice(None), f"{self.name}/pooled")
        return True

    @property
    def in_ram(self) -> bool:
        return self._main in self._ram

    # -- blocks --------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return -(-self.n_items // self.block_rows)

    def block_range(self, b: int) -> tuple[int, int]:
        return b * self.block_rows, min((b + 1) * self.block_rows, self.n_items)

    def read_block(self, b: int) -> dict[str, np.ndarray]:
        """Whole-chunk read of block ``b``: ``{"rows", "pooled", "tokens"+"offsets"+"lengths"
        (offsets relative to the block's tokens) | "regions"}``."""
        start, stop = self.block_range(b)
        out: dict[str, np.ndarray] = {"rows": np.arange(start, stop)}
        if "pooled" in self._ram:
            out["pooled"] = self._ram["pooled"][start:stop]
        else:
            out["pooled"] = _read(self._arr("pooled"), slice(start, stop), f"{self.name}/pooled")
        if self.modality == "text":
            off, ln = self.offsets(), self.lengths()
            t0, t1 = int(off[start]), int(off[stop - 1] + ln[stop - 1]) if stop > start else 0
            if self.in_ram:
                out["tokens"] = self._ram["tokens"][t0:t1]
            else:
                out["tokens"] = _read(self._arr("tokens"), slice(t0, t1), f"{self.name}/tokens")
            out["offsets"] = off[start:stop] - t0
            out["lengths"] = ln[start:stop]
        else:
            if self.in_ram:
                out["regions"] = self._ram["regions"][start:stop]
            else:
                out["regions"] = _read(self._arr("regions"), slice(start, stop),
                                       f"{self.name}/regions")
        return out

    def _gather(self, key: str, rows: np.ndarray) -> Any:
        """Rows of ``pooled``/``regions``/``tokens`` via RAM or whole blocks."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_items):
            raise InvalidInputError(f"row index out of range [0, {self.n_items}) for feature set "
                                    f"{self.name!r}")
        if self.in_ram or (key == "pooled" and "pooled" in self._ram):
            if key == "tokens":
                off, ln, t = self.offsets(), self.lengths(), self._ram["tokens"]
                return [t[off[r] : off[r] + ln[r]] for r in rows]
            return self._ram[key][rows]
        blocks = rows // self.block_rows
        out: list[Any] = [None] * len(rows)
        for b in np.unique(blocks):
            data = self.read_block(int(b))
            start = int(b) * self.block_rows
            for j in np.flatnonzero(blocks == b):
                r = int(rows[j]) - start
                if key == "tokens":
                    o, n = data["offsets"][r], data["lengths"][r]
                    out[j] = data["tokens"][o : o + n]
                else:
                    out[j] = data[key][r]
        if key == "tokens":
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

    def tokens_range(self, start: int, stop: int) -> list[np.ndarray]:
        return self.tokens_rows(np.arange(start, stop))

    def regions(self, i: int) -> np.ndarray:
        """Regions of item ``i``: (R, D), prefix tokens first."""
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
        return _read(self._arr("pooled"), slice(None), f"{self.name}/pooled")


class FeatureWriter:
    """Fills a feature set block by block. Use :meth:`Store.create_feature` or
    :meth:`Store.feature_writer` (resume) to get one.

    ``with writer: ...`` finalises on a clean exit when every block is done.
    """

    def __init__(self, store: Store, name: str, path: str):
        self.store = store
        self.name = name
        self.path = path  # group path inside the store ("features/<name>" or a temp name)
        self.group = zarr.open_group(store=store._zstore, path=path, mode="r+")
        self.meta = parse_feature_attrs(dict(self.group.attrs), name)
        self.n_items = int(self.meta["n_items"])
        self.block_rows = int(self.meta["block_rows"])
        self.modality = self.meta["modality"]
        self._offsets = self._lengths = None
        if self.modality == "text":
            self._offsets = np.asarray(self.group["offsets"][:], dtype=np.int64)
            self._lengths = np.asarray(self.group["lengths"][:], dtype=np.int64)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, store: Store, name: str, *, modality: str, dim: int,
               lengths: Sequence[int] | np.ndarray | None = None,
               layers: Sequence[int] | None = None, n_regions: int | None = None,
               grid: Sequence[int] | None = None, prefix_tokens: int = 0,
               pooled_dim: int | None = None, block_rows: int = DEFAULT_BLOCK_ROWS, dtype: str = "float16",
               attrs: dict | None = None, overwrite: bool = False) -> FeatureWriter:
        from .store import codecs

        n = store.n_items
        if modality not in ("text", "image"):
            raise InvalidInputError(f"modality must be 'text' or 'image', got {modality!r}")
        if block_rows < 1 or block_rows & (block_rows - 1):
            raise InvalidInputError(f"block_rows must be a power of two, got {block_rows}")
        if dtype not in ("float16", "float32"):
            raise InvalidInputError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        if dim < 1:
            raise InvalidInputError(f"dim must be >= 1, got {dim}")
        itemsize = np.dtype(dtype).itemsize
        meta: dict[str, Any] = {
            "name": name,
            "modality": modality,
            "kind": "tokens" if modality == "text" else "regions",
            "dim": int(dim),
            "pooled_dim": int(pooled_dim or dim),
            "n_items": n,
            "block_rows": int(block_rows),
            "dtype": dtype,
            "status": "writing",
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "encoder": {},
        }
        if modality == "text":
            if lengths is None or layers is None:
                raise InvalidInputError("a text feature set needs lengths (tokens per item) and "
                                        "layers")
            lengths = np.asarray(lengths, dtype=np.int64)
            if lengths.shape != (n,) or (lengths < 0).any():
                raise InvalidInputError(f"lengths must be {n} non-negative ints, got shape "
                                        f"{lengths.shape}")
            n_layers = len(layers)
            token_chunk = token_chunk_size(n_layers, dim, itemsize)
            offsets, total = token_layout(lengths, block_rows, token_chunk)
            meta.update(layers=[int(x) for x in layers], token_chunk=token_chunk,
                        n_tokens=int(lengths.sum()))
        else:
            if n_regions is None or n_regions < 1:
                raise InvalidInputError(f"an image feature set needs n_regions >= 1, got "
                                        f"{n_regions}")
            meta.update(n_regions=int(n_regions), prefix_tokens=int(prefix_tokens),
                        grid=list(grid) if grid is not None else None)
        for k, v in (attrs or {}).items():
            if k not in meta or k == "encoder":
                meta[k] = v
        path = f"features/{name}"
        if name in store._feature_names():
            path = f"features/.{name}.new"  # replaced atomically at finalize (overwrite)
        _remove_group(store, path)
        grp = zarr.open_group(store=store._zstore, path=path, mode="w")
        # every chunk is written even when all zeros, so a missing chunk file means lost data
        kw = {"compressors": codecs(), "config": {"write_empty_chunks": True}}
        rows_chunk = (min(block_rows, n),)
        if modality == "text":
            tok_shape = (max(total, 1), n_layers, dim)
            grp.create_array("tokens", shape=tok_shape, dtype=dtype,
                             chunks=(token_chunk, n_layers, dim), fill_value=0, **kw)
            grp.create_array("offsets", shape=(n + 1,), dtype="int64",
                             chunks=(min(n + 1, 262144),), **kw)[:] = offsets
            grp.create_array("lengths", shape=(n,), dtype="int32",
                             chunks=(min(n, 262144),), **kw)[:] = lengths
        else:
            rc = region_chunk_rows(n_regions, dim, block_rows, itemsize)
            grp.create_array("regions", shape=(n, n_regions, dim), dtype=dtype,
                             chunks=(rc, n_regions, dim), fill_value=0, **kw)
        pdim = int(pooled_dim or dim)  # CLIP-style encoders project the pooled vector
        grp.create_array("pooled", shape=(n, pdim), dtype="float32",
                         chunks=(min(block_rows, n), pdim), fill_value=0, **kw)
        grp.create_array("done", shape=(n,), dtype="bool", chunks=rows_chunk, fill_value=False,
                         **kw)
        grp.create_array("errors", shape=(n,), dtype=str, chunks=rows_chunk, fill_value="", **kw)
        meta["encoder"] = dict((attrs or {}).get("encoder", {}))
        grp.attrs[ATTRS_KEY] = meta  # written after the arrays exist
        store._consolidate()
        return cls(store, name, path)

    @classmethod
    def open(cls, store: Store, name: str) -> FeatureWriter:
        pending = f"features/.{name}.new"
        try:
            store._root[pending]
            return cls(store, name, pending)
        except KeyError:
            pass
        store._feature_group(name)  # raises FeatureNotFoundError with the available names
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
        return np.asarray(self.group["done"][:], dtype=bool)

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

    def write_block(self, b: int, *, pooled: np.ndarray, tokens: Sequence[np.ndarray] |
                    np.ndarray | None = None, regions: np.ndarray | None = None,
                    errors: Sequence[str] | None = None) -> None:
        """Write block ``b``'s data, then its errors, then mark its rows done.

        ``tokens``: per-row arrays (n_i, L, D) or the rows' tokens concatenated (sum n_i, L, D);
        ``regions``: (rows, R, D); ``pooled``: (rows, D); ``errors``: per-row reason or "".
        """
        start, stop = self.block_range(b)
        n = stop - start
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
                self.group["tokens"][t0 : t0 + expected] = _cast(tokens, dtype)
        else:
            want = (n, self.meta["n_regions"], self.meta["dim"])
            if regions is None or regions.shape != want:
                got = None if regions is None else regions.shape
                raise InvalidInputError(f"block {b}: regions must be {want}, got {got}")
            self.group["regions"][start:stop] = _cast(regions, dtype)
        self.group["pooled"][start:stop] = pooled
        errs = np.array(["" if e is None else str(e) for e in (errors or [""] * n)], dtype=object)
        if len(errs) != n:
            raise InvalidInputError(f"block {b}: {len(errs)} error entries for {n} rows")
        self.group["errors"][start:stop] = errs.astype(str)
        self.group["done"][start:stop] = np.ones(n, dtype=bool)  # last: marks the rows finished

    # -- finalisation --------------------------------------------------------------------
    def finalize(self, **attrs: Any) -> bool:
        """Merge ``attrs`` into the metadata; flip status to ``complete`` if every row is done.

        Returns whether the feature set is complete. An overwrite is swapped into place here.
        """
        meta = dict(self.group.attrs[ATTRS_KEY])
        meta.update(attrs)
        complete = bool(self.done_mask().all())
        if complete:
            meta["status"] = "complete"
            meta["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.group.attrs[ATTRS_KEY] = meta
        self.meta = meta
        if complete and self.path != f"features/{self.name}":
            _swap_group(self.store, self.path, f"features/{self.name}")
            self.path = f"features/{self.name}"
        self.store._consolidate()
        self.store.features._open.pop(self.name, None)
        return complete

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    x = np.asarray(x)
    if dtype == np.float16:
        x = np.clip(x, -_F16_MAX, _F16_MAX)  # hidden states past fp16 range would become inf
    return x.astype(dtype, copy=False)


def _fs_and_path(store: Store, path: str):
    from .store import _is_local, _local_path

    if _is_local(store.url):
        return None, os.path.join(_local_path(store.url), path)
    import fsspec

    fs, root = fsspec.core.url_to_fs(store.url, **(store.storage_options or {}))
    return fs, root.rstrip("/") + "/" + path


def _remove_group(store: Store, path: str) -> None:
    fs, p = _fs_and_path(store, path)
    if fs is None:
        shutil.rmtree(p, ignore_errors=True)
    elif fs.exists(p):
        fs.rm(p, recursive=True)


def _swap_group(store: Store, src: str, dst: str) -> None:
    """Replace group ``dst`` with ``src`` (overwrite). Local: two renames; remote: copy+delete."""
    fs, s = _fs_and_path(store, src)
    _, d = _fs_and_path(store, dst)
    if fs is None:
        old = d + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(d):
            os.rename(d, old)
        os.rename(s, d)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if fs.exists(d):
            fs.rm(d, recursive=True)
        fs.mv(s, d, recursive=True)
