"""The pieces of the extraction pipeline around the encoder.

* :class:`TextBatches` / :class:`ImageBatches`: datasets run in DataLoader workers (picklable:
  they hold the encoder's tokenizer/transform, never the model); :func:`length_buckets` plans
  text batches;
* :func:`to_host` / :func:`f16`: the device->host copy (non-blocking, pinned) of an encoder's
  outputs;
* :class:`Background`: the one thread that completes those copies, scatters rows into block
  buffers and writes whole blocks to Zarr, so the encoder never waits for storage.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..format import ABSENT_IMAGE

__all__ = ["Background", "ImageBatches", "TextBatches", "f16", "length_buckets", "make_loader",
           "to_host"]

_F16_MAX = float(np.finfo(np.float16).max)


def length_buckets(rows: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of ``rows`` (one block's) sorted by token count, so each batch pads to a length
    close to its texts' own; the sort is stable, so the plan is deterministic."""
    rows = rows[np.argsort(lengths[rows], kind="stable")]
    return [rows[j : j + batch_size] for j in range(0, len(rows), batch_size)]


class TextBatches(torch.utils.data.Dataset):
    """Item = one length-bucketed batch of rows -> tokenised tensors (in a worker)."""

    def __init__(self, batches: list[np.ndarray], texts: Sequence[str], tokenize: Callable):
        self.batches, self.texts, self.tokenize = batches, texts, tokenize

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        rows = self.batches[i]
        return rows, self.tokenize([self.texts[r] for r in rows])


class ImageBatches(torch.utils.data.Dataset):
    """Item = one batch of rows -> (rows, rows that decoded, their stacked pixels, errors by
    row). A bad image is a per-row error, never a failed batch."""

    def __init__(self, batches: list[np.ndarray], sources: Sequence[str | None],
                 load: Callable, shape: tuple[int, ...]):
        self.batches, self.sources, self.load, self.shape = batches, sources, load, shape

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        rows = self.batches[i]
        pix, ok, errs = [], [], {}
        for r in rows:
            src = self.sources[r]
            if src is None:
                errs[int(r)] = ABSENT_IMAGE  # absent (presence 0), not a failure
                continue
            try:
                pix.append(self.load(src))
                ok.append(int(r))
            except Exception as e:  # noqa: BLE001 - any decode failure is a per-row error
                errs[int(r)] = f"{type(e).__name__}: {e}"[:300]
        stacked = torch.stack(pix) if pix else torch.zeros((0, *self.shape))  # (B_ok, 3, H, W)
        return rows, np.array(ok, dtype=np.int64), stacked, errs


def _no_collate(item: Any) -> Any:
    """Keep items as they are (the default would turn the numpy row arrays into tensors)."""
    return item


def make_loader(ds: torch.utils.data.Dataset, num_workers: int, device: str):
    return torch.utils.data.DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_no_collate,
        pin_memory=device.startswith("cuda"), persistent_workers=False,
        prefetch_factor=4 if num_workers else None)


def to_host(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """Start copying ``tensors`` to the host. On CUDA the copy is non-blocking into pinned
    memory; the returned event must be synchronised before the host tensors are read."""
    host, event = {}, None
    for k, t in tensors.items():
        if t.device.type == "cuda":
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            host[k] = h
            if event is None:
                event = torch.cuda.Event()
        else:
            host[k] = t
    if event is not None:
        event.record()
    return host, event


def f16(t: torch.Tensor) -> torch.Tensor:
    """fp16 for storage, clipped first (on the device) so large activations do not become inf."""
    return t.clamp(-_F16_MAX, _F16_MAX).to(torch.float16)


class Background:
    """One thread that runs tasks in submission order. Back-pressure: at most ``max_writes``
    block writes and ``max_batches`` batch copies in flight; the first failure stops later
    tasks and is raised in the main thread at the next submit or at close."""

    def __init__(self, max_writes: int = 2, max_batches: int = 8):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedstore-writer")
        self.limits = {"write": max_writes, "batch": max_batches}
        self.pending: dict[str, deque[Future]] = {"write": deque(), "batch": deque()}
        self.seconds = 0.0
        self._failed = threading.Event()

    def submit(self, kind: str, fn: Callable[[], None]) -> None:
        q = self.pending[kind]
        while q and q[0].done():
            q.popleft().result()
        while len(q) >= self.limits[kind]:
            q.popleft().result()

        def run() -> None:
            if self._failed.is_set():
                return
            t = time.perf_counter()
            try:
                fn()
            except BaseException:
                self._failed.set()
                raise
            self.seconds += time.perf_counter() - t

        q.append(self.pool.submit(run))

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every task (blocks in flight are finished, also on Ctrl-C)."""
        try:
            for q in self.pending.values():
                while q:
                    f = q.popleft()
                    if raise_errors:
                        f.result()
                    else:
                        f.exception()
        finally:
            self.pool.shutdown(wait=True)
