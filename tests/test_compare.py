"""`fusion compare`: paired bootstrap intervals (against a slow reference), ties, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from cli.fusion_app import app
from fusion.bootstrap import draw_indices, paired_bootstrap, strata_of
from fusion.errors import RunDirError
from fusion.leaderboard import compare
from fusion.metrics import f1_from_counts, per_class_f1
from fusion.rundir import write_run

runner = CliRunner()
K = 4
CLASSES = [f"c{c}" for c in range(K)]


def _split(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, fold assignment): 2 folds, a quarter of the items in the holdout (-1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    folds = np.where(np.arange(n) % 4 == 0, -1, np.arange(n) % 2)
    return y, folds


def _run(path: Path, pred: np.ndarray, *, y: np.ndarray, folds: np.ndarray, store: str = "fp",
         folds_fp: str = "ff", metrics: dict | None = None) -> Path:
    """A run directory whose argmax is ``pred`` (one class per store row)."""
    probs = np.full((len(pred), K), 0.1 / (K - 1), np.float32)
    probs[np.arange(len(pred)), pred] = 0.9
    oof_rows, hold_rows = np.flatnonzero(folds >= 0), np.flatnonzero(folds == -1)
    config = {"kind": "train", "head": "concat", "classes": CLASSES, "labels": y.tolist(),
              "folds": {"k": 2, "assignment": folds.tolist()},
              "store": {"url": "mem", "fingerprint": store, "folds_fingerprint": folds_fp}}
    return write_run(path, config=config, metrics={"head": "concat", "kind": "train",
                                                   **(metrics or {})},
                     oof=probs[oof_rows], oof_rows=oof_rows, holdout=probs[hold_rows],
                     holdout_rows=hold_rows, ids=[f"p{i}" for i in range(len(y))], labels=y,
                     folds=folds, classes=CLASSES).path


def _noisy(y: np.ndarray, right: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(y)) < right, y, (y + rng.integers(1, K, len(y))) % K)


def _reference(y, pa, pb, *, resamples, seed, stratified):
    """One resample at a time, scored by scikit-learn: what the vectorised code must equal."""
    rng = np.random.default_rng(seed)
    strata = strata_of(y) if stratified else None
    f1d, accd = [], []
    for _ in range(resamples):
        i = draw_indices(rng, len(y), strata)
        f1d.append(f1_score(y[i], pa[i], labels=range(K), average="macro", zero_division=0)
                   - f1_score(y[i], pb[i], labels=range(K), average="macro", zero_division=0))
        accd.append(np.mean(pa[i] == y[i]) - np.mean(pb[i] == y[i]))
    return np.percentile(f1d, [2.5, 97.5]), np.percentile(accd, [2.5, 97.5])


@pytest.mark.parametrize("stratified", [False, True])
def test_interval_equals_a_slow_reference(stratified):
    y = np.random.default_rng(3).integers(0, K, 60)
    pa, pb = _noisy(y, 0.7, 1), _noisy(y, 0.6, 2)
    got = paired_bootstrap(y, pa, pb, K, resamples=300, seed=7, stratified=stratified)
    (f_lo, f_hi), (a_lo, a_hi) = _reference(y, pa, pb, resamples=300, seed=7,
                                            stratified=stratified)
    assert (got["macro_f1"].lo, got["macro_f1"].hi) == pytest.approx((f_lo, f_hi), abs=1e-12)
    assert (got["accuracy"].lo, got["accuracy"].hi) == pytest.approx((a_lo, a_hi), abs=1e-12)
    want = (f1_score(y, pa, labels=range(K), average="macro", zero_division=0)
            - f1_score(y, pb, labels=range(K), average="macro", zero_division=0))
    assert got["macro_f1"].diff == pytest.approx(want, abs=1e-12)
    assert got == paired_bootstrap(y, pa, pb, K, resamples=300, seed=7, stratified=stratified)
    assert got != paired_bootstrap(y, pa, pb, K, resamples=300, seed=8, stratified=stratified)


def test_stratified_draw_keeps_every_class_size():
    y = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    rng = np.random.default_rng(0)
    for _ in range(20):
        i = draw_indices(rng, len(y), strata_of(y))
        assert np.array_equal(np.bincount(y[i], minlength=K), np.bincount(y, minlength=K))
    plain = np.concatenate([draw_indices(rng, len(y)) for _ in range(200)])
    assert len(np.unique(plain)) == len(y)  # every item can be drawn


def test_f1_from_counts_is_the_per_class_f1_formula():
    y, p = _noisy(np.arange(50) % K, 1.0, 0), _noisy(np.arange(50) % K, 0.6, 1)
    tp = np.bincount(y[p == y], minlength=K)
    got = f1_from_counts(tp, np.bincount(y, minlength=K), np.bincount(p, minlength=K))
    assert np.allclose(got, f1_score(y, p, labels=range(K), average=None, zero_division=0))
    assert np.array_equal(got, per_class_f1(y, p, K))
    assert f1_from_counts(np.zeros(2), np.zeros(2), np.zeros(2)).tolist() == [0.0, 0.0]


def test_identical_runs_are_tied_with_a_zero_interval(tmp_path):
    y, folds = _split()
    pred = _noisy(y, 0.7, 0)
    a, b = _run(tmp_path / "a", pred, y=y, folds=folds), _run(tmp_path / "b", pred, y=y,
                                                                folds=folds)
    base, other = compare([a, b], resamples=200)
    assert base["tied"] is None and other["tied"] is True and other["vs"] == "a"
    for split in ("holdout_vs", "oof_vs"):
        for metric in ("macro_f1", "accuracy"):
            iv = other[split][metric]
            assert (iv["diff"], iv["lo"], iv["hi"], iv["tied"]) == (0.0, 0.0, 0.0, True)


def test_a_clearly_better_run_leads_and_the_worse_is_not_tied(tmp_path):
    y, folds = _split(400)
    weak = _run(tmp_path / "weak", _noisy(y, 0.45, 1), y=y, folds=folds)
    strong = _run(tmp_path / "strong", _noisy(y, 0.9, 2), y=y, folds=folds)
    rows = compare([weak, strong], resamples=300, seed=1)
    assert [r["name"] for r in rows] == ["strong", "weak"]
    assert rows[1]["tied"] is False
    for split in ("holdout_vs", "oof_vs"):
        iv = rows[1][split]["macro_f1"]
        assert iv["hi"] < 0 and iv["lo"] <= iv["diff"] <= iv["hi"] and not iv["tied"]
    assert rows[1]["holdout_vs"]["n"] == 100 and rows[1]["oof_vs"]["n"] == 300
    rows = compare([weak, strong], baseline="weak", resamples=300, seed=1)
    assert rows[0]["vs"] == "weak" and rows[0]["holdout_vs"]["macro_f1"]["lo"] > 0
    assert rows[1]["tied"] is None


def test_cli_json_has_the_same_numbers_and_markdown_the_intervals(tmp_path):
    y, folds = _split()
    paths = [_run(tmp_path / n, _noisy(y, r, s), y=y, folds=folds)
             for n, r, s in (("x", 0.8, 1), ("z", 0.75, 2), ("w", 0.3, 3))]
    md = tmp_path / "board.md"
    args = ["compare", *map(str, paths), "--resamples", "150", "--seed", "4", "--stratified"]
    res = runner.invoke(app, [*args, "--json", "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    want = compare(paths, resamples=150, seed=4, stratified=True)
    assert json.loads(res.output) == json.loads(json.dumps(want, default=str))
    text = md.read_text()
    iv = want[1]["holdout_vs"]["macro_f1"]
    assert f"{iv['diff']:+.4f} [{iv['lo']:+.4f}, {iv['hi']:+.4f}]" in text
    assert "baseline" in text and ("tied" in text or "worse" in text)
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "Δ vs x [95% CI]" in res.output, res.output
    assert "150 paired bootstrap resamples by class, seed 4" in res.output


def test_spread_column_when_runs_carry_several_seeds(tmp_path):
    y, folds = _split()
    seeds = [{"seed": s, "accuracy": 0.7, "macro_f1": m, "holdout": {"macro_f1": h}}
             for s, m, h in ((0, 0.70, 0.60), (1, 0.72, 0.64), (2, 0.74, 0.62))]
    a = _run(tmp_path / "a", _noisy(y, 0.7, 1), y=y, folds=folds, metrics={"seeds": seeds})
    b = _run(tmp_path / "b", _noisy(y, 0.7, 2), y=y, folds=folds)
    rows = {r["name"]: r for r in compare([a, b], resamples=50)}
    assert rows["a"]["spread"]["n"] == 3
    assert rows["a"]["spread"]["holdout_macro_f1_std"] == pytest.approx(0.02)
    assert rows["a"]["spread"]["macro_f1_std"] == pytest.approx(0.02)
    assert rows["b"]["spread"] is None
    res = runner.invoke(app, ["compare", str(a), str(b), "--resamples", "50"])
    assert res.exit_code == 0 and "seed sd" in res.output and "0.0200" in res.output
    res = runner.invoke(app, ["compare", str(b), "--resamples", "50"])
    assert "seed sd" not in res.output


@pytest.mark.parametrize("change, message", [
    ({"store": "other"}, "comes from store fingerprint 'other' but"),
    ({"folds_fp": "other"}, "uses folds 'other' but"),
])
def test_runs_of_another_store_or_folds_are_refused_in_one_line(tmp_path, change, message):
    y, folds = _split()
    a = _run(tmp_path / "a", _noisy(y, 0.7, 1), y=y, folds=folds)
    b = _run(tmp_path / "b", _noisy(y, 0.7, 2), y=y, folds=folds, **change)
    res = runner.invoke(app, ["compare", str(a), str(b)])
    assert res.exit_code == 2 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("error:")
    with pytest.raises(RunDirError, match="compare only runs trained on the same store|"
                                          "re-train it on the store's canonical folds"):
        compare([a, b])


def test_baseline_not_among_the_runs_is_refused(tmp_path):
    y, folds = _split()
    a = _run(tmp_path / "a", _noisy(y, 0.7, 1), y=y, folds=folds)
    b = _run(tmp_path / "b", _noisy(y, 0.6, 2), y=y, folds=folds)
    res = runner.invoke(app, ["compare", str(a), str(b), "--baseline", "hanet"])
    assert res.exit_code == 2, res.output
    assert "--baseline 'hanet' is not among the runs compared (a, b)" in res.output
    rows = compare([a, b], baseline=str(tmp_path / "b"), resamples=20)
    assert rows[0]["vs"] == "b"
    res = runner.invoke(app, ["compare", str(a), "--resamples", "0"])
    assert res.exit_code == 2 and "--resamples 0 is below 1" in res.output
