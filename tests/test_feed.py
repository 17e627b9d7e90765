"""The streaming feed (issue 15 part 4): a shuffle that mixes the whole epoch on a store sorted
by category, every row exactly once per epoch in an order fixed by (seed, epoch), blocks read
ahead by a thread pool, decoded blocks kept across epochs within ``max_ram``."""

from __future__ import annotations

import numpy as np
import pytest

import embedstore as es
from embedstore import create_store
from embedstore.readahead import block_nbytes

from .conftest import fill_image, fill_text

K, PER, BLOCK = 24, 32, 16  # 768 rows sorted by class: 48 blocks of one class each


@pytest.fixture(scope="module")
def sorted_store(tmp_path_factory):
    """A catalog exported sorted by category: class c is rows c*32 .. c*32+31."""
    path = tmp_path_factory.mktemp("feed") / "sorted.zarr"
    labels = [f"cat{c:02d}" for c in np.repeat(np.arange(K), PER)]
    store = create_store(path, [f"p{i}" for i in range(K * PER)], labels, folds=2, seed=0,
                         holdout=0.0)
    lengths = np.arange(K * PER) % 5 + 1
    toks, _ = fill_text(store, "txt", lengths, layers=(0, 1, 2), dim=4, block_rows=BLOCK)
    regions, _ = fill_image(store, "img", n_regions=3, dim=4, block_rows=BLOCK)
    store = es.open_store(path)
    store.expected = {"tokens": toks, "regions": regions}
    return store


def fresh(store):
    """The store opened anew: a feature set loaded into RAM stays loaded in its Store."""
    return es.open_store(store.url)


def batch_entropy(loader) -> float:
    """Mean over batches of the label entropy (nats) of the batch."""
    out = []
    for b in loader:
        p = np.bincount(b["labels"].numpy()) / len(b["labels"])
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


def order(loader, epoch: int = 0) -> list[int]:
    loader.set_epoch(epoch)
    return [r for b in loader for r in b["rows"].tolist()]


def test_a_category_sorted_store_gives_batches_as_mixed_as_an_in_ram_shuffle(sorted_store):
    rows = np.arange(sorted_store.n_items)
    kw = {"image": "img", "fields": {"image_regions"}, "batch_size": 32, "shuffle": True}
    ram, stream, window4 = [], [], []
    for seed in range(3):
        ram.append(batch_entropy(fresh(sorted_store).loader(rows, max_ram=None, seed=seed,
                                                            **kw)))
        ld = sorted_store.loader(rows, max_ram=0, seed=seed, **kw)
        stream.append(batch_entropy(ld))
        window4.append(batch_entropy(sorted_store.loader(rows, max_ram=0, seed=seed,
                                                         window_blocks=4, **kw)))
    assert np.mean(ram) > 2.5  # ~24 classes in a batch of 32
    assert abs(np.mean(stream) - np.mean(ram)) < 0.1, (stream, ram)
    assert ld.streaming and ld.window_units(BLOCK) >= 48  # the default buffer: one window
    # the feed before: a window of 4 one-class blocks gives batches of at most 4 classes
    assert np.mean(window4) < np.log(4) + 1e-9 < np.mean(ram) - 1
    # a buffer of a third of the store still mixes a third of the classes into each batch
    per_block = sorted_store.features["img"].payload_nbytes / 48
    small = sorted_store.loader(rows, max_ram=0, seed=0, shuffle_buffer=2 * 16 * per_block, **kw)
    assert small.window_units(BLOCK) == 16
    assert batch_entropy(small) > 0.75 * np.mean(ram)


@pytest.mark.parametrize("window", [None, 3])
def test_an_epoch_covers_every_row_once_in_an_order_fixed_by_seed_and_epoch(sorted_store,
                                                                           window):
    rows = np.sort(np.random.default_rng(0).choice(sorted_store.n_items, 500, replace=False))
    kw = {"text": "txt", "batch_size": 37, "shuffle": True, "max_ram": 0,
          "window_blocks": window}
    a = sorted_store.loader(rows, seed=5, **kw)
    first = order(a, 0)
    assert sorted(first) == rows.tolist()  # every row, exactly once, odd batches included
    assert order(sorted_store.loader(rows, seed=5, read_threads=1, **kw), 0) == first
    assert order(a, 0) == first  # deterministic, also on a second pass
    second = order(a, 1)
    assert sorted(second) == rows.tolist() and second != first  # a new order per epoch
    assert order(sorted_store.loader(rows, seed=6, **kw), 0) != first  # and per seed
    ram = fresh(sorted_store).loader(rows, seed=5, **{**kw, "max_ram": None})
    assert sorted(order(ram, 0)) == rows.tolist()


def test_streamed_batches_hold_the_stored_values(sorted_store):
    exp = sorted_store.expected
    ld = sorted_store.loader(range(100, 300), text="txt", image="img", batch_size=23,
                             shuffle=True, max_ram=0, window_blocks=2, layers=[1, 2])
    for b in ld:
        for j, r in enumerate(b["rows"].tolist()):
            n = int(b["text_mask"][j].sum())
            np.testing.assert_array_equal(b["text_tokens"][j, :n].numpy(),
                                          exp["tokens"][r][:, 1:].astype(np.float32))
            np.testing.assert_array_equal(b["image_regions"][j].numpy(),
                                          exp["regions"][r].astype(np.float32))


def test_the_next_window_is_read_before_the_current_one_is_cut(sorted_store):
    ld = sorted_store.loader(range(sorted_store.n_items), image="img", batch_size=8,
                             max_ram=0, window_blocks=1, prefetch=0, read_threads=1)
    it = iter(ld)
    next(it)  # the first batch of window 0 ...
    assert ld.reader.reads == 2  # ... came after window 1's block was read (read-ahead)
    list(it)
    assert ld.reader.reads == 48  # each block once per epoch


def test_decoded_blocks_are_kept_across_epochs_within_max_ram(sorted_store):
    fs = sorted_store.features["img"]
    rows = np.arange(sorted_store.n_items)
    block = block_nbytes(fs.read_block(0, pooled=False))  # fp16 regions, row numbers: a feed
    assert block < block_nbytes(fs.read_block(0))  # of regions alone reads no pooled vector
    kw = {"image": "img", "fields": {"image_regions"}, "batch_size": 32, "shuffle": True}
    ld = sorted_store.loader(rows, max_ram=20 * block, **kw)  # 20 of the 48 blocks fit
    assert ld.streaming == [fs]
    plain = sorted_store.loader(rows, max_ram=0, **kw)
    for epoch in range(3):
        ld.set_epoch(epoch)
        plain.set_epoch(epoch)
        for a, b in zip(ld, plain, strict=True):  # the same batches, cached or not
            assert a["rows"].tolist() == b["rows"].tolist()
            assert np.array_equal(a["image_regions"].numpy(), b["image_regions"].numpy())
    assert len(ld.reader.cached) == 20 and ld.reader.cached_nbytes <= 20 * block
    assert ld.reader.reads == 48 + 2 * 28  # later epochs read only the blocks not kept
    assert plain.reader.reads == 3 * 48 and not plain.reader.cached  # max_ram=0: none kept
