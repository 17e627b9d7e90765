"""Issue 17: consistent holdout inputs (holdout_folds), the ensemble's floor, the default chosen by
evidence, the noisy-source guarantee, the thread default."""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cli import stack_cmd
from fusion import train
from fusion.errors import StackError
from fusion.metrics import classification_metrics
from fusion.rundir import load_run
from fusion.stack import AUTO_CANDIDATES, create_stacker, stack
from fusion.stack.stackers import LightGBMStacker, XGBoostStacker, available_cpus
from fusion.testing import make_synthetic_runs

from .conftest import make_complementary_store


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack-evidence")


@pytest.fixture(scope="module")
def per_fold_sources(work) -> list[Path]:
    return make_synthetic_runs(work / "pf", n_items=600, n_classes=6, n_runs=3, seed=1,
                               holdout_folds=True)


@pytest.fixture(scope="module")
def noisy_sources(work) -> list[Path]:
    # the image run is nearly noise; text and fusion keep their skill
    return make_synthetic_runs(work / "noisy", n_items=600, n_classes=6, n_runs=3, seed=2,
                               holdout_folds=True, near_chance=("image",))


def _holdout_f1(run_dir: Path, labels: np.ndarray) -> float:
    r = load_run(run_dir)
    return classification_metrics(labels[r.holdout_rows], r.holdout)["macro_f1"]


# -- 1. consistent inputs -----------------------------------------------------------------------
def test_holdout_is_the_mean_of_each_fold_model_on_its_own_folds_holdout(per_fold_sources, work):
    run = stack(per_fold_sources, stacker="ensemble", out=work / "s-pf")
    assert run.config["holdout_scheme"]["scheme"] == "per_fold"
    assert run.metrics["holdout_scheme"] == "per_fold"
    srcs = [load_run(p) for p in per_fold_sources]
    assert all(s.holdout_folds.shape == (5, 120, 6) for s in srcs)
    # rebuilt from the saved fold models' weights: fold model f weighs the runs' fold-f holdouts
    want = np.zeros((120, 6))
    for f in range(5):
        w = np.load(run.path / "weights" / f"fold{f}.npz")["weights"]
        want += sum(w[m] * srcs[m].holdout_folds[f] for m in range(3)) / 5
    np.testing.assert_allclose(run.holdout, want / want.sum(1, keepdims=True), atol=1e-5)
    assert not (run.path / "weights" / "refit.npz").exists()  # no refit in this scheme
    # the fold-averaged holdout would give other numbers: the test can tell the schemes apart
    avg = np.zeros((120, 6))
    for f in range(5):
        w = np.load(run.path / "weights" / f"fold{f}.npz")["weights"]
        avg += sum(w[m] * srcs[m].holdout for m in range(3)) / 5
    assert np.abs(run.holdout - avg).max() > 1e-3


def test_runs_without_holdout_folds_keep_the_refit_and_the_run_says_why(per_fold_sources, work):
    old = work / "old-fusion"
    shutil.copytree(per_fold_sources[2], old)
    (old / "holdout_folds.npy").unlink()  # a run written before issue 17
    run = stack([per_fold_sources[0], per_fold_sources[1], old], stacker="logreg",
                out=work / "s-old")
    note = run.config["holdout_scheme"]
    assert note["scheme"] == "refit" and note["runs_without_holdout_folds"] == ["fusion"]
    assert (run.path / "weights" / "refit.npz").exists()


def test_a_real_training_run_writes_each_fold_models_holdout(work):
    store = make_complementary_store(work / "c.zarr", n=200)
    runs = [train(store, head, out=work / "real" / head, epochs=1) for head in ("text", "image")]
    for r in runs:
        r = load_run(r.path)
        k = r.config["folds"]["k"]
        assert r.holdout_folds.shape == (k, *r.holdout.shape)
        np.testing.assert_allclose(r.holdout_folds.sum(2), 1.0, atol=1e-4)
        # the run's holdout is the mean of its fold models' holdouts
        mean = np.asarray(r.holdout_folds).mean(0)
        np.testing.assert_allclose(r.holdout, mean / mean.sum(1, keepdims=True), atol=1e-5)
        assert np.abs(r.holdout_folds[0] - r.holdout_folds[1]).max() > 1e-4
    run = stack([r.path for r in runs], stacker="logreg", out=work / "real" / "stack")
    assert run.config["holdout_scheme"]["scheme"] == "per_fold"


# -- 2. the ensemble's floor --------------------------------------------------------------------
def test_ensemble_is_not_below_its_best_source_and_drops_the_noise_run(noisy_sources, work):
    run = stack(noisy_sources, stacker="ensemble", out=work / "s-ens")
    m = run.metrics
    best_oof = max(s["macro_f1"] for s in m["sources"])
    best_ho = max(s["holdout"]["macro_f1"] for s in m["sources"])
    assert m["macro_f1"] >= best_oof - 0.005, (m["macro_f1"], best_oof)
    assert m["holdout"]["macro_f1"] >= best_ho - 0.005, (m["holdout"]["macro_f1"], best_ho)
    for f in range(5):  # the near-chance image run (second block) gets (almost) no weight
        w = np.load(run.path / "weights" / f"fold{f}.npz")["weights"]
        assert w[1] <= 0.1 and abs(w.sum() - 1) < 1e-9


# -- 5. the default, chosen by evidence, and the noisy-source guarantee --------------------------
def test_default_stack_with_a_near_chance_source_stays_within_0005_of_the_best_other(
    noisy_sources, work
):
    run = stack(noisy_sources, threads=1, out=work / "s-auto")
    labels = np.asarray(run.config["labels"])
    best_other = max(_holdout_f1(p, labels) for p in noisy_sources if p.name != "image")
    assert run.metrics["holdout"]["macro_f1"] >= best_other - 0.005, (
        run.metrics["holdout"]["macro_f1"], best_other)
    sel = run.config["selection"]
    assert [c["stacker"] for c in sel["candidates"]] == [*AUTO_CANDIDATES, "blend"]
    top = max(c["oof_macro_f1"] for c in sel["candidates"])
    chosen = next(c for c in sel["candidates"] if c["stacker"] == sel["chosen"])
    assert chosen["oof_macro_f1"] >= top - sel["tolerance"]
    assert run.config["stacker"] == sel["chosen"] == run.metrics["selection"]["chosen"]
    assert chosen["oof_macro_f1"] == pytest.approx(run.metrics["macro_f1"], abs=1e-6)


def test_cli_default_prints_the_choice_and_refuses_params_without_a_stacker(
    per_fold_sources, tmp_path
):
    app = typer.Typer()
    app.command("stack")(stack_cmd.stack)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    args = ["stack", "-r", str(per_fold_sources[0]), "-r", str(per_fold_sources[1]), "-q"]
    res = runner.invoke(app, [*args, "--threads", "1", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    chosen = json.loads((tmp_path / "a" / "config.json").read_text())["selection"]["chosen"]
    assert f"stacker: {chosen} (" in res.output and "ensemble" in res.output
    res = runner.invoke(app, [*args, "-p", "num_leaves=7", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "add e.g. --stacker lightgbm" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


# -- threads ------------------------------------------------------------------------------------
def test_gbdt_threads_default_to_the_cpus_this_process_may_use():
    # a thread pinned to one CPU (sched_setaffinity(0) binds the calling thread only) sees 1
    seen = []

    def pinned():
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        seen.append(available_cpus())

    t = threading.Thread(target=pinned)
    t.start()
    t.join()
    assert seen == [1]
    n = len(os.sched_getaffinity(0))
    assert available_cpus() == n
    assert LightGBMStacker.defaults["n_jobs"] == XGBoostStacker.defaults["n_jobs"] == n


# -- 3. multi-level fusion: pooled features reduced by a PCA fitted inside each fold ---------------
def test_pooled_pca_is_fitted_on_each_models_own_training_rows(per_fold_sources, work):
    n_store = len(load_run(per_fold_sources[0]).config["labels"])
    pooled = np.random.default_rng(5).normal(size=(n_store, 10)) * np.arange(1, 11)
    run = stack(per_fold_sources, stacker="logreg", features="probs+pooled", pooled=pooled,
                pooled_dims=3, out=work / "s-pca")
    assert run.config["pooled_dims"] == 3 and run.config["n_pooled"] == 3
    assert run.config["feature_names"][-1] == "pooled_pca:2"
    cv = np.load(run.path / "cv_indices.npz")
    for f in range(5):
        pca = np.load(run.path / "weights" / f"fold{f}.pca.npz")
        assert pca["components"].shape == (3, 10)
        # centred on the fold model's training rows, never on the rows it scores
        np.testing.assert_allclose(pca["mean"], pooled[cv[f"fold{f}_fit"]].mean(0), atol=1e-9)
        assert np.abs(pca["mean"] - pooled[cv[f"fold{f}_scored"]].mean(0)).max() > 1e-3


def test_pooled_dims_without_pooled_features_is_refused(per_fold_sources, work):
    with pytest.raises(StackError, match=r"pooled_dims=8 reduces pooled features; add"):
        stack(per_fold_sources, stacker="logreg", pooled_dims=8, out=work / "s-no")


# -- guard rails: per-class monotone constraints -----------------------------------------------
def test_a_runs_probability_for_class_c_can_only_raise_class_cs_margin(per_fold_sources):
    runs = [load_run(p) for p in per_fold_sources]
    X = np.log(np.clip(np.hstack([r.oof for r in runs]), 1e-7, 1)).astype(np.float64)
    y = np.asarray(runs[0].config["labels"])[runs[0].oof_rows]
    model = create_stacker("lightgbm-monotone", n_classes=6, n_sources=3, seed=0,
                           params={"n_jobs": 1, "n_estimators": 40, "min_child_samples": 5})
    model.fit(X, y)
    grid = np.log(np.linspace(1e-4, 1.0, 25))
    rows = X[:40]
    for col in range(18):  # run m = col // 6, class c = col % 6
        Xv = np.tile(rows, (len(grid), 1))  # grid value g for block g of 40 rows
        Xv[:, col] = np.repeat(grid, len(rows))
        margins = model.margin(Xv)[:, col % 6].reshape(len(grid), len(rows))
        steps = np.diff(margins, axis=0)
        assert steps.min() >= -1e-9, (col, steps.min())
    proba = model.predict_proba(X[:10])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-9)


def test_per_fold_holdout_contributions_sum_to_the_fold_models_mean_margin(per_fold_sources, work):
    import lightgbm as lgb

    run = stack(per_fold_sources, stacker="lightgbm", params={"n_jobs": 1, "n_estimators": 30},
                out=work / "s-pf-lgb")
    srcs = [load_run(p) for p in per_fold_sources]
    pred = run.holdout.argmax(1)
    mean_margin = np.zeros(len(pred))
    for f in range(5):
        X_f = np.log(np.clip(np.hstack([s.holdout_folds[f] for s in srcs]), 1e-7, 1))
        booster = lgb.Booster(model_file=str(run.path / "weights" / f"fold{f}.lgb.txt"))
        mean_margin += booster.predict(X_f, raw_score=True)[np.arange(len(pred)), pred] / 5
    with (run.path / "contributions.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "holdout"]
    total = np.array([sum(float(r[g]) for g in ("text", "image", "fusion", "bias")) for r in rows])
    np.testing.assert_allclose(total, mean_margin, rtol=1e-5, atol=1e-5)
