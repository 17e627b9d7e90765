"""`fusion predict` on stack runs (issue 13 part 2): the source runs are predicted per fold model,
each saved stacker is reloaded from text / JSON / npz / safetensors and applied as the stack
scored its own holdout, so predicting the holdout rows reproduces the stack's holdout.npy, for
every registered stacker and both holdout schemes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import fusion
from cli.fusion_app import app
from fusion.errors import StackError
from fusion.predict import PredictError, predict
from fusion.stack import stack

from .conftest import make_complementary_store

runner = CliRunner()
FIT = dict(epochs=3, batch_size=64, threads=1)
FAST = {"lightgbm": {"n_estimators": 40}, "lightgbm-monotone": {"n_estimators": 30},
        "xgboost": {"n_estimators": 40}, "mlp": {"max_epochs": 15}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("pstack")
    store = make_complementary_store(root / "c.zarr", n=240)
    runs = [fusion.train(store, h, out=root / "runs" / h, **FIT) for h in ("text", "image")]
    return store, runs, root


@pytest.mark.parametrize("stacker", ["ensemble", "loglinear", "logreg", "mlp", "lightgbm",
                                     "lightgbm-monotone", "xgboost"])
def test_predicting_the_holdout_reproduces_the_stacks_holdout(sources, stacker):
    store, runs, root = sources
    st = stack([r.path for r in runs], stacker=stacker, params=FAST.get(stacker),
                      threads=1, out=root / "stacks" / stacker)
    assert st.config["holdout_scheme"]["scheme"] == "per_fold"
    pred = predict(st.path, store.url, rows="holdout", threads=1)
    assert pred.rows.tolist() == st.holdout_rows.tolist()
    # a stacker applied to other inputs (e.g. the fold-averaged probabilities) differs more
    np.testing.assert_allclose(pred.probs, st.holdout, atol=1e-4)
    assert (pred.probs.argmax(1) == st.holdout.argmax(1)).all()


def test_refit_scheme_and_stack_of_stacks_reproduce_their_holdout(sources, tmp_path):
    store, runs, _ = sources
    # a source without holdout_folds.npy (an older run) makes the stack use its refit model
    old = tmp_path / "image-old"
    shutil.copytree(runs[1].path, old)
    (old / "holdout_folds.npy").unlink()
    st = stack([runs[0].path, old], stacker="logreg", threads=1, out=tmp_path / "s1")
    assert st.config["holdout_scheme"]["scheme"] == "refit"
    np.testing.assert_allclose(predict(st, store, rows="holdout").probs, st.holdout, atol=1e-4)
    outer = stack([st.path, runs[0].path], stacker="ensemble", threads=1,
                         out=tmp_path / "s2")
    np.testing.assert_allclose(predict(outer, store, rows="holdout").probs, outer.holdout,
                               atol=1e-4)


def test_cli_stack_with_pooled_pca_predicts_unseen_rows_like_its_holdout(sources, tmp_path):
    store, runs, _ = sources
    out = tmp_path / "s-pooled"
    res = runner.invoke(app, ["stack", "-r", str(runs[0].path), "-r", str(runs[1].path),
                              "--stacker", "logreg", "--features", "probs+pooled", "--pooled",
                              "img", "--pooled-dims", "3", "--threads", "1", "--out", str(out),
                              "-q"])
    assert res.exit_code == 0, res.output
    st = fusion.load_run(out)
    assert st.config["pooled_sets"] == ["img"]
    csv_out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", "-r", str(out), "--store", store.url, "--rows",
                              "holdout", "--top-k", "2", "--out", str(csv_out), "-q"])
    assert res.exit_code == 0, res.output
    lines = csv_out.read_text().splitlines()
    assert len(lines) == 1 + len(st.holdout_rows)
    first = lines[1].split(",")
    assert first[0] == store.ids[st.holdout_rows[0]]
    assert abs(float(first[2]) - st.holdout[0].max()) < 1e-4


def test_stack_refusals_are_one_line(sources, tmp_path):
    store, runs, _ = sources
    st = stack([r.path for r in runs], stacker="ensemble", threads=1,
                      out=tmp_path / "st")
    # source run moved away (and not next to the stack either)
    moved = tmp_path / "moved"
    shutil.copytree(st.path, moved / "st")
    cfg = json.loads((moved / "st" / "config.json").read_text())
    cfg["sources"][0]["path"] = str(tmp_path / "gone" / "text")
    (moved / "st" / "config.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["predict", "-r", str(moved / "st"), "--store", store.url,
                              "--out", str(tmp_path / "x.csv")])
    assert res.exit_code == 2 and "copy it there" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.csv").exists()
    # runs copied together keep working: the source is found next to the stack
    shutil.copytree(runs[0].path, moved / "text")
    assert predict(moved / "st", store, rows=[0, 1]).probs.shape == (2, 6)
    # a source replaced by a run over other classes
    cfg = json.loads((st.path / "config.json").read_text())
    (st.path / "config.json").write_text(json.dumps({**cfg, "classes": cfg["classes"][::-1]}))
    with pytest.raises(PredictError, match="other classes"):
        predict(st.path, store, rows=[0])
    (st.path / "config.json").write_text(json.dumps(cfg))
    # a stack written before models were reloadable (no JSON sidecars)
    for p in (st.path / "weights").glob("*.json"):
        p.unlink()
    with pytest.raises(StackError, match="re-run `fusion stack`"):
        predict(st.path, store, rows=[0])


def test_many_classes_predict_top_k_and_candidate_stacks_reproduce_their_holdout(
        sources, tmp_path, monkeypatch):
    """With the dense/top-k threshold lowered below the store's 6 classes (as at the papers'
    K): head runs store top-3, `fusion predict` returns top-k blocks computed per block of rows
    (never N x K), and a candidate stack over them predicts its own holdout."""
    from fusion.probs import TopK

    store, _, root = sources
    monkeypatch.setattr("fusion.probs.DENSE_MAX_CLASSES", 4)
    runs = [fusion.train(store, h, out=tmp_path / h, top_k_store=3, **FIT)
            for h in ("text", "image")]
    assert runs[0].layout == "topk"
    pred = predict(runs[0], store, rows="holdout", keep=3)
    hold = runs[0].probs("holdout")
    assert isinstance(pred.probs, TopK) and pred.probs.k == 3
    assert (pred.probs.argmax(1) == hold.argmax(1)).all()
    np.testing.assert_allclose(pred.probs.p.astype(float), hold.p.astype(float), atol=2e-3)
    idx, p = pred.top_k(5)  # at most the kept k
    assert idx.shape == (len(pred.ids), 3) and (np.diff(p, axis=1) <= 0).all()
    st = stack([r.path for r in runs], stacker="candidate", threads=1,
               params={"n_estimators": 30}, out=tmp_path / "cand")
    assert st.config["source_k"] == 3
    sp = predict(st, store, rows="holdout")
    want = st.probs("holdout")
    assert isinstance(sp.probs, TopK)
    assert (sp.probs.argmax(1) == want.argmax(1)).all()
    want = want.dense() if isinstance(want, TopK) else want
    np.testing.assert_allclose(sp.probs.dense(), want, atol=2e-3)
