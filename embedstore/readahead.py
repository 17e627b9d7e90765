"""Decoded blocks for the streaming feed: read by a small thread pool ahead of use, and kept
across epochs within a byte budget.

:class:`BlockReader` is what :class:`embedstore.loader.BatchLoader` asks for the blocks of a
window. ``fetch`` returns at once with a future per block, so the loader submits the *next*
window's blocks before it cuts the current window's batches: reading (Zarr's chunk decoding
releases the GIL) overlaps the gather and, through the loader's prefetch thread, the head's
step. A decoded block is kept while the cache budget allows (``cache_bytes``: what ``max_ram``
leaves after the sets loaded whole); a kept block is never read again, so later epochs read
only the blocks that did not fit. Nothing is evicted: which blocks are kept does not matter for
a shuffled epoch, and a fixed set keeps the cost of an epoch predictable.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .features import FeatureSet

__all__ = ["BlockReader", "DEFAULT_READ_THREADS", "block_nbytes"]

DEFAULT_READ_THREADS = 4  # Zarr decodes a block's chunks concurrently too: a few are enough


def block_nbytes(data: dict[str, np.ndarray]) -> int:
    """Bytes held by one decoded block (what the cache budget counts)."""
    return int(sum(a.nbytes for a in data.values()))


class BlockReader:
    """Futures of decoded blocks (``FeatureSet.read_block``) for several feature sets."""

    def __init__(self, sets: list[FeatureSet], *, threads: int = DEFAULT_READ_THREADS,
                 cache_bytes: float = 0, pooled: dict[str, bool] | None = None):
        self.sets = {fs.name: fs for fs in sets}
        self.pooled = pooled or {}  # set name -> read its pooled vectors too (default True)
        self.threads = max(1, min(int(threads), os.cpu_count() or 1, 32))
        self.cache_bytes = max(0.0, float(cache_bytes or 0))
        self.cached: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.cached_nbytes = 0
        self.reads = 0  # blocks read from storage (tests and benchmarks look at this)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _read(self, name: str, b: int) -> dict[str, np.ndarray]:
        data = self.sets[name].read_block(b, pooled=self.pooled.get(name, True))
        with self._lock:
            self.reads += 1
            size = block_nbytes(data)
            if self.cached_nbytes + size <= self.cache_bytes:
                self.cached[(name, b)] = data
                self.cached_nbytes += size
        return data

    def fetch(self, blocks: dict[str, np.ndarray]) -> dict[str, dict[int, Future]]:
        """``{set name: {block: future of its decoded data}}`` for ``{set name: blocks}``;
        cached blocks come back as completed futures, the others are submitted to the pool."""
        out: dict[str, dict[int, Future]] = {}
        for name, bs in blocks.items():
            out[name] = {}
            for b in map(int, bs):
                hit = self.cached.get((name, b))
                if hit is not None:
                    fut: Future = Future()
                    fut.set_result(hit)
                elif self.threads == 1:
                    fut = Future()
                    try:
                        fut.set_result(self._read(name, b))
                    except BaseException as e:  # noqa: BLE001 - raised by .result()
                        fut.set_exception(e)
                else:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(self.threads,
                                                        thread_name_prefix="embedstore-read")
                    fut = self._pool.submit(self._read, name, b)
                out[name][b] = fut
        return out

    @staticmethod
    def resolve(futures: dict[str, dict[int, Future]]) -> dict[str, dict[int, Any]]:
        """Wait for every block of a :meth:`fetch` (re-raising a read's error)."""
        return {name: {b: f.result() for b, f in fs.items()} for name, fs in futures.items()}

    def close(self) -> None:
        """Stop the pool (pending reads are cancelled); the cache stays."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
