"""`fusion merge`: runs trained fold by fold (`fusion train --fold i`, one machine per fold at
catalog scale) join into the run that training every fold in one process writes.

The reference is a real one-process run on the same store and seed: per-(seed, fold) seeding
makes each fold model bit-identical whichever process trains it, so the merge must reproduce
its out-of-fold rows bit for bit, its holdout (the mean of the fold models), its config, rows.npz,
predictions.csv and weights, in any order and grouping of the parts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import fusion
import fusion.probs
from cli.fusion_app import app
from fusion.errors import RunDirError
from fusion.merge import merge_runs
from fusion.predict import predict
from fusion.probs import TopK

from .conftest import make_complementary_store

runner = CliRunner()
FIT = {"epochs": 2, "batch_size": 32, "dim": 16, "hidden": 16}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    store = make_complementary_store(root / "s.zarr", n=300)
    full = fusion.train(store, "concat", out=root / "full", folds=3, **FIT)  # folds 0-2 of 5
    per_fold = [fusion.train(store, "concat", out=root / f"f{f}", fold=f, **FIT).path
                for f in range(3)]
    return store, full, per_fold, root


def _same_run(got, want, hold_atol=1e-6):
    assert np.array_equal(got.oof_rows, want.oof_rows)
    assert np.array_equal(got.oof, want.oof)  # bit for bit: each row from its own fold model
    assert np.array_equal(got.holdout_rows, want.holdout_rows)
    np.testing.assert_allclose(got.holdout, want.holdout, atol=hold_atol)
    assert np.array_equal(got.holdout_folds, want.holdout_folds)
    for key in ("accuracy", "macro_f1"):
        assert got.metrics[key] == want.metrics[key]
        assert got.metrics["holdout"][key] == pytest.approx(want.metrics["holdout"][key])
    assert got.metrics["by_availability"] == want.metrics["by_availability"]
    assert got.metrics["seeds"] == want.metrics["seeds"]
    assert got.metrics["spread"] == want.metrics["spread"]
    assert [(m["fold"], m["best_epoch"]) for m in got.metrics["folds"]] == \
        [(m["fold"], m["best_epoch"]) for m in want.metrics["folds"]]
    gz, wz = np.load(got.path / "rows.npz"), np.load(want.path / "rows.npz")
    assert sorted(gz.files) == sorted(wz.files)
    assert all(np.array_equal(gz[k], wz[k]) for k in wz.files)
    names = sorted(p.name for p in (got.path / "weights").iterdir())
    assert names == sorted(p.name for p in (want.path / "weights").iterdir())


def test_merging_every_fold_gives_the_one_process_run(parts):
    _, full, per_fold, root = parts
    shuffled = [per_fold[i] for i in (1, 2, 0)]
    merged = merge_runs(shuffled, root / "merged", name=full.name)
    _same_run(merged, full)
    got, want = (json.loads((r.path / "config.json").read_text()) for r in (merged, full))
    assert got["train"].pop("folds") is None and want["train"].pop("folds") == 3
    assert got == want  # (the parts trained one fold each: no "first N folds")
    assert (merged.path / "predictions.csv").read_text() == \
        (full.path / "predictions.csv").read_text()
    assert [p["folds"] for p in merged.metrics["merged_from"]] == [[0], [1], [2]]


def test_merges_compose_and_predict_like_the_one_process_run(parts):
    store, full, per_fold, root = parts
    left = merge_runs(per_fold[:2], root / "f01")
    assert left.config["folds"]["trained"] == [0, 1] and len(left.holdout_folds) == 2
    merged = merge_runs([per_fold[2], left.path], root / "f0-2", name=full.name)
    _same_run(merged, full)
    # the copied fold models predict new rows as the one-process run's do
    got = predict(merged.path, store.url, rows="holdout")
    want = predict(full.path, store.url, rows="holdout")
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)


def test_topk_runs_merge(parts, tmp_path, monkeypatch):
    """Above the dense threshold runs are top-k; the merge keeps the layout and its means."""
    store, _, _, _ = parts
    monkeypatch.setattr(fusion.probs, "DENSE_MAX_CLASSES", 4)
    fit = {**FIT, "folds": 3, "top_k_store": 2}
    full = fusion.train(store, "concat", out=tmp_path / "full", **fit)
    assert isinstance(full.oof, TopK)
    part = [fusion.train(store, "concat", out=tmp_path / f"f{f}", fold=f, **fit).path
            for f in range(3)]
    merged = merge_runs(part[::-1], tmp_path / "m", name=full.name)
    assert merged.layout == "topk" and merged.config["probs"] == full.config["probs"]
    assert merged.oof.equals(full.oof) and merged.holdout_folds.equals(full.holdout_folds)
    assert merged.holdout.equals(full.holdout)


def test_refusals_are_one_line_and_write_nothing(parts, tmp_path):
    store, full, per_fold, root = parts
    other = fusion.train(store, "concat", out=tmp_path / "other", fold=1,
                         **{**FIT, "epochs": 1})
    cases = [
        ([per_fold[0]], "at least two runs"),
        ([per_fold[0], per_fold[0]], "fold 0 is in both"),
        ([per_fold[0], full.path], "fold 0 is in both"),
        ([per_fold[0], other.path], "config train.epochs differs (1 vs 2)"),
    ]
    for paths, msg in cases:
        with pytest.raises(RunDirError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            merge_runs(paths, tmp_path / "never")
        assert not (tmp_path / "never").exists()
    res = runner.invoke(app, ["merge", str(per_fold[0]), str(per_fold[1]), "--out",
                              str(per_fold[2])])
    assert res.exit_code == 2 and "exists; pass --overwrite" in res.output
    res = runner.invoke(app, ["merge", str(per_fold[0]), str(per_fold[1]), "--out",
                              str(per_fold[1]), "--overwrite"])
    assert res.exit_code == 2 and "is one of the runs being merged" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["merge", str(per_fold[0]), str(per_fold[1]), "--out",
                              str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert "folds [0, 1] of 5" in res.output
