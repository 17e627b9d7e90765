"""The blend `auto` considers after its candidates (fusion/stack/blend.py): weights chosen by
greedy selection on the candidates' out-of-fold rows of the other folds only (never the holdout,
never the fold they score), recorded in the run, and a saved blend predicts its own holdout
(`fusion predict`, both holdout schemes)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import fusion
from fusion.errors import StackError
from fusion.metrics import classification_metrics
from fusion.predict import predict
from fusion.rundir import load_run
from fusion.stack import AUTO_CANDIDATES, auto, create_stacker, stack
from fusion.stack import procedure as proc
from fusion.stack.auto import auto_candidates
from fusion.stack.blend import BLEND
from fusion.stack.stackers.ensemble import greedy_selection
from fusion.testing import make_synthetic_runs

from .conftest import make_complementary_store

FIT = dict(epochs=3, batch_size=64, threads=1)
# the candidates' own defaults, shortened for a test (auto passes AUTO_PARAMS to each candidate)
FAST = {"lightgbm": {"n_estimators": 40}, "mlp": {"max_epochs": 15}}


@pytest.fixture(autouse=True)
def fast_candidates(monkeypatch):
    monkeypatch.setattr(proc, "AUTO_PARAMS", FAST)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    return root, make_synthetic_runs(root / "runs", n_items=500, n_classes=5, n_runs=3, seed=3,
                                     holdout_folds=True)


def _blend(run) -> dict:
    return json.loads((run.path / "weights" / "blend.json").read_text())


def test_fold_weights_are_chosen_on_the_other_folds_oof_rows_and_score_their_fold(synthetic):
    root, srcs = synthetic
    run = stack(srcs, threads=1, out=root / "auto")
    sel = run.config["selection"]
    assert [c["stacker"] for c in sel["candidates"]] == [*AUTO_CANDIDATES, BLEND]
    rec = sel["blend"]
    assert rec == _blend(run) or run.config["stacker"] != BLEND
    # each candidate alone, same seed: its OOF rows are the blend's inputs (deterministic)
    members = [load_run(stack(srcs, stacker=n, params=FAST.get(n), threads=1,
                              out=root / f"m-{n}").path) for n in AUTO_CANDIDATES]
    oof = np.stack([m.oof for m in members])  # (M, N, K), rows follow oof_rows
    labels = np.asarray(run.config["labels"])
    y = labels[run.oof_rows]
    folds = np.asarray(run.config["folds"]["assignment"])[run.oof_rows]
    blended = np.zeros(oof.shape[1:])
    for tag, w in zip(rec["fold_tags"], rec["fold_weights"], strict=True):
        f = int(tag[4:])
        want, _ = greedy_selection(oof[:, folds != f], y[folds != f], rec["size"])
        np.testing.assert_allclose(w, want, atol=1e-12)
        blended[folds == f] = np.tensordot(w, oof[:, folds == f], axes=1)
    c = next(c for c in sel["candidates"] if c["stacker"] == BLEND)
    assert c["oof_macro_f1"] == pytest.approx(
        classification_metrics(y, blended)["macro_f1"], abs=1e-9)
    want_all, _ = greedy_selection(oof, y, rec["size"])
    np.testing.assert_allclose(rec["weights"], want_all, atol=1e-12)


def test_shuffling_the_holdout_labels_changes_no_weight_and_no_prediction(synthetic, tmp_path):
    root, srcs = synthetic
    base = stack(srcs, threads=1, out=tmp_path / "a")
    moved = []
    for p in srcs:  # the same runs with the holdout rows' labels shuffled, identically
        dst = tmp_path / "runs" / p.name
        shutil.copytree(p, dst)
        cfg = json.loads((dst / "config.json").read_text())
        labels = np.asarray(cfg["labels"])
        ho = np.load(dst / "holdout_rows.npy")
        labels[ho] = np.random.default_rng(1).permutation(labels[ho])
        cfg["labels"] = labels.tolist()
        (dst / "config.json").write_text(json.dumps(cfg))
        moved.append(dst)
    assert json.loads((moved[0] / "config.json").read_text())["labels"] != base.config["labels"]
    other = stack(moved, threads=1, out=tmp_path / "b")
    a, b = base.config["selection"]["blend"], other.config["selection"]["blend"]
    assert a["fold_weights"] == b["fold_weights"] and a["weights"] == b["weights"]
    np.testing.assert_array_equal(base.oof, other.oof)
    np.testing.assert_array_equal(base.holdout, other.holdout)


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend-store")
    store = make_complementary_store(root / "c.zarr", n=240)
    runs = [fusion.train(store, h, out=root / "runs" / h, **FIT) for h in ("text", "image")]
    return store, runs, root


@pytest.mark.parametrize("scheme", ["per_fold", "refit"])
def test_a_saved_blend_predicts_its_own_holdout(store_runs, tmp_path, monkeypatch, scheme):
    store, runs, _ = store_runs
    monkeypatch.setattr(proc, "AUTO_TOLERANCE", -1.0)  # every later candidate wins: the blend
    paths = [r.path for r in runs]
    if scheme == "refit":  # a source without holdout_folds.npy (an older run)
        old = tmp_path / "image-old"
        shutil.copytree(paths[1], old)
        (old / "holdout_folds.npy").unlink()
        paths[1] = old
    st = stack(paths, threads=1, out=tmp_path / "s")
    assert st.config["stacker"] == BLEND and st.config["holdout_scheme"]["scheme"] == scheme
    rec = _blend(st)
    assert rec["used"] and all((st.path / "weights" / f"{n}-{t}.json").is_file()
                               for n in rec["used"]
                               for t in (rec["fold_tags"] if scheme == "per_fold" else ["refit"]))
    assert st.metrics["attribution"]["method"] is None
    pred = predict(st.path, store.url, rows="holdout", threads=1)
    assert pred.rows.tolist() == st.holdout_rows.tolist()
    np.testing.assert_allclose(pred.probs, st.holdout, atol=1e-4)
    assert (pred.probs.argmax(1) == st.holdout.argmax(1)).all()


# -- the candidate list and the log-linear pool ---------------------------------------------------
def test_auto_leaves_the_gbdt_out_above_its_work_bound_and_says_why(synthetic, monkeypatch):
    assert "lightgbm" in auto_candidates(24, 1600, 5)  # the demo catalogs' size keeps it
    assert "lightgbm" not in auto_candidates(27, 8000, 5)  # 10,000 items x 5 runs x 27
    assert auto_candidates(200, 10, 2) == ("candidate",)
    root, srcs = synthetic
    monkeypatch.setattr(auto, "AUTO_GBDT_MAX_WORK", 0)
    run = stack(srcs, threads=1, out=root / "no-gbdt")
    sel = run.config["selection"]
    assert [c["stacker"] for c in sel["candidates"]] == [
        *(c for c in AUTO_CANDIDATES if c != "lightgbm"), BLEND]
    assert "lightgbm is not a candidate" in sel["candidate_rule"]["why"]


def test_a_kept_gbdt_is_explained_after_the_choice_as_if_stacked_alone(synthetic, monkeypatch):
    root, srcs = synthetic
    monkeypatch.setattr(auto, "AUTO_CANDIDATES", ("lightgbm", "ensemble"))
    monkeypatch.setattr(proc, "AUTO_TOLERANCE", 1.0)  # nothing later wins: lightgbm is kept
    run = stack(srcs, threads=1, out=root / "gbdt-kept")
    alone = stack(srcs, stacker="lightgbm", params=FAST["lightgbm"], threads=1,
                  out=root / "gbdt-alone")
    assert run.config["stacker"] == "lightgbm" and run.metrics["attribution"]["method"]
    assert ((run.path / "contributions.csv").read_bytes()
            == (alone.path / "contributions.csv").read_bytes())


def test_loglinear_learns_which_run_to_trust_on_which_class(synthetic):
    _, srcs = synthetic
    runs = [load_run(p) for p in srcs]  # text: skilled on the first half, image: the second
    X = np.hstack([np.log(np.clip(r.oof, 1e-7, None)) for r in runs])
    y = np.asarray(runs[0].config["labels"])[runs[0].oof_rows]
    m = create_stacker("loglinear", n_classes=5, n_sources=3).fit(X, y)
    half = np.arange(5) < 2
    assert (m.a[0, half] > m.a[1, half]).all() and (m.a[1, ~half] > m.a[0, ~half]).all()
    pool = create_stacker("loglinear", n_classes=5, n_sources=3, params={"l2": 1e6}).fit(X, y)
    np.testing.assert_allclose(pool.a, 1 / 3, atol=1e-3)  # shrunk to the geometric mean
    with pytest.raises(StackError, match="unknown --params for stacker 'loglinear'"):
        create_stacker("loglinear", n_classes=5, params={"C": 1.0})
