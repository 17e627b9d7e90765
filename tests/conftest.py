"""Shared fixtures: tiny synthetic stores built with the writer API."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fill_text(store, name: str, lengths, *, layers=(5, 6), dim: int = 8, block_rows: int = 16,
              seed: int = 0, attrs=None):
    """Write a complete text feature set with random tokens; returns the per-row arrays."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    toks = [rng.standard_normal((int(n), len(layers), dim)).astype(np.float16) for n in lengths]
    pooled = rng.standard_normal((len(lengths), dim)).astype(np.float32)
    w = store.create_feature(name, modality="text", dim=dim, lengths=lengths, layers=list(layers),
                             block_rows=block_rows,
                             attrs=attrs or {"encoder": {"spec": "test:random"}})
    with w:
        for b in w.pending_blocks():
            s, e = w.block_range(b)
            w.write_block(b, tokens=toks[s:e], pooled=pooled[s:e])
    return toks, pooled


def fill_image(store, name: str, *, n_regions: int = 5, dim: int = 6, prefix: int = 1,
               block_rows: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    n = store.n_items
    regions = rng.standard_normal((n, n_regions, dim)).astype(np.float16)
    pooled = rng.standard_normal((n, dim)).astype(np.float32)
    w = store.create_feature(name, modality="image", dim=dim, n_regions=n_regions,
                             prefix_tokens=prefix, grid=[2, 2], block_rows=block_rows,
                             attrs={"encoder": {"spec": "test:random"}})
    with w:
        for b in w.pending_blocks():
            s, e = w.block_range(b)
            w.write_block(b, regions=regions[s:e], pooled=pooled[s:e])
    return regions, pooled


@pytest.fixture
def small_store(tmp_path):
    """50 items, 3 classes, a text set (ragged 0..9 tokens, 2 layers) and an image set."""
    from embedstore import create_store

    n = 50
    ids = [f"item-{i:03d}" for i in range(n)]
    labels = [["shoe", "bag", "hat"][i % 3] for i in range(n)]
    store = create_store(tmp_path / "small.zarr", ids, labels, folds=5, seed=0, holdout=0.2)
    lengths = np.arange(n) % 10
    toks, tpooled = fill_text(store, "txt", lengths)
    regions, ipooled = fill_image(store, "img")
    store.expected = {"tokens": toks, "text_pooled": tpooled, "regions": regions,
                      "image_pooled": ipooled, "lengths": lengths}
    return store
