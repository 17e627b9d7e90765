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


def make_complementary_store(path, n: int = 600, seed: int = 0, *, dim_t: int = 16,
                             dim_i: int = 12, noise: float = 1.0):
    """A store where the modalities are complementary by construction.

    Class c = (a, b) with a in 0..2 and b in 0..1 (6 classes). Text tokens carry a's signal in
    one random valid token (plus its mean-pooled trace); image regions carry b's signal in one
    random patch. Text alone can't see b, image alone can't see a, so a unimodal head tops out
    near 1/2 (text) or 1/3 (image) accuracy while fusion can reach ~1.
    """
    from embedstore import create_store

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, n)
    b = rng.integers(0, 2, n)
    y = a * 2 + b
    names = [f"c{a_}{b_}" for a_, b_ in zip(a, b, strict=True)]
    store = create_store(path, [f"p{i}" for i in range(n)], names, folds=5, seed=seed,
                         holdout=0.2)
    t_proto = rng.standard_normal((3, dim_t)) * 3
    i_proto = rng.standard_normal((2, dim_i)) * 3
    lengths = rng.integers(3, 12, n)
    toks, tpool = [], np.zeros((n, dim_t), np.float32)
    for r in range(n):
        t = rng.standard_normal((lengths[r], 2, dim_t)) * noise
        j = rng.integers(0, lengths[r])
        t[j, :, :] += t_proto[a[r]]
        toks.append(t.astype(np.float16))
        tpool[r] = t[:, -1].mean(0)
    n_reg = 5  # 1 prefix + 4 patches
    reg = rng.standard_normal((n, n_reg, dim_i)) * noise
    j = rng.integers(1, n_reg, n)
    reg[np.arange(n), j] += i_proto[b]
    reg[:, 0] = reg[:, 1:].mean(1)  # prefix token: a summary of the patches
    w = store.create_feature("txt", modality="text", dim=dim_t, lengths=lengths, layers=[1, 2],
                             block_rows=256, attrs={"encoder": {"spec": "synthetic"}})
    with w:
        for blk in w.pending_blocks():
            s, e = w.block_range(blk)
            w.write_block(blk, tokens=toks[s:e], pooled=tpool[s:e])
    w = store.create_feature("img", modality="image", dim=dim_i, n_regions=n_reg,
                             prefix_tokens=1, grid=[2, 2], block_rows=256,
                             attrs={"encoder": {"spec": "synthetic"}})
    with w:
        for blk in w.pending_blocks():
            s, e = w.block_range(blk)
            w.write_block(blk, regions=reg[s:e].astype(np.float16),
                          pooled=reg[s:e, 1:].mean(1).astype(np.float32))
    store.truth = y
    return store


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors: intra-op threads only add spin/sync overhead (measured 4x slower on a
    loaded 2-core machine), and one thread makes timings stable."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
