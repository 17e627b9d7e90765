"""fusion stack: refusals, leak-free cross-fitting, reproducibility, TreeSHAP sums, Dask, quality."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fusion import train
from fusion.errors import FusionError, StackError
from fusion.rundir import RunWriter, load_run
from fusion.stack import (
    Stacker,
    create_stacker,
    list_stackers,
    parse_params,
    plot_contributions,
    stack,
    summarize_contributions,
)
from fusion.testing import make_synthetic_runs

from .conftest import make_complementary_store

# The CI box has 2 cores shared with other jobs; at 600 rows a second GBDT thread only adds
# contention (measured 5-10x slower under load), so the tests pin one thread. Every other
# default is the shipped one.
ONE_THREAD = {"lightgbm": {"n_jobs": 1}, "xgboost": {"n_jobs": 1}, "logreg": None, "mlp": None,
              "ensemble": None, "lightgbm-monotone": {"n_jobs": 1}, "candidate": {"n_jobs": 1},
              "loglinear": None}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="module")
def sources(work) -> list[Path]:
    # 600 items, 6 classes, 5 folds + 20 % holdout: text good on c0-c2, image on c3-c5.
    return make_synthetic_runs(work / "runs", n_items=600, n_classes=6, n_runs=3, seed=0)


@pytest.fixture(scope="module")
def stacked(work, sources) -> dict:
    return {
        name: stack(
            sources, stacker=name, params=ONE_THREAD[name], seed=0, out=work / f"stack-{name}"
        )
        for name in list_stackers()
    }


def _features(paths: list[Path], pooled: np.ndarray | None = None, log: bool = False):
    """The stacker's feature matrix rebuilt independently: blocks in run order, store-row order
    (log-probabilities clipped at 1e-7 with ``log``, as the GBDTs see them by default)."""
    runs = [load_run(p) for p in paths]
    assignment = np.asarray(runs[0].config["folds"]["assignment"])
    trainable, holdout = np.flatnonzero(assignment >= 0), np.flatnonzero(assignment == -1)
    blocks_tr, blocks_ho = [], []
    for r in runs:
        tr = np.empty((len(assignment), r.oof.shape[1]))
        tr[r.oof_rows] = r.oof
        tr[r.holdout_rows] = r.holdout
        if log:
            tr = np.log(np.clip(tr, 1e-7, 1.0))
        blocks_tr.append(tr[trainable])
        blocks_ho.append(tr[holdout])
    X_tr, X_ho = np.hstack(blocks_tr), np.hstack(blocks_ho)
    if pooled is not None:
        X_tr, X_ho = np.hstack([X_tr, pooled[trainable]]), np.hstack([X_ho, pooled[holdout]])
    return X_tr, X_ho, assignment


def _rewrite(
    src: Path, dst: Path, *, config=None, oof=None, oof_rows=None, holdout=None, holdout_rows=None
) -> Path:
    """Copy a run with some parts replaced (a run written by someone else, or broken)."""
    r = load_run(src)
    cfg = dict(r.config, name=dst.name)
    cfg.update(config or {})
    with RunWriter(dst) as w:
        w.write_json("config.json", cfg)
        w.write_json("metrics.json", r.metrics)
        w.write_array("oof", r.oof if oof is None else oof)
        w.write_array("oof_rows", r.oof_rows if oof_rows is None else oof_rows)
        w.write_array("holdout", r.holdout if holdout is None else holdout)
        w.write_array("holdout_rows", r.holdout_rows if holdout_rows is None else holdout_rows)
        return w.finish()


# -- registry and params ------------------------------------------------------------------------
def test_registry_lists_the_eight_stackers():
    assert list_stackers() == ["candidate", "ensemble", "lightgbm", "lightgbm-monotone",
                               "loglinear", "logreg", "mlp", "xgboost"]


def test_unknown_stacker_is_refused_with_the_list(sources, tmp_path):
    with pytest.raises(StackError, match=r"unknown stacker 'catboost'; available: candidate, ensemble, lightgbm"):
        stack(sources, stacker="catboost", out=tmp_path / "s")


def test_parse_params_coerces_int_float_bool_none_and_str():
    got = parse_params(
        [
            "num_leaves=31",
            "learning_rate=0.05",
            "deterministic=true",
            "extra_trees=False",
            "max_bin=none",
            "boosting_type=dart",
            "x= 2 ",
            "min-child-samples=5",
        ]
    )
    assert got == {
        "num_leaves": 31,
        "learning_rate": 0.05,
        "deterministic": True,
        "extra_trees": False,
        "max_bin": None,
        "boosting_type": "dart",
        "x": 2,
        "min_child_samples": 5,
    }
    assert isinstance(got["num_leaves"], int) and isinstance(got["learning_rate"], float)


def test_parse_params_refuses_an_item_without_equals():
    with pytest.raises(FusionError, match=r"--params 'num_leaves' is not KEY=VALUE"):
        parse_params(["num_leaves"])


def test_bad_param_name_for_logreg_is_a_stack_error(sources, tmp_path):
    with pytest.raises(StackError, match=r"bad --params for stacker 'logreg'.*bogus"):
        stack(sources, stacker="logreg", params={"bogus": 1}, out=tmp_path / "s")


# -- refusals -----------------------------------------------------------------------------------
def test_refuses_fewer_than_two_runs(sources, tmp_path):
    with pytest.raises(StackError, match=r"at least 2 runs, got 1"):
        stack(sources[:1], out=tmp_path / "s")


def test_refuses_the_same_run_twice(sources, tmp_path):
    with pytest.raises(StackError, match=r"run 'text' .* is given twice"):
        stack([sources[0], sources[1], sources[0]], out=tmp_path / "s")


def test_refuses_a_copied_run_with_identical_probabilities(sources, tmp_path):
    copy = shutil.copytree(sources[1], tmp_path / "image-copy")
    with pytest.raises(
        StackError,
        match=r"runs 'image' \(.*runs/image\) and 'image' "
        r"\(.*image-copy\) hold identical probabilities",
    ):
        stack([sources[0], sources[1], copy], out=tmp_path / "s")


def test_refuses_runs_from_another_store(sources, tmp_path):
    other = _rewrite(
        sources[1],
        tmp_path / "image-other",
        config={
            "store": {
                "url": "x",
                "fingerprint": "deadbeef",
                "folds_fingerprint": "synthetic-folds-5-0.2-0",
            }
        },
    )
    with pytest.raises(StackError, match=r"run 'image-other' .* store fingerprint 'deadbeef'"):
        stack([sources[0], other], out=tmp_path / "s")


def test_refuses_runs_on_other_folds(sources, tmp_path):
    store = dict(load_run(sources[1]).config["store"], folds_fingerprint="folds-v2")
    other = _rewrite(sources[1], tmp_path / "image-f2", config={"store": store})
    with pytest.raises(StackError, match=r"run 'image-f2' .* uses folds 'folds-v2'"):
        stack([sources[0], other], out=tmp_path / "s")


def test_refuses_runs_with_other_classes(sources, tmp_path):
    classes = ["a", "b", "c", "d", "e", "f"]
    other = _rewrite(sources[1], tmp_path / "image-cls", config={"classes": classes})
    with pytest.raises(StackError, match=r"run 'image-cls' .* has classes \['a', 'b'"):
        stack([sources[0], other], out=tmp_path / "s")


def test_refuses_a_block_summing_to_two_the_notebook_aliasing_bug(sources, tmp_path):
    text, fusion = load_run(sources[0]), load_run(sources[2])
    # pandas aliasing in the notebook: cam_fla = cam; cam_fla += fla also changed cam.
    aliased = _rewrite(
        sources[0],
        tmp_path / "cam",
        oof=text.oof + fusion.oof,
        holdout=text.holdout + fusion.holdout,
    )
    with pytest.raises(
        StackError,
        match=r"run 'cam' .* rows of oof.npy do not sum to 1 "
        r"\(row 0 sums to 2.0000\); .* aliased",
    ):
        stack([aliased, sources[1]], out=tmp_path / "s")


def test_refuses_a_run_whose_oof_rows_miss_trainable_rows(sources, tmp_path):
    r = load_run(sources[1])
    short = _rewrite(sources[1], tmp_path / "image-short", oof=r.oof[:-5], oof_rows=r.oof_rows[:-5])
    with pytest.raises(
        StackError,
        match=r"run 'image-short' .* oof rows do not match the "
        r"store's 480 trainable .* \(5 missing",
    ):
        stack([sources[0], short], out=tmp_path / "s")


def test_refuses_pooled_features_without_the_pooled_array(sources, tmp_path):
    with pytest.raises(StackError, match=r"features='probs\+pooled' needs the pooled"):
        stack(sources, features="probs+pooled", out=tmp_path / "s")


# -- cross-fitting ------------------------------------------------------------------------------
# Leak-freedom is tested by behaviour, not by re-reading the bookkeeping the code writes from the
# same variable it trains on: (1) a spy on Stacker.fit sees the rows every model really got, and
# (2) relabelling one fold must leave that fold's stack predictions bit-identical (they come from
# a model that never saw those rows, early-stopping split included) while moving the others'.
SMALL = {
    "lightgbm": {"n_jobs": 1, "n_estimators": 60},
    "xgboost": {"n_jobs": 1, "n_estimators": 60},
    "logreg": None,
    "loglinear": None,
    "mlp": {"max_epochs": 20},
    "ensemble": None,
    "lightgbm-monotone": {"n_jobs": 1, "n_estimators": 60},
}


@pytest.mark.parametrize("name", ["lightgbm", "xgboost", "logreg", "mlp", "ensemble",
                                  "lightgbm-monotone", "loglinear"])
def test_every_model_is_fit_on_the_rows_cv_indices_records_none_of_its_scored_fold(
    sources, tmp_path, monkeypatch, name
):
    calls = []
    fit = Stacker.fit

    def spy(self, X, y, X_valid=None, y_valid=None, *, rounds=None):
        calls.append((len(X), np.array(y), None if y_valid is None else np.array(y_valid)))
        return fit(self, X, y, X_valid, y_valid, rounds=rounds)

    monkeypatch.setattr(Stacker, "fit", spy)
    run = stack(sources, stacker=name, params=SMALL[name], seed=0, out=tmp_path / "s")
    labels = np.asarray(run.config["labels"])
    assignment = np.asarray(run.config["folds"]["assignment"])
    cv = dict(np.load(run.path / "cv_indices.npz"))
    assert len(calls) == 6  # 5 fold models + the refit
    scored_all = []
    for f in range(5):
        n_fit, y_fit, y_valid = calls[f]
        fit_rows, valid, scored = cv[f"fold{f}_fit"], cv[f"fold{f}_valid"], cv[f"fold{f}_scored"]
        # what the model got is what cv_indices.npz says it got ...
        assert n_fit == len(fit_rows)
        np.testing.assert_array_equal(y_fit, labels[fit_rows])
        if y_valid is not None:
            np.testing.assert_array_equal(y_valid, labels[valid])
        # ... and none of it is from the fold it scored or from the holdout
        assert len(scored) > 0 and np.all(assignment[scored] == f)
        assert np.all(assignment[fit_rows] >= 0) and not np.any(assignment[fit_rows] == f)
        assert np.all(assignment[valid] >= 0) and not np.any(assignment[valid] == f)
        assert len(np.intersect1d(fit_rows, valid)) == 0
        if name in ("lightgbm", "xgboost", "mlp", "lightgbm-monotone"):  # early stopping on 10 % of training rows
            assert y_valid is not None and 0.08 <= len(valid) / (n_fit + len(valid)) <= 0.15
        else:
            assert y_valid is None and len(valid) == 0
        scored_all.append(scored)
    np.testing.assert_array_equal(
        np.sort(np.concatenate(scored_all)), np.flatnonzero(assignment >= 0)
    )
    n_refit, y_refit, _ = calls[5]
    np.testing.assert_array_equal(cv["refit_fit"], np.flatnonzero(assignment >= 0))
    np.testing.assert_array_equal(y_refit, labels[cv["refit_fit"]])
    np.testing.assert_array_equal(cv["refit_scored"], np.flatnonzero(assignment == -1))
    assert cv.keys() == run.extra["cv_indices"].keys()


@pytest.mark.parametrize("name", ["lightgbm", "xgboost", "logreg", "mlp", "ensemble",
                                  "lightgbm-monotone", "loglinear"])
def test_relabelling_one_fold_changes_no_stack_prediction_of_that_fold(
    stacked, sources, tmp_path, name
):
    base = stacked[name]
    labels = np.asarray(base.config["labels"])
    assignment = np.asarray(base.config["folds"]["assignment"])
    k = len(base.classes)
    f = 2
    relabelled = labels.copy()
    rows = np.flatnonzero(assignment == f)
    relabelled[rows] = (labels[rows] + 1) % k  # every row of fold 2 now has a wrong label
    moved = [
        _rewrite(p, tmp_path / "relabelled" / p.name, config={"labels": relabelled.tolist()})
        for p in sources
    ]
    again = stack(moved, stacker=name, params=ONE_THREAD[name], seed=0, out=tmp_path / "s")
    fold_of = assignment[base.oof_rows]
    np.testing.assert_array_equal(again.oof_rows, base.oof_rows)
    # fold 2 was scored by a model that never saw fold 2's labels: bit-identical predictions
    np.testing.assert_array_equal(again.oof[fold_of == f], base.oof[fold_of == f])
    # every other fold model trained on the new labels: the relabelling did reach the stacker
    for g in set(range(5)) - {f}:
        assert not np.array_equal(again.oof[fold_of == g], base.oof[fold_of == g]), g


def test_oof_rows_come_from_the_model_that_excluded_their_fold(stacked, sources):
    import lightgbm as lgb

    run = stacked["lightgbm"]
    X, _, assignment = _features(sources, log=True)
    fold_of = assignment[run.oof_rows]
    for f in range(5):
        booster = lgb.Booster(model_file=str(run.path / "weights" / f"fold{f}.lgb.txt"))
        rows = fold_of == f
        np.testing.assert_allclose(booster.predict(X[rows]), run.oof[rows], atol=1e-6)


def test_oof_alignment_follows_store_rows_not_file_order(work, sources, stacked, tmp_path):
    r = load_run(sources[1])
    perm = np.random.default_rng(1).permutation(len(r.oof))
    shuffled = _rewrite(sources[1], tmp_path / "image", oof=r.oof[perm], oof_rows=r.oof_rows[perm])
    again = stack(
        [sources[0], shuffled, sources[2]],
        stacker="lightgbm",
        params=ONE_THREAD["lightgbm"],
        out=tmp_path / "s",
    )
    assert (again.path / "oof.npy").read_bytes() == (
        stacked["lightgbm"].path / "oof.npy"
    ).read_bytes()


# -- outputs ------------------------------------------------------------------------------------
def test_output_is_a_stackable_run_with_metrics(stacked, sources):
    run = stacked["lightgbm"]
    assert run.config["kind"] == "stack" and run.config["head"] == "stack-lightgbm"
    assert run.config["feature_names"][:2] == ["text:c0", "text:c1"]
    assert run.config["params"]["subsample_freq"] == 1
    assert [s["name"] for s in run.config["sources"]] == ["text", "image", "fusion"]
    m = json.loads((run.path / "metrics.json").read_text())
    for key in (
        "head",
        "kind",
        "accuracy",
        "macro_f1",
        "holdout",
        "folds",
        "train_seconds",
        "sources",
    ):
        assert key in m
    assert len(m["folds"]) == 5 and set(m["holdout"]) >= {"accuracy", "macro_f1"}
    assert run.oof.shape == (480, 6) and run.holdout.shape == (120, 6)
    np.testing.assert_allclose(run.oof.sum(1), 1.0, atol=1e-5)
    lines = (run.path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "id,split,fold,true,predicted,probability" and len(lines) == 601
    # item ids come from the source runs' predictions.csv, in the stack's own row order
    first_row = int(run.oof_rows[0])
    assert lines[1].startswith(f"item-{first_row:05d},oof,")
    # a stack is itself a valid input: stack the lightgbm stack with the logreg stack
    meta = stack([run.path, stacked["logreg"]], stacker="logreg", out=run.path.parent / "meta")
    assert meta.config["kind"] == "stack" and meta.metrics["holdout"]["macro_f1"] > 0.9


def test_macro_f1_averages_all_k_classes_when_the_holdout_lacks_one(sources, tmp_path):
    # the test, stack side: the holdout's c5 items are unlabelled, so its labelled rows
    # lack c5; macro-F1 still averages all 6 classes (F1 0 for c5), as for heads.
    from sklearn.metrics import f1_score

    labels = np.asarray(load_run(sources[0]).config["labels"])
    assignment = np.asarray(load_run(sources[0]).config["folds"]["assignment"])
    k = 6
    labels[(assignment == -1) & (labels == k - 1)] = -1
    moved = [
        _rewrite(p, tmp_path / "src" / p.name, config={"labels": labels.tolist()}) for p in sources
    ]
    run = stack(moved, stacker="logreg", out=tmp_path / "s")
    on_disk = json.loads((run.path / "metrics.json").read_text())
    y_ho, p_ho = labels[run.holdout_rows], run.holdout.argmax(1)
    keep = y_ho >= 0
    assert k - 1 not in set(y_ho[keep].tolist()) and keep.sum() == 100
    want = f1_score(y_ho[keep], p_ho[keep], labels=range(k), average="macro", zero_division=0)
    present_only = f1_score(y_ho[keep], p_ho[keep], labels=np.unique(y_ho[keep]), average="macro")
    assert want < present_only - 0.1  # the two definitions differ on this split
    for m in (run.metrics, on_disk):
        assert m["holdout"]["macro_f1"] == pytest.approx(want, abs=1e-12)
        assert m["holdout"]["n"] == 100
        assert len(m["holdout"]["per_class_f1"]) == k and m["holdout"]["per_class_f1"][k - 1] == 0
        y, p = labels[run.oof_rows], run.oof.argmax(1)
        assert m["macro_f1"] == pytest.approx(
            f1_score(y, p, labels=range(k), average="macro", zero_division=0), abs=1e-12
        )
        assert m["per_class_f1"] == pytest.approx(
            f1_score(y, p, labels=range(k), average=None, zero_division=0).tolist(), abs=1e-12
        )


@pytest.mark.parametrize("name", ["lightgbm", "xgboost"])
def test_gbdt_stackers_beat_every_source_run_on_holdout_macro_f1(stacked, name):
    m = stacked[name].metrics
    best_source = max(s["holdout"]["macro_f1"] for s in m["sources"])
    assert best_source < 0.8  # each source is weak on half the classes
    assert m["holdout"]["macro_f1"] > best_source + 0.1
    assert m["macro_f1"] > max(s["macro_f1"] for s in m["sources"]) + 0.1


# -- reproducibility ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lightgbm", "xgboost", "logreg", "mlp", "loglinear"])
def test_same_seed_gives_identical_oof_bytes(stacked, sources, tmp_path, name):
    again = stack(sources, stacker=name, params=ONE_THREAD[name], seed=0, out=tmp_path / "again")
    first = stacked[name].path
    assert (again.path / "oof.npy").read_bytes() == (first / "oof.npy").read_bytes()
    assert (again.path / "holdout.npy").read_bytes() == (first / "holdout.npy").read_bytes()


def test_another_seed_changes_the_lightgbm_bagging(stacked, sources, tmp_path):
    other = stack(
        sources, stacker="lightgbm", params=ONE_THREAD["lightgbm"], seed=1, out=tmp_path / "seed1"
    )
    assert not np.array_equal(other.oof, stacked["lightgbm"].oof)


# -- attribution --------------------------------------------------------------------------------
def _read_contrib(run, groups):
    import csv

    with (run.path / "contributions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    vals = np.array([[float(r[g]) for g in groups] for r in rows])
    return rows, vals


def _margins(name: str, model_file: Path, X: np.ndarray) -> np.ndarray:
    if name == "lightgbm":
        import lightgbm as lgb

        return lgb.Booster(model_file=str(model_file)).predict(X, raw_score=True)
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(str(model_file))
    return booster.predict(xgb.DMatrix(X), output_margin=True)


@pytest.mark.parametrize("name,suffix", [("lightgbm", ".lgb.txt"), ("xgboost", ".xgb.json")])
def test_contributions_plus_bias_equal_the_margin_of_the_predicted_class(
    stacked, sources, name, suffix
):
    run = stacked[name]
    groups = ["text", "image", "fusion", "bias"]
    rows, vals = _read_contrib(run, groups)
    X_tr, X_ho, assignment = _features(sources, log=True)
    total = vals.sum(1)
    classes = run.classes
    pred = np.array([classes.index(r["predicted"]) for r in rows])
    np.testing.assert_array_equal(pred, np.vstack([run.oof, run.holdout]).argmax(1))
    n_tr = len(X_tr)
    fold_of = assignment[run.oof_rows]
    for f in range(5):
        sel = np.flatnonzero(fold_of == f)
        margin = _margins(name, run.path / "weights" / f"fold{f}{suffix}", X_tr[sel])
        np.testing.assert_allclose(
            total[sel], margin[np.arange(len(sel)), pred[sel]], rtol=1e-5, atol=1e-5
        )
    margin = _margins(name, run.path / "weights" / f"refit{suffix}", X_ho)
    np.testing.assert_allclose(
        total[n_tr:], margin[np.arange(len(X_ho)), pred[n_tr:]], rtol=1e-5, atol=1e-5
    )
    assert np.abs(vals[:, :3]).sum() > 0  # the runs, not only the bias, carry the decision


def test_modalities_come_from_the_trainers_feature_sets(sources, tmp_path):
    # `fusion train` records {"features": {"text": {...}, "image": None}} rather than modalities
    cfg = {"modalities": None, "head": "hanet", "features": {"text": {"name": "t"}, "image": None}}
    text_only = _rewrite(sources[2], tmp_path / "hanet-text", config=cfg)
    run = stack(
        [text_only, sources[1]],
        stacker="lightgbm",
        params=ONE_THREAD["lightgbm"],
        out=tmp_path / "s",
    )
    assert [s["modalities"] for s in run.config["sources"]] == [["text"], ["image"]]
    assert summarize_contributions(run.path)["text_runs"] == ["hanet-text"]


@pytest.mark.parametrize("name", ["lightgbm", "xgboost"])
def test_stacker_with_a_class_missing_from_training_keeps_k_columns(sources, name):
    X, _, assignment = _features(sources)
    y = np.asarray(load_run(sources[0]).config["labels"])[assignment >= 0]
    train = y != 5  # class c5 never seen by this model
    model = create_stacker(name, n_classes=6, params={"n_jobs": 1, "n_estimators": 30}, seed=0)
    model.fit(X[train], y[train])
    proba = model.predict_proba(X[:50])
    assert proba.shape == (50, 6) and np.all(proba[:, 5] == 0)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    margin = model.margin(X[:50])
    assert np.all(np.isneginf(margin[:, 5]))
    pred = proba.argmax(1)
    contrib = model.contributions(X[:50], pred)  # (50, 3 * 6 + 1)
    assert contrib.shape == (50, 19)
    np.testing.assert_allclose(contrib.sum(1), margin[np.arange(50), pred], rtol=1e-5, atol=1e-5)
    with pytest.raises(StackError, match=r"a class the stacker never saw"):
        model.contributions(X[:1], np.array([5]))


def test_logreg_writes_no_contributions_and_says_so(stacked):
    run = stacked["logreg"]
    assert not (run.path / "contributions.csv").exists()
    assert run.metrics["attribution"]["method"] is None
    assert "no TreeSHAP" in run.metrics["attribution"]["reason"]
    with pytest.raises(StackError, match=r"has no contributions.csv \(logreg has no TreeSHAP"):
        summarize_contributions(run.path)


def test_explain_false_skips_treeshap_and_says_so(sources, tmp_path):
    run = stack(
        sources, stacker="lightgbm", params={"n_jobs": 1, "explain": False}, out=tmp_path / "s"
    )
    assert not (run.path / "contributions.csv").exists()
    assert run.metrics["attribution"] == {"method": None, "reason": "explain=false was set"}


def test_refuses_to_write_over_a_source_run(sources):
    with pytest.raises(StackError, match=r"--out '.*runs/image' is the source run 'image'"):
        stack(sources, stacker="logreg", out=sources[1])
    assert load_run(sources[1]).config["kind"] == "train"


def test_summary_credits_the_image_run_on_image_classes(stacked):
    run = stacked["lightgbm"]
    s = summarize_contributions(run.path)
    assert s["runs"] == ["text", "image", "fusion"] and s["text_runs"] == ["text"]
    assert sum(s["decided_by"].values()) == s["n_items"] == 600
    assert len(s["non_text_decided"]) == s["decided_by"]["image"] + s["decided_by"]["fusion"]
    assert {d["run"] for d in s["non_text_decided"]} <= {"image", "fusion"}
    rows, _ = _read_contrib(run, ["bias"])
    by_image = {d["id"] for d in s["non_text_decided"] if d["run"] == "image"}
    right = [r for r in rows if r["predicted"] == r["true"]]
    img_cls = [r["id"] for r in right if r["true"] in ("c3", "c4", "c5")]
    txt_cls = [r["id"] for r in right if r["true"] in ("c0", "c1", "c2")]
    # the image run is confident on c3-c5 and near-random on c0-c2 (and text the reverse)
    assert sum(i in by_image for i in img_cls) > 0.8 * len(img_cls)
    assert sum(i in by_image for i in txt_cls) < 0.1 * len(txt_cls)
    assert s["mean_abs"]["text"] > s["mean_abs"]["fusion"]


def test_plot_contributions_writes_a_png(stacked, tmp_path):
    png = plot_contributions(stacked["xgboost"].path, tmp_path / "plots" / "contrib.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_pooled_columns_form_one_attribution_group(sources, tmp_path):
    n_store = len(load_run(sources[0]).config["labels"])
    pooled = np.random.default_rng(0).normal(size=(n_store, 4))
    run = stack(
        sources,
        stacker="lightgbm",
        features="probs+pooled",
        pooled=pooled,
        params=ONE_THREAD["lightgbm"],
        out=tmp_path / "pooled",
    )
    assert run.config["feature_names"][-4:] == [f"pooled:{j}" for j in range(4)]
    rows, vals = _read_contrib(run, ["text", "image", "fusion", "pooled", "bias"])
    _, X_ho, _ = _features(sources, pooled, log=True)
    margin = _margins("lightgbm", run.path / "weights" / "refit.lgb.txt", X_ho)
    pred = run.holdout.argmax(1)
    np.testing.assert_allclose(
        vals[480:].sum(1), margin[np.arange(len(pred)), pred], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(StackError, match=r"pooled has shape \(10, 4\), expected finite \(600"):
        stack(sources, features="probs+pooled", pooled=pooled[:10], out=tmp_path / "bad")


# -- dask ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as c:
        yield c


@pytest.fixture(scope="module")
def sources_3folds(work) -> list[Path]:
    # 3 folds: each Dask fit pays ~1 s of cluster set-up, so fewer fits keep the test short
    return make_synthetic_runs(work / "runs3", n_items=600, n_classes=6, n_folds=3, seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lightgbm", "xgboost"])
def test_dask_training_matches_the_local_fit(cluster, sources_3folds, tmp_path, name):
    params = {"n_estimators": 80, "learning_rate": 0.2}
    local = stack(
        sources_3folds, stacker=name, params={**params, "n_jobs": 1}, out=tmp_path / "local"
    )
    run = stack(
        sources_3folds,
        stacker=name,
        params=params,
        dask=cluster.scheduler_address,
        out=tmp_path / "dask",
    )
    assert run.config["dask"] is True and local.config["dask"] is False
    assert set(run.metrics) == set(local.metrics)
    assert abs(run.metrics["accuracy"] - local.metrics["accuracy"]) < 0.03
    assert abs(run.metrics["holdout"]["macro_f1"] - local.metrics["holdout"]["macro_f1"]) < 0.03
    assert len(run.metrics["folds"]) == 3
    assert all(0 < f["best_iteration"] <= 80 for f in run.metrics["folds"])
    assert (run.path / "contributions.csv").exists()


def test_dask_is_refused_for_non_gbdt_stackers_before_connecting(sources, tmp_path):
    with pytest.raises(StackError, match=r"stacker 'logreg' cannot train on Dask"):
        stack(sources, stacker="logreg", dask="tcp://127.0.0.1:1", out=tmp_path / "s")


def test_unreachable_dask_scheduler_is_one_clear_error(sources, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr("fusion.stack.dask.DASK_CONNECT_TIMEOUT", "1s")
    with pytest.raises(
        StackError,
        match=r"cannot reach the Dask scheduler at "
        r"'tcp://127.0.0.1:1'.*drop --dask",
    ):
        stack(sources, stacker="lightgbm", dask="tcp://127.0.0.1:1", out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_cli_stacks_heads_trained_on_a_real_store_with_its_pooled_vectors(cli, tmp_path):
    store = make_complementary_store(tmp_path / "c.zarr", n=200)
    for head in ("text", "image"):
        train(store, head, out=tmp_path / "runs" / head, epochs=2)
    res = cli("-r", tmp_path / "runs" / "text", "-r", tmp_path / "runs" / "image",
              "--stacker", "logreg", "--features", "probs+pooled", "--pooled", "txt",
              "--out", tmp_path / "runs" / "stack", "-q")
    assert res.exit_code == 0, res.output
    run = load_run(tmp_path / "runs" / "stack")
    assert run.config["n_pooled"] == 16 and run.config["feature_names"][-1] == "pooled:15"
    assert [s["modalities"] for s in run.config["sources"]] == [["text"], ["image"]]
    ids = [line.split(",")[0] for line in (run.path / "predictions.csv").read_text().splitlines()]
    assert ids[1:] == [f"p{r}" for r in np.concatenate([run.oof_rows, run.holdout_rows])]


# -- CLI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli():
    """`fusion stack` registered on a bare app, as cli/fusion_app.py registers it."""
    import typer
    from typer.testing import CliRunner

    from cli import stack_cmd

    app = typer.Typer()
    app.command("stack")(stack_cmd.stack)
    app.command("noop")(lambda: None)  # two commands: `stack` stays a subcommand
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["stack", *map(str, args)])


def test_cli_passes_params_threads_and_defaults_to_the_library(cli, sources, tmp_path):
    res = cli("-r", sources[0], "-r", sources[1], "--stacker", "mlp", "-p", "max-epochs=3",
              "--threads", 1, "--out", tmp_path / "s", "-q")
    assert res.exit_code == 0, res.output
    run = load_run(tmp_path / "s")
    assert run.config["user_params"] == {"max_epochs": 3, "threads": 1}
    assert run.config["params"]["hidden"] == 64 and run.config["seed"] == 0
    assert run.config["features"] == "probs" and [s["name"] for s in run.config["sources"]] == [
        "text", "image"]
    assert f"s: OOF macro-F1 {run.metrics['macro_f1']:.4f}" in res.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--stacker", "catboost"], "unknown stacker 'catboost'; available: candidate, ensemble, lightgbm"),
        (["-p", "num_leaves"], "--params 'num_leaves' is not KEY=VALUE; write e.g."),
        (["--pooled", "minilm"], "--pooled minilm is used only with --features probs+pooled"),
    ],
)
def test_cli_refusals_are_one_line_and_exit_2(cli, sources, tmp_path, args, message):
    res = cli("-r", sources[0], "-r", sources[1], "--out", tmp_path / "s", *args)
    assert res.exit_code == 2
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
