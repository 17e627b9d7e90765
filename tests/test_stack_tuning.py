"""Issue 17: the GBDT stackers' regularisation chosen by inner validation (``-p tune=true``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from fusion.errors import StackError
from fusion.rundir import load_run
from fusion.stack import stack
from fusion.stack.stackers.tuning import GRIDS
from fusion.testing import make_synthetic_runs

SMALL = {"n_jobs": 1, "n_estimators": 80, "tune": True}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack-tuning")


@pytest.fixture(scope="module")
def sources(work) -> list[Path]:
    return make_synthetic_runs(work / "runs", n_items=600, n_classes=6, n_runs=3, seed=5,
                               holdout_folds=True, skill_scale=0.5)


def _log_loss(p, y):
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def _X(paths: list[Path], rows: np.ndarray) -> np.ndarray:
    """The GBDTs' input for store rows ``rows``: log-probabilities, blocks in run order."""
    out = []
    for p in paths:
        r = load_run(p)
        full = np.empty((len(r.config["labels"]), r.oof.shape[1]))
        full[r.oof_rows] = r.oof
        out.append(np.log(np.clip(full[rows], 1e-7, 1.0)))
    return np.hstack(out)


@pytest.mark.parametrize("name", ["lightgbm", "xgboost"])
def test_each_fold_model_keeps_the_candidate_with_the_lowest_inner_split_loss(
    sources, work, name
):
    run = stack(sources, stacker=name, params=SMALL, seed=0, out=work / f"s-{name}")
    tuning = run.config["tuning"]
    assert sorted(tuning) == [f"fold{f}" for f in range(5)]  # per_fold scheme: no refit
    assert run.config["params"]["tune"] is True
    assert run.config["params"]["tune_grid"] == list(GRIDS[name])
    chosen = set()
    for t in tuning.values():
        losses = [tr["valid_log_loss"] for tr in t["trials"]]
        assert len(losses) == len(GRIDS[name]) and t["chosen"] == int(np.argmin(losses))
        assert t["params"] == GRIDS[name][t["chosen"]]
        chosen.add(t["chosen"])
    assert chosen - {0}, "on weak sources some fold should prefer stronger regularisation"


def test_the_kept_lightgbm_model_is_the_chosen_candidate_refitted_on_the_same_rows(sources, work):
    run = stack(sources, stacker="lightgbm", params=SMALL, seed=0, out=work / "s-lgb-again")
    labels = np.asarray(run.config["labels"])
    cv = dict(np.load(run.path / "cv_indices.npz"))
    for f in (0, 3):
        t = run.config["tuning"][f"fold{f}"]
        fit_rows, valid, scored = cv[f"fold{f}_fit"], cv[f"fold{f}_valid"], cv[f"fold{f}_scored"]
        params = {k: v for k, v in run.config["params"].items()
                  if k not in ("tune", "tune_grid", "explain", "early_stopping_rounds",
                               "valid_fraction", "log_probs")}
        params.update(t["params"], objective="multiclass", num_class=6, random_state=0)
        m = lgb.LGBMClassifier(**params).fit(
            _X(sources, fit_rows), labels[fit_rows], eval_X=(_X(sources, valid),),
            eval_y=(labels[valid],), callbacks=[lgb.early_stopping(30, verbose=False)])
        p_valid = m.predict_proba(_X(sources, valid), num_iteration=m.best_iteration_)
        assert _log_loss(p_valid, labels[valid]) == pytest.approx(
            t["trials"][t["chosen"]]["valid_log_loss"], abs=1e-4)
        fold_of = np.asarray(run.config["folds"]["assignment"])[run.oof_rows]
        np.testing.assert_allclose(
            run.oof[fold_of == f],
            m.predict_proba(_X(sources, scored), num_iteration=m.best_iteration_), atol=1e-6)


def test_relabelling_one_fold_leaves_its_tuned_predictions_and_choices_unchanged(sources, work):
    base = stack(sources, stacker="xgboost", params=SMALL, seed=0, out=work / "s-xgb-base")
    labels = np.asarray(base.config["labels"])
    assignment = np.asarray(base.config["folds"]["assignment"])
    rows = np.flatnonzero(assignment == 1)
    relabelled = labels.copy()
    relabelled[rows] = (labels[rows] + 1) % 6
    moved = []
    for p in sources:
        dst = work / "relabelled" / p.name
        shutil.copytree(p, dst, dirs_exist_ok=True)
        cfg = load_run(dst).config
        cfg["labels"] = relabelled.tolist()
        (dst / "config.json").write_text(json.dumps(cfg))
        moved.append(dst)
    again = stack(moved, stacker="xgboost", params=SMALL, seed=0, out=work / "s-xgb-moved")
    fold_of = assignment[base.oof_rows]
    np.testing.assert_array_equal(again.oof[fold_of == 1], base.oof[fold_of == 1])
    assert again.config["tuning"]["fold1"] == base.config["tuning"]["fold1"]
    assert any(not np.array_equal(again.oof[fold_of == g], base.oof[fold_of == g])
               for g in (0, 2, 3, 4))


def test_the_refit_draws_its_own_inner_split_to_choose(sources, work):
    old = work / "no-holdout-folds"
    shutil.copytree(sources[0], old)
    (old / "holdout_folds.npy").unlink()  # a run written before issue 17: scheme refit
    run = stack([old, *sources[1:]], stacker="lightgbm", params=SMALL, seed=0,
                out=work / "s-refit")
    t = run.config["tuning"]["refit"]
    n_trainable = int((np.asarray(run.config["folds"]["assignment"]) >= 0).sum())
    assert 0.08 * n_trainable <= t["valid_rows"] <= 0.12 * n_trainable
    assert t["chosen"] == int(np.argmin([tr["valid_log_loss"] for tr in t["trials"]]))


def test_tune_on_a_stacker_without_a_grid_is_refused_in_one_line(sources, work):
    with pytest.raises(StackError, match=r"tune=true: stacker 'logreg' has no tuning grid; use "
                                         r"it with lightgbm or xgboost, or drop -p tune"):
        stack(sources, stacker="logreg", params={"tune": True}, out=work / "s-bad")
