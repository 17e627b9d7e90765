"""What differs between extracting text and images, behind one interface used by the single
extraction loop in :mod:`embedstore.extract.pipeline`:

* ``create_kwargs``: the layout of the new feature set;
* ``plan(blocks)``: the batches, as ``(block, rows)``, in encoding order;
* ``dataset(plan)``: what DataLoader workers prepare for each batch;
* ``encode(block, rows, item)``: runs the encoder (main thread) and returns the task that the
  background thread runs to put the batch's rows into the block's buffer;
* ``write(block)``: writes one finished block (background thread).

Rows that need no encoding (empty texts) are in no batch; a missing or unreadable image is a
per-row error reported by the worker. Either way the row is written as zeros with its reason,
and the writer derives its presence from that reason (docs/format.md §2.5): an empty text or an
empty image value is *absent* (0), anything else that went wrong *failed* (2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..catalog import Catalog
from ..errors import InvalidInputError
from ..format import ABSENT_TEXT
from .batches import ImageBatches, TextBatches, f16, length_buckets, to_host

__all__ = ["GalleryJob", "ImageJob", "TextJob", "make_job"]

_COUNT_CHUNK = 4096  # texts per call of the token-count pre-pass


class _Job:
    modality: str

    def __init__(self, cat: Catalog, enc, batch_size: int):
        self.cat, self.enc, self.batch_size = cat, enc, batch_size
        self.writer: Any = None
        self.bufs: dict[int, Any] = {}  # background thread only

    def bind(self, writer, name: str) -> None:
        """Use ``writer`` (created or re-opened for this run)."""
        self.writer = writer
        meta = writer.meta
        self.dim = int(meta["dim"])
        self.pooled_dim = int(meta.get("pooled_dim", self.dim))

    def create_kwargs(self, attrs: dict) -> dict[str, Any]:
        raise NotImplementedError

    def plan(self, blocks: list[int]) -> list[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def dataset(self, plan: list[tuple[int, np.ndarray]]) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def encode(self, b: int, rows: np.ndarray, item: Any) -> Callable[[], None]:
        raise NotImplementedError

    def write(self, b: int) -> None:
        raise NotImplementedError


class TextJob(_Job):
    modality = "text"

    def __init__(self, cat: Catalog, enc, batch_size: int):
        super().__init__(cat, enc, batch_size)
        texts = cat.texts
        self.empty = np.array([not t for t in texts], dtype=bool)
        self.lengths = np.zeros(len(texts), dtype=np.int64)
        nonempty = np.flatnonzero(~self.empty)
        for i in range(0, len(nonempty), _COUNT_CHUNK):  # the pass that fixes the ragged layout
            rows = nonempty[i : i + _COUNT_CHUNK]
            self.lengths[rows] = enc.count_tokens([texts[r] for r in rows])

    def create_kwargs(self, attrs: dict) -> dict[str, Any]:
        enc = self.enc
        return dict(modality="text", dim=enc.dim, pooled_dim=enc.pooled_dim,
                    lengths=self.lengths, layers=enc.layers,
                    attrs={**attrs, "pooling": enc.pooling})

    def bind(self, writer, name: str) -> None:
        super().bind(writer, name)
        if not np.array_equal(writer.lengths(0, writer.n_items), self.lengths):
            raise InvalidInputError(f"--resume: token counts of {name!r} differ from the stored "
                                    "layout (tokenizer or texts changed); use --overwrite")
        self.n_layers = len(writer.meta["layers"])

    def plan(self, blocks: list[int]) -> list[tuple[int, np.ndarray]]:
        out = []
        for b in blocks:
            s, e = self.writer.block_range(b)
            rows = np.arange(s, e)[~self.empty[s:e]]
            out += [(b, batch) for batch in length_buckets(rows, self.lengths, self.batch_size)]
        return out

    def dataset(self, plan: list[tuple[int, np.ndarray]]) -> torch.utils.data.Dataset:
        return TextBatches([r for _, r in plan], self.cat.texts, self.enc.tokenize)

    def encode(self, b: int, rows: np.ndarray, item: Any) -> Callable[[], None]:
        _, batch = item
        out = self.enc.encode(batch)
        host, event = to_host({"tokens": f16(out["tokens"]), "mask": out["mask"],
                               "pooled": out["pooled"].float()})

        def scatter() -> None:
            if event is not None:
                event.synchronize()
            tok, mask = host["tokens"].numpy(), host["mask"].numpy()  # (B, T, L, D), (B, T)
            pooled = host["pooled"].numpy()  # (B, Dp)
            buf = self.bufs.setdefault(b, {})
            for j, r in enumerate(rows.tolist()):
                buf[r] = (tok[j][mask[j]], pooled[j])

        return scatter

    def write(self, b: int) -> None:
        s, e = self.writer.block_range(b)
        buf = self.bufs.pop(b, {})
        toks, pooled, errs = [], np.zeros((e - s, self.pooled_dim), np.float32), []
        for r in range(s, e):
            if self.empty[r]:
                toks.append(np.zeros((0, self.n_layers, self.dim), np.float16))
                errs.append(ABSENT_TEXT)
            else:
                t, p = buf[r]  # a KeyError here would be a bug: every non-empty row is encoded
                toks.append(t)
                pooled[r - s] = p
                errs.append("")
        self.writer.write_block(b, tokens=toks, pooled=pooled, errors=errs)


class ImageJob(_Job):
    modality = "image"

    def create_kwargs(self, attrs: dict) -> dict[str, Any]:
        enc = self.enc
        return dict(modality="image", dim=enc.dim, pooled_dim=enc.pooled_dim,
                    n_regions=enc.n_regions, grid=enc.grid, prefix_tokens=enc.prefix_tokens,
                    attrs=attrs)

    def bind(self, writer, name: str) -> None:
        super().bind(writer, name)
        self.n_regions = int(writer.meta["n_regions"])

    def slots(self, b: int) -> tuple[int, int]:
        """The image rows ``[lo, hi)`` of block ``b`` (one image per item: its item rows)."""
        return self.writer.block_range(b)

    def paths(self) -> list:
        """The image of every image row."""
        return self.cat.images

    def plan(self, blocks: list[int]) -> list[tuple[int, np.ndarray]]:
        out = []
        for b in blocks:
            lo, hi = self.slots(b)
            out += [(b, np.arange(j, min(j + self.batch_size, hi)))
                    for j in range(lo, hi, self.batch_size)]
        return out

    def dataset(self, plan: list[tuple[int, np.ndarray]]) -> torch.utils.data.Dataset:
        return ImageBatches([r for _, r in plan], self.paths(), self.enc.load_image,
                            tuple(self.enc.input_shape))

    def _buf(self, b: int) -> dict[str, Any]:
        if b not in self.bufs:
            lo, hi = self.slots(b)
            self.bufs[b] = {"regions": np.zeros((hi - lo, self.n_regions, self.dim), np.float16),
                            "pooled": np.zeros((hi - lo, self.pooled_dim), np.float32),
                            "errors": [""] * (hi - lo)}
        return self.bufs[b]

    def encode(self, b: int, rows: np.ndarray, item: Any) -> Callable[[], None]:
        _, ok, pix, errs = item  # image rows (see slots)
        host = event = None
        if len(ok):
            out = self.enc.encode(pix)
            host, event = to_host({"regions": f16(out["regions"]),
                                   "pooled": out["pooled"].float()})

        def scatter() -> None:
            base = self.slots(b)[0]
            buf = self._buf(b)
            if host is not None:
                if event is not None:
                    event.synchronize()
                buf["regions"][ok - base] = host["regions"].numpy()  # (B_ok, R, D)
                buf["pooled"][ok - base] = host["pooled"].numpy()  # (B_ok, Dp)
            for j, msg in errs.items():
                buf["errors"][j - base] = msg

        return scatter

    def write(self, b: int) -> None:
        buf = self._buf(b)
        self.bufs.pop(b)
        self.writer.write_block(b, regions=buf["regions"], pooled=buf["pooled"],
                                errors=buf["errors"])


class GalleryJob(ImageJob):
    """Several images per item (docs/format.md §2.6): batches are of *images* (the catalog's
    image lists flattened in item order), scattered into the block's image slots; the writer
    derives each item's pooled vector, error and presence from its images."""

    def __init__(self, cat: Catalog, enc, batch_size: int):
        super().__init__(cat, enc, batch_size)
        paths = [cat.image_paths(i) for i in range(len(cat))]
        self.counts = np.array([len(p) for p in paths], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)])  # item -> its first image
        self.flat = [p for ps in paths for p in ps]

    def create_kwargs(self, attrs: dict) -> dict[str, Any]:
        return {**super().create_kwargs(attrs), "n_images": self.counts}

    def bind(self, writer, name: str) -> None:
        super().bind(writer, name)
        if not writer.meta.get("gallery") or not np.array_equal(
                writer.lengths(0, writer.n_items), self.counts):
            raise InvalidInputError(f"--resume: the images per item of {name!r} differ from the "
                                    "stored gallery layout (catalog changed); use --overwrite")

    def slots(self, b: int) -> tuple[int, int]:
        s, e = self.writer.block_range(b)
        return int(self.first[s]), int(self.first[e])

    def paths(self) -> list:
        return self.flat

    def write(self, b: int) -> None:
        buf = self._buf(b)
        self.bufs.pop(b)
        self.writer.write_block(b, regions=buf["regions"], image_pooled=buf["pooled"],
                                image_errors=buf["errors"])


def make_job(modality: str, cat: Catalog, enc, batch_size: int, gallery: bool = False) -> _Job:
    """The job of one modality; ``gallery``: several images per item (§2.6)."""
    if modality == "text":
        return TextJob(cat, enc, batch_size)
    return (GalleryJob if gallery else ImageJob)(cat, enc, batch_size)
