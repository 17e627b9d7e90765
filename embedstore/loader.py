"""Padded torch batches from one or more feature sets, aligned by store row.

Two feeds, chosen per feature set:

* in RAM (``max_ram`` budget allows it): arrays are loaded whole once; a batch is a numpy gather;
* streaming: whole blocks (whole chunks; Zarr is never read row by row) are visited in a
  shuffled order, in windows of blocks that fill ``shuffle_buffer`` bytes (decoded, counting
  the window being read ahead); each window is shuffled row-wise and batches are cut from it
  without a break between windows. A store sorted by category still gives mixed batches: a
  batch draws from every block of its window, and with the default 1 GiB buffer a window holds
  hundreds of blocks (an epoch of a small store is a single window, mixed like an in-RAM
  shuffle). ``window_blocks`` sets the window in blocks instead.

Blocks are read by :class:`embedstore.readahead.BlockReader`: ``read_threads`` threads, the next
window submitted before the current one is cut (read-ahead), decoded blocks kept across epochs
within what ``max_ram`` leaves. A background thread prepares the next batches while the caller
computes (``prefetch``). The order is a function of ``(seed, epoch)`` and the sizes only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import InvalidInputError
from .format import PRESENT
from .gallery import gallery_batch
from .readahead import DEFAULT_READ_THREADS, BlockReader

if TYPE_CHECKING:
    from .features import FeatureSet
    from .store import Store

__all__ = ["BatchLoader", "resolve_layers", "ALL_FIELDS", "DEFAULT_SHUFFLE_BUFFER"]

DEFAULT_SHUFFLE_BUFFER = float(1 << 30)  # bytes of decoded blocks a streaming shuffle may hold

ALL_FIELDS = frozenset({"text_tokens", "text_mask", "text_pooled", "image_regions",
                        "image_pooled"})


def resolve_layers(cached: Sequence[int], wanted: Sequence[int] | str | None) -> list[int]:
    """Positions in the cached layer axis for ``wanted`` (layer numbers as cached, or negative
    positions: -1 = last cached layer; None/"all" = every cached layer)."""
    if wanted is None or wanted == "all":
        return list(range(len(cached)))
    if isinstance(wanted, str):
        wanted = [int(x) for x in wanted.split(",") if x.strip()]
    pos = []
    for w in wanted:
        if w < 0 and -len(cached) <= w:
            pos.append(len(cached) + w)
        elif w in cached:
            pos.append(list(cached).index(w))
        else:
            raise InvalidInputError(f"layer {w} is not cached (cached layers: {list(cached)}); "
                                    "pick from those, or use negative positions like -1")
    return pos


def _f32_batch(shape: tuple[int, ...], zeros: bool = False) -> tuple[np.ndarray, torch.Tensor]:
    """A float32 batch as a numpy array and a torch view of it. Allocated by numpy, which asks
    Linux for huge pages on large buffers (a batch of 256 x 49 x 1280 is 64 MB: 16,000 page
    faults on 4 KiB pages, as costly as filling it); torch's own allocator does not."""
    arr = np.zeros(shape, np.float32) if zeros else np.empty(shape, np.float32)
    return arr, torch.from_numpy(arr)


def _cast_into(dst: torch.Tensor, src: np.ndarray) -> None:
    """Copy fp16/fp32 ``src`` into the float32 tensor ``dst`` in one pass: torch's cast is
    vectorised (F16C on x86), numpy's fp16 -> fp32 ``astype`` is several times slower."""
    if src.flags.writeable:
        dst.copy_(torch.from_numpy(src))
    else:  # torch refuses read-only arrays without a copy; numpy casts them itself
        np.copyto(dst.numpy(), src)


def pad_tokens(toks: Sequence[np.ndarray], lens: np.ndarray, layer_sel: Any, n_layers: int,
               dim: int) -> torch.Tensor:
    """(B, T, L, D) float32: each row's valid tokens (layers ``layer_sel``) cast straight into
    the zeroed padded batch; T = the longest row (at least 1)."""
    t_max = max(1, int(lens.max()) if len(lens) else 1)
    _, pad = _f32_batch((len(toks), t_max, n_layers, dim), zeros=True)
    for j, t in enumerate(toks):
        if len(t):
            _cast_into(pad[j, : len(t)], t[:, layer_sel])
    return pad


class BatchLoader:
    """Iterate padded batches over ``rows`` of a store.

    Yields dicts whose keys are :class:`fusion.Batch` field names (torch tensors; ``ids`` a
    tuple; ``image_prefix`` an int). ``text_present`` / ``image_present`` (B,) bool are given
    for a feature set that has absent or failed rows (its ``presence``), else left out.
    A gallery image set (several images per item) gives ``image_regions`` over all images of
    an item with ``image_mask`` (:func:`embedstore.gallery.gallery_batch`).
    """

    def __init__(self, store: Store, rows: Sequence[int] | np.ndarray, *,
                 text: str | None = None, image: str | None = None, batch_size: int = 64,
                 shuffle: bool = False, seed: int = 0, layers: Sequence[int] | str | None = None,
                 fields: set[str] | frozenset[str] | None = None, max_ram: float | None = None,
                 window_blocks: int | None = None, drop_last: bool = False, prefetch: int = 2,
                 allow_incomplete: bool = False,
                 shuffle_buffer: float = DEFAULT_SHUFFLE_BUFFER,
                 read_threads: int = DEFAULT_READ_THREADS):
        if text is None and image is None:
            raise InvalidInputError("the loader needs a text and/or an image feature set")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.fields = ALL_FIELDS if fields is None else frozenset(fields)
        self.window_blocks = None if window_blocks is None else max(1, int(window_blocks))
        self.shuffle_buffer = float(shuffle_buffer)
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.text: FeatureSet | None = store.features[text] if text else None
        self.image: FeatureSet | None = store.features[image] if image else None
        for fs, want in ((self.text, "text"), (self.image, "image")):
            if fs is None:
                continue
            if fs.modality != want:
                raise InvalidInputError(f"feature set {fs.name!r} is {fs.modality}, not {want}; "
                                        f"pass it as --{fs.modality}")
            if not allow_incomplete:
                fs.require_complete()
        self.layer_pos = resolve_layers(self.text.layers, layers) if self.text else []
        lp = self.layer_pos  # a contiguous selection is a slice: a view, not a copy per row
        self._layer_sel: Any = (slice(lp[0], lp[-1] + 1) if lp and lp == list(
            range(lp[0], lp[-1] + 1)) else lp)
        self.labels = store.labels
        self.ids = store.ids
        # presence per row (docs/format.md §2.5); None for a set where every row is present
        self.present: dict[str, np.ndarray | None] = {}
        for mod, fs in (("text", self.text), ("image", self.image)):
            if fs is not None:
                ok = fs.presence() == PRESENT
                self.present[mod] = None if ok.all() else ok
        budget = max_ram
        self.streaming: list[FeatureSet] = []
        pooled: dict[str, bool] = {}  # streaming sets: does a batch need their pooled vectors?
        for fs in (self.text, self.image):
            if fs is None:
                continue
            need_big = (bool({"text_tokens", "text_mask"} & self.fields) if fs is self.text
                        else "image_regions" in self.fields)
            pooled[fs.name] = f"{fs.modality}_pooled" in self.fields
            if not need_big:
                fs.load_pooled()  # pooled only: small, always in RAM
                continue
            if fs.load(budget):
                if budget is not None:
                    budget -= fs.payload_nbytes
            else:
                self.streaming.append(fs)
        # what max_ram leaves after the sets loaded whole keeps decoded blocks across epochs
        self.reader = BlockReader(self.streaming, threads=read_threads, pooled=pooled,
                                  cache_bytes=budget if budget is not None else 0)

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- order ---------------------------------------------------------------------------
    def _windows(self) -> Iterator[np.ndarray]:
        """Row groups in visiting order (one group = everything when all is in RAM)."""
        rng = np.random.default_rng((self.seed, self.epoch))
        if not self.streaming:
            rows = rng.permutation(self.rows) if self.shuffle else self.rows
            yield rows
            return
        unit = max(fs.block_rows for fs in self.streaming)
        blocks = self.rows // unit
        order = np.unique(blocks)
        if self.shuffle:
            order = rng.permutation(order)
        size = self.window_units(unit)
        for i in range(0, len(order), size):
            sel = np.isin(blocks, order[i : i + size])
            rows = self.rows[sel]
            yield rng.permutation(rows) if self.shuffle else rows

    def window_units(self, unit: int) -> int:
        """Blocks of ``unit`` rows per shuffle window: ``window_blocks``, else as many as fill
        half of ``shuffle_buffer`` (the other half is the window read ahead)."""
        if self.window_blocks is not None:
            return self.window_blocks
        per_row = sum(fs.payload_nbytes / max(1, fs.n_items) for fs in self.streaming)
        return max(1, int(self.shuffle_buffer / 2 // max(1.0, per_row * unit)))

    # -- gather --------------------------------------------------------------------------
    def _window_blocks(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The blocks of each streaming set that a window's rows need."""
        return {fs.name: np.unique(rows // fs.block_rows) for fs in self.streaming}

    def _make_batch(self, rows: np.ndarray, win: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": torch.from_numpy(rows.copy()),
                               "ids": tuple(self.ids[rows].tolist())}
        if self.labels is not None:
            out["labels"] = torch.from_numpy(self.labels[rows].astype(np.int64))
        for mod, ok in self.present.items():
            if ok is not None:
                out[f"{mod}_present"] = torch.from_numpy(ok[rows])  # (B,) bool
        if self.text is not None:
            fs = self.text
            if "text_pooled" in self.fields:
                out["text_pooled"] = torch.from_numpy(self._pooled(fs, rows, win))
            if "text_tokens" in self.fields or "text_mask" in self.fields:
                toks = self._tokens(fs, rows, win)
                lens = np.array([len(t) for t in toks], dtype=np.int64)
                out["text_tokens"] = pad_tokens(toks, lens, self._layer_sel,
                                                len(self.layer_pos), fs.dim)  # (B, T, L, D)
                t_max = out["text_tokens"].shape[1]
                out["text_mask"] = torch.arange(t_max)[None, :] < torch.from_numpy(lens)[:, None]
        if self.image is not None:
            fs = self.image
            out["image_prefix"] = fs.prefix_tokens
            if "image_pooled" in self.fields:
                out["image_pooled"] = torch.from_numpy(self._pooled(fs, rows, win))
            if "image_regions" in self.fields and fs.gallery:
                out.update(gallery_batch(self._images(fs, rows, win), fs.n_regions, fs.dim,
                                         fs.prefix_tokens))
            elif "image_regions" in self.fields:
                reg = _f32_batch((len(rows), *fs.shape[1:]))[1]
                if fs.in_ram:
                    _cast_into(reg, fs.regions_rows(rows))
                else:  # one pass per row: the block's fp16 row cast straight into the batch
                    for j, r in enumerate(rows):
                        _cast_into(reg[j], self._block_row(win[fs.name], fs, r)["regions"])
                out["image_regions"] = reg  # (B, R, D)
        return out

    @staticmethod
    def _block_row(blocks: dict, fs: FeatureSet, r: int) -> dict[str, Any]:
        b = int(r) // fs.block_rows
        data, j = blocks[b], int(r) - b * fs.block_rows
        row = {"pooled": data["pooled"][j]} if "pooled" in data else {}
        if "regions" in data and "lengths" in data:  # a gallery: its images are read apart
            pass
        elif "regions" in data:
            row["regions"] = data["regions"][j]
        else:
            o, n = data["offsets"][j], data["lengths"][j]
            row["tokens"] = data["tokens"][o : o + n]
        return row

    def _images(self, fs: FeatureSet, rows: np.ndarray, win: dict) -> list[tuple[Any, Any]]:
        """A gallery's rows: per row its images (n_i, R, D) and which were read (n_i,)."""
        if fs.in_ram:
            off, n, ok = fs.offsets(), fs.lengths(), fs.image_ok()
            return list(zip(fs.regions_rows(rows), [ok[off[r] : off[r] + n[r]] for r in rows],
                            strict=True))
        out = []
        for r in rows:
            b = int(r) // fs.block_rows
            data, j = win[fs.name][b], int(r) - b * fs.block_rows
            o, n = data["offsets"][j], data["lengths"][j]
            out.append((data["regions"][o : o + n], data["image_ok"][o : o + n]))
        return out

    def _pooled(self, fs: FeatureSet, rows: np.ndarray, win: dict) -> np.ndarray:
        if fs.pooled_in_ram:
            return np.ascontiguousarray(fs.pooled_rows(rows), dtype=np.float32)
        return np.stack([self._block_row(win[fs.name], fs, r)["pooled"] for r in rows])

    def _tokens(self, fs: FeatureSet, rows: np.ndarray, win: dict) -> list[np.ndarray]:
        if fs.in_ram:
            return fs.tokens_rows(rows)
        return [self._block_row(win[fs.name], fs, r)["tokens"] for r in rows]

    def _generate(self) -> Iterator[dict[str, Any]]:
        carry = np.zeros(0, dtype=np.int64)
        windows = list(self._windows())
        ahead = self.reader.fetch(self._window_blocks(windows[0])) if windows else {}
        for i, rows in enumerate(windows):
            win = ahead
            if i + 1 < len(windows):  # read-ahead: the next window decodes while this one is cut
                ahead = self.reader.fetch(self._window_blocks(windows[i + 1]))
            win = self.reader.resolve(win)
            if len(carry):  # rows carried over from the previous window keep their blocks
                keep = self._window_blocks(carry)
                win = {k: {**{b: self._last_win[k][b] for b in keep[k].tolist()}, **v}
                       for k, v in win.items()}
                rows = np.concatenate([carry, rows])
            n_full = len(rows) // self.batch_size * self.batch_size
            for j in range(0, n_full, self.batch_size):
                yield self._make_batch(rows[j : j + self.batch_size], win)
            carry = rows[n_full:]
            self._last_win = win
        if len(carry) and not self.drop_last:
            yield self._make_batch(carry, self._last_win)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._last_win: dict[str, Any] = {}
        if self.prefetch <= 0:
            yield from self._generate()
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        sentinel = object()

        def work() -> None:
            try:
                for b in self._generate():
                    if stop.is_set():
                        return
                    q.put(b)
                q.put(sentinel)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                q.put(e)

        t = threading.Thread(target=work, daemon=True, name="embedstore-loader")
        t.start()
        try:
            while True:
                item = q.get()
                if item is sentinel:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while not q.empty():
                q.get_nowait()
            t.join(timeout=5)
