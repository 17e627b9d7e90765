"""Issue 15: run probabilities that scale (docs/runs.md section 2.3): dense below
dense_max_classes, top-k above, read by every consumer through Run.probs(split)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score
from typer.testing import CliRunner

import fusion.probs
from cli.fusion_app import app
from fusion.leaderboard import compare
from fusion.metrics import per_class_f1
from fusion.predict import predict
from fusion.probs import TopK, layout_for, mean_topk, to_topk
from fusion.report import complementarity, frequency_f1
from fusion.rundir import load_run, write_run
from fusion.stack import stack
from fusion.testing import make_many_class_runs, make_synthetic_runs
from fusion.train import train

from .conftest import make_complementary_store


def _rewrite(run, out, **kw):
    """``run`` written again through write_run (e.g. in the other layout)."""
    labels = np.asarray(run.config["labels"])
    assignment = np.asarray(run.config["folds"]["assignment"])
    ids = [f"item-{i:05d}" for i in range(len(labels))]
    return write_run(out, config={k: v for k, v in run.config.items() if k != "probs"},
                     metrics={"head": run.head, "kind": "train"}, oof=run.probs("oof"),
                     oof_rows=run.oof_rows, holdout=run.probs("holdout"),
                     holdout_rows=run.holdout_rows, ids=ids, labels=labels, folds=assignment,
                     classes=run.classes, holdout_folds=run.holdout_folds, **kw)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same probabilities stored dense and top-k (k=3 of 12 classes)."""
    d = tmp_path_factory.mktemp("topk")
    srcs = make_synthetic_runs(d / "src", n_items=600, n_classes=12, n_runs=3,
                               holdout_folds=True)
    dense = [load_run(p) for p in srcs]
    topk = [_rewrite(r, d / f"{r.name}-topk", top_k=3, dense_max_classes=4) for r in dense]
    return dense, topk


def test_layout_is_dense_up_to_the_threshold_then_topk():
    assert layout_for(256) == {"layout": "dense"}
    assert layout_for(257) == {"layout": "topk", "k": 20}
    assert layout_for(5600, top_k=50) == {"layout": "topk", "k": 50}
    big = layout_for(300, top_k=300)  # k >= K: nothing to save, stored dense with a note
    assert big["layout"] == "dense" and "300 classes" in big["note"]
    with pytest.raises(ValueError, match="--top-k-store must be >= 1"):
        layout_for(300, top_k=0)


def test_topk_run_files_and_sizes(pair):
    dense, topk = pair
    r = topk[0]
    assert r.layout == "topk" and r.config["probs"] == {"layout": "topk", "k": 3}
    names = {p.name for p in r.path.iterdir()}
    assert {"oof.topk.npz", "holdout.topk.npz", "holdout_folds.topk.npz"} <= names
    assert not names & {"oof.npy", "holdout.npy", "holdout_folds.npy"}
    t = r.probs("oof")
    assert isinstance(t, TopK) and t.idx.dtype == np.int32 and t.p.dtype == np.float16
    assert t.rest.dtype == np.float32 and t.shape == dense[0].oof.shape
    np.testing.assert_allclose(t.sums(), 1.0, atol=1e-6)
    assert r.probs("holdout_folds").shape == dense[0].holdout_folds.shape
    assert dense[0].layout == "dense" and isinstance(dense[0].probs("oof"), np.ndarray)


def test_metrics_from_the_argmax_are_identical_in_both_layouts(pair):
    dense, topk = pair
    for d, t in zip(dense, topk, strict=True):
        np.testing.assert_array_equal(t.probs("oof").argmax(1), d.oof.argmax(1))
        np.testing.assert_array_equal(t.probs("holdout").argmax(1), d.holdout.argmax(1))
        for key in ("accuracy", "macro_f1", "per_class_f1", "n"):
            assert t.metrics[key] == d.metrics[key], key
            assert t.metrics["holdout"][key] == d.metrics["holdout"][key], key
        assert frequency_f1(t) == frequency_f1(d)
        assert (t.path / "predictions.csv").read_text().splitlines()[1].split(",")[:5] == \
            (d.path / "predictions.csv").read_text().splitlines()[1].split(",")[:5]
    # the leaderboard, paired bootstrap included, ranks both layouts on the same numbers
    keys = ("macro_f1", "accuracy", "holdout_macro_f1", "holdout_accuracy", "holdout_vs",
            "oof_vs", "tied")
    a, b = compare(dense, resamples=200), compare(topk, resamples=200)
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert complementarity(topk[0], topk[1]) == complementarity(dense[0], dense[1])


def test_an_old_dense_run_without_a_probs_entry_still_loads(pair):
    dense, _ = pair
    f = dense[0].path / "config.json"
    cfg = json.loads(f.read_text())
    cfg.pop("probs", None)
    f.write_text(json.dumps(cfg))
    r = load_run(dense[0].path)
    assert r.layout == "dense" and isinstance(r.probs("oof"), np.ndarray)


def test_a_dense_run_stacks_with_a_topk_run(pair, tmp_path):
    dense, topk = pair
    mixed = [dense[0].path, topk[1].path, topk[2].path]
    run = stack(mixed, stacker="logreg", out=tmp_path / "mixed", threads=1)
    assert run.metrics["macro_f1"] > max(d.metrics["macro_f1"] for d in dense) - 0.05
    cand = stack(mixed, stacker="candidate", out=tmp_path / "cand", threads=1)
    assert cand.metrics["accuracy"] > 0.5


def test_to_topk_keeps_the_first_maximum_and_mean_topk_is_exact_on_kept_classes():
    p = np.full((2, 6), 0.1, np.float32)
    p[0, [1, 4]] = 0.3  # a tie for the maximum: the lower index wins, as in argmax
    p[1, 5] = 0.5
    t = to_topk(p / p.sum(1, keepdims=True), 2)
    np.testing.assert_array_equal(t.argmax(1), p.argmax(1))
    rng = np.random.default_rng(0)
    a, b = rng.dirichlet(np.ones(50), 40), rng.dirichlet(np.ones(50), 40)
    ta, tb = to_topk(a, 50), to_topk(b, 50)  # k = K: every class kept, so the mean is exact
    m = mean_topk([ta, tb], k=50)
    np.testing.assert_allclose(m.dense(), (ta.dense() + tb.dense()) / 2, atol=2e-3)


def test_cli_top_k_store_below_one_is_one_line(small_store, tmp_path):
    res = CliRunner().invoke(app, ["train", "--store", str(small_store.url), "--head", "concat",
                                   "--top-k-store", "0", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "--top-k-store must be >= 1" in res.output


def test_compare_and_stack_read_topk_runs_at_many_classes(tmp_path):
    srcs = make_many_class_runs(tmp_path / "src", n_items=1200, n_classes=600, n_runs=2)
    r = load_run(srcs[0])
    assert r.layout == "topk" and r.probs("oof").shape == (len(r.oof_rows), 600)
    # the many-class run's files hold k columns, not K
    assert (r.path / "oof.topk.npz").stat().st_size < len(r.oof_rows) * 20 * 7 + 4096
    rows = compare(srcs, resamples=100)
    assert {row["name"] for row in rows} == {"run0", "run1"}
    res = CliRunner().invoke(app, ["compare", *map(str, srcs)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_train_writes_topk_with_the_same_argmax_metrics_as_dense(small_store, tmp_path,
                                                                  monkeypatch, seeds):
    """A 3-class store with the threshold lowered to 2 classes trains into a top-2 run whose
    argmax metrics equal the dense run's (same seed, same fold models on CPU)."""
    kw = {"epochs": 2, "folds": 2, "seeds": seeds, "device": "cpu", "threads": 1}
    dense = train(small_store, "concat", out=tmp_path / "dense", **kw)
    monkeypatch.setattr("fusion.probs.DENSE_MAX_CLASSES", 2)
    topk = train(small_store, "concat", out=tmp_path / "topk", top_k_store=2, **kw)
    assert dense.layout == "dense" and topk.layout == "topk"
    assert topk.config["probs"] == {"layout": "topk", "k": 2}
    assert topk.probs("holdout_folds").shape == dense.holdout_folds.shape
    if len(seeds) == 1:  # one seed: no mean over seeds, so the argmax cannot move
        for key in ("accuracy", "macro_f1", "per_class_f1"):
            assert topk.metrics[key] == dense.metrics[key], key
    np.testing.assert_allclose(topk.probs("oof").dense().sum(1), 1.0, atol=1e-3)
    assert [s["accuracy"] for s in topk.metrics["seeds"]] == \
        [s["accuracy"] for s in dense.metrics["seeds"]]


def test_per_class_f1_from_counts_equals_sklearn_at_many_classes():
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 300, 2000), rng.integers(0, 300, 2000)
    pred[:1200] = y[:1200]
    want = f1_score(y, pred, labels=range(310), average=None, zero_division=0)
    np.testing.assert_allclose(per_class_f1(y, pred, 310), want)


def test_predict_in_many_row_blocks_equals_one_block(tmp_path, monkeypatch):
    """`fusion predict` at many classes works a BLOCK_BYTES block of rows at a time: the blocks
    join into what one block gives, and into the run's own top-k holdout."""
    store = make_complementary_store(tmp_path / "s.zarr", n=200)
    monkeypatch.setattr(fusion.probs, "DENSE_MAX_CLASSES", 4)  # 6 classes: top-k runs
    run = train(store, "concat", out=tmp_path / "run", epochs=1, folds=2, batch_size=32, dim=8,
                hidden=8, top_k_store=2)
    one = predict(run.path, store.url, rows="holdout", keep=2)
    monkeypatch.setattr(fusion.probs, "BLOCK_BYTES", 4 * 6 * 7)  # 7 rows a block
    many = predict(run.path, store.url, rows="holdout", keep=2)
    assert isinstance(many.probs, TopK) and len(many.rows) == 40 > 7
    assert many.probs.equals(one.probs) and np.array_equal(many.rows, one.rows)
    np.testing.assert_array_equal(many.probs.idx, run.holdout.idx)
    np.testing.assert_allclose(many.probs.p.astype(np.float32),
                               run.holdout.p.astype(np.float32), atol=2e-3)
