"""`fusion train` memory at many rows and classes (issue 15): the pooled features are gathered
batch by batch (never a per-fold copy), and probabilities are predicted and ranked one
K-sized block at a time (never an N x K array).

NumPy reports its allocations to ``tracemalloc``, so these tests count bytes, not time or RSS:
the peak of what NumPy holds while training, against the size a regression would add.
"""

from __future__ import annotations

import importlib
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import fusion.probs
import fusion.results
from embedstore import create_store
from fusion.config import TrainConfig
from fusion.data import cached_batches, prepare
from fusion.heads import create_head
from fusion.loop import predict, predict_blocks
from fusion.train import train

from .conftest import fill_image, fill_text

N_ITEMS = 4000


def _store(path, n_classes: int, dim: int):
    labels = np.random.default_rng(0).integers(0, n_classes, N_ITEMS)
    store = create_store(path, [f"i{i:05d}" for i in range(N_ITEMS)],
                         [f"c{c:04d}" for c in labels],
                         classes=[f"c{c:04d}" for c in range(n_classes)], folds=5, seed=0,
                         holdout=0.2)
    fill_text(store, "txt", np.ones(N_ITEMS, int), layers=(6,), dim=dim, block_rows=512)
    fill_image(store, "img", n_regions=2, dim=dim, block_rows=512)
    return store


@contextmanager
def _numpy_peak():
    """Yields a dict whose ``bytes`` is, on exit, the peak NumPy (and Python) allocation above
    what was held on entry."""
    out = {}
    # torch's first optimizer imports torch._dynamo (hundreds of modules, tens of MB of
    # Python objects): done before counting, as any earlier test in the session would have
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        yield out
        out["bytes"] = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


FIT = {"epochs": 1, "folds": 1, "patience": 1, "batch_size": 64, "device": "cpu", "threads": 1,
       "dim": 32, "hidden": 32}


def test_an_epoch_gathers_batches_without_a_per_fold_copy_of_the_features(tmp_path):
    store = _store(tmp_path / "s.zarr", n_classes=5, dim=1024)
    for name in ("txt", "img"):
        store.features[name].load_pooled()  # held before counting: the run reads these
    features = sum(store.features[n].pooled_all().nbytes for n in ("txt", "img"))  # 32.8 MB
    with _numpy_peak() as peak:
        run = train(store, "concat", **FIT)
    assert run.metrics["n"] > 0
    # measured 0.13 x: batches in flight (prefetch) and the run's small arrays; a copy of the
    # fold's fit rows alone would add 0.58 x the features
    assert peak["bytes"] < 0.3 * features, (peak["bytes"], features)


def test_predictions_at_many_classes_hold_one_block_not_n_by_k(tmp_path, monkeypatch):
    k = 1000  # > DENSE_MAX_CLASSES: the run stores top-k
    store = _store(tmp_path / "s.zarr", n_classes=k, dim=8)
    monkeypatch.setattr(fusion.probs, "BLOCK_BYTES", 16 * k * 4)  # 16-row blocks
    peaks: dict[str, int] = {}

    def measured(name, fn):
        def wrapper(*a, **kw):
            start = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            try:
                return fn(*a, **kw)
            finally:
                peaks[name] = max(peaks.get(name, 0), tracemalloc.get_traced_memory()[1] - start)
        return wrapper

    train_module = importlib.import_module("fusion.train")  # `fusion.train` is the function
    monkeypatch.setattr(train_module, "validate", measured("validate", train_module.validate))
    monkeypatch.setattr(fusion.results.FoldResults, "add",
                        measured("add", fusion.results.FoldResults.add))
    with _numpy_peak():
        run = train(store, "concat", **FIT)
    assert run.layout == "topk"
    n_inner = run.metrics["folds"][0]["n_inner"]
    n_pred = max(int((store.folds == 0).sum()), int((store.folds == -1).sum()))
    # dense (rows, K) float32 would be 4 kB a row; a top-20 row is 124 B (kept twice, briefly),
    # plus one block and its ranking scratch (about 4 blocks)
    assert peaks["validate"] < 0.3 * n_inner * k * 4, (peaks, n_inner)
    assert peaks["add"] < 0.3 * n_pred * k * 4, (peaks, n_pred)


@pytest.mark.parametrize("rows_per_block", [1, 7, 64, 10_000])
def test_predict_blocks_equal_predict_whatever_the_block(small_store, rows_per_block):
    s = prepare(small_store, "concat", None, None,
                TrainConfig(batch_size=4, device="cpu", options={"dim": 8, "hidden": 8}))
    torch.manual_seed(0)
    model = create_head("concat", **s.dims, dim=8, hidden=8)
    rows = np.arange(small_store.n_items)[::-1].copy()
    want_p, want_r = predict(model, cached_batches(s, rows), s.device)
    blocks = [(p.copy(), r.copy()) for p, r in predict_blocks(
        model, cached_batches(s, rows), s.device, lambda k: rows_per_block)]
    assert all(len(p) <= rows_per_block for p, _ in blocks)
    np.testing.assert_array_equal(np.concatenate([p for p, _ in blocks]), want_p)
    np.testing.assert_array_equal(np.concatenate([r for _, r in blocks]), want_r)
    np.testing.assert_array_equal(want_r, rows)


def test_block_rows_follow_the_byte_budget():
    assert fusion.probs.block_rows(5600, budget=8 << 20) == 374
    assert fusion.probs.block_rows(27, budget=8 << 20) == (8 << 20) // 108
    assert fusion.probs.block_rows(10**9, budget=8 << 20) == 1  # never zero rows
