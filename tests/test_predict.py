"""`fusion predict` (issue 13 part 2, head runs): the fold models' mean on a store's rows equals
the run's own holdout probabilities; the feature identity is compared field by field; user-code
heads need trust; the CSV carries the top-k classes."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import fusion
from cli.fusion_app import app
from fusion.predict import PredictError, predict

from .conftest import fill_image, fill_text, make_complementary_store

runner = CliRunner()
FIT = dict(epochs=3, batch_size=64, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    store = make_complementary_store(root / "c.zarr", n=240)
    run = fusion.train(store, "hanet", out=root / "runs" / "hanet", folds=3, **FIT)
    return store, run, root


def test_predicting_the_holdout_reproduces_the_runs_holdout_probabilities(trained):
    store, run, _ = trained
    pred = predict(run.path, store.url, rows="holdout")
    assert pred.rows.tolist() == run.holdout_rows.tolist()
    # every fold model loaded and averaged as training did (one model alone differs)
    np.testing.assert_allclose(pred.probs, run.holdout, atol=2e-5)
    assert np.allclose(pred.probs.sum(1), 1, atol=1e-5)


def test_ids_are_predicted_in_the_order_given_and_top_k_is_sorted(trained):
    store, run, _ = trained
    want = [store.ids[7], store.ids[3], store.ids[100]]
    pred = predict(run, store, ids=want)
    assert pred.ids.tolist() == want and pred.rows.tolist() == [7, 3, 100]
    idx, p = pred.top_k(3)
    assert (np.diff(p, axis=1) <= 0).all()
    assert (idx[:, 0] == pred.probs.argmax(1)).all()
    with pytest.raises(PredictError, match="not in store"):
        predict(run, store, ids=["nope"])


def test_a_store_whose_features_differ_is_refused_naming_the_field(trained, tmp_path):
    store, run, _ = trained
    from embedstore import create_store

    other = create_store(tmp_path / "o.zarr", list(store.ids), [store.classes[i] for i in
                                                                  store.labels], folds=3)
    fill_text(other, "txt", np.full(other.n_items, 4), layers=(1, 3), dim=16)  # other layers
    fill_image(other, "img", n_regions=5, dim=12)
    with pytest.raises(PredictError, match=r"'txt'.*differs.*in 'layers'"):
        predict(run, other)


def test_cli_writes_top_k_csv_and_refuses_a_user_head_without_trust(trained, tmp_path):
    store, run, root = trained
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", "--run", str(run.path), "--store", store.url,
                              "--rows", "holdout", "--top-k", "2", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", "class_1", "prob_1", "class_2", "prob_2"]
    assert len(rows) == 1 + len(run.holdout_rows)
    # the same run claiming a user-code head: refused in one line, exit 2, unless trusted
    user = tmp_path / "user-run"
    shutil.copytree(run.path, user)
    cfg = (user / "config.json").read_text().replace('"head": "hanet"',
                                                     '"head": "my_heads.py:Evil"')
    (user / "config.json").write_text(cfg)
    res = runner.invoke(app, ["predict", "--run", str(user), "--store", store.url,
                              "--out", str(tmp_path / "q.csv")])
    assert res.exit_code == 2 and "--trust-code" in res.output
    assert "my_heads.py:Evil" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "q.csv").exists()
