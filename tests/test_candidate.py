"""Issue 15: the candidate stacker, whose cost does not grow with the number of classes."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.errors import StackError
from fusion.probs import TopK
from fusion.rundir import load_run
from fusion.stack import create_stacker, stack, stacker_class, summarize_contributions
from fusion.stack.inputs import StackInputs, candidate_matrix
from fusion.stack.procedure import AUTO_MAX_PER_CLASS_K
from fusion.testing import make_many_class_runs


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("cand")
    srcs = make_many_class_runs(d / "src", n_items=2500, n_classes=500, n_runs=3, seed=1)
    return d, srcs, stack(srcs, out=d / "stack", threads=1)


def test_auto_picks_the_candidate_stacker_above_the_class_threshold_and_says_why(many):
    _, _, run = many
    assert run.config["stacker"] == "candidate" and 500 > AUTO_MAX_PER_CLASS_K
    sel = run.config["selection"]
    assert sel["by"] == "number of classes" and sel["chosen"] == "candidate"
    assert "K=500 > 64" in sel["why"]
    assert run.layout == "topk" and isinstance(run.probs("oof"), TopK)


def test_candidate_stack_is_at_least_the_best_source(many):
    _, srcs, run = many
    sources = [load_run(p) for p in srcs]
    for split in ("accuracy", "macro_f1"):
        best = max(s.metrics[split] for s in sources)
        assert run.metrics[split] >= best - 0.01, (split, run.metrics[split], best)
        best_ho = max(s.metrics["holdout"][split] for s in sources)
        assert run.metrics["holdout"][split] >= best_ho - 0.01, split


def test_per_run_attributions_sum_to_the_candidate_score(many):
    d, srcs, run = many
    header = (run.path / "contributions.csv").read_text().splitlines()[0].split(",")
    assert header[5:] == ["run0", "run1", "run2", "shared", "bias"]
    summary = summarize_contributions(run.path)
    assert set(summary["mean_abs"]) == {"run0", "run1", "run2"}
    inp = StackInputs(srcs)
    X, _, _, _ = candidate_matrix(inp)
    model = create_stacker("candidate", n_classes=inp.k, n_sources=3,
                           params={"n_jobs": 1, "n_estimators": 20})
    model.fit(X[:1000], inp.labels[inp.trainable][:1000])
    pred = model.predict_proba(X[:50]).argmax(1)
    per_feature = model.contributions(X[:50], pred)
    contrib = per_feature @ model.group_matrix()
    np.testing.assert_allclose(contrib[:, 1], per_feature[:, 4:8].sum(1))  # run1's 4 features
    assert model.feature_names(["a", "b", "c"])[4:8] == ["b:p", "b:rank", "b:logodds", "b:margin"]
    item, cls, raw, _ = model.scores(X[:50])
    mine = cls == pred[item]
    np.testing.assert_allclose(contrib.sum(1), raw[mine][np.argsort(item[mine])], atol=1e-6)


def test_cost_counts_candidate_rows_not_classes(tmp_path):
    """The same items at K=200 and K=5000 (25x the classes): the same number of candidate rows
    up to ties in the runs' rankings (O(N x k x runs), nothing per class)."""
    rows = {}
    for k in (200, 5000):
        srcs = make_many_class_runs(tmp_path / f"k{k}", n_items=800, n_classes=k, n_runs=3,
                                    seed=3)
        inp = StackInputs(srcs)
        X, _, _, _ = candidate_matrix(inp)
        assert X.shape == (len(inp.trainable), 3 * (2 * 20 + 1))  # no column per class
        model = create_stacker("candidate", n_classes=k, n_sources=3,
                               params={"n_jobs": 1, "n_estimators": 5})
        model.fit(X, inp.labels[inp.trainable])
        rows[k] = model.n_candidate_rows
        assert rows[k] <= len(X) * model.depth * 3
    assert abs(rows[5000] - rows[200]) <= 0.01 * rows[200], rows
    # max_fit_items caps the fit whatever N: 100 items' candidate rows at most
    capped = create_stacker("candidate", n_classes=5000, n_sources=3,
                            params={"n_jobs": 1, "n_estimators": 5, "max_fit_items": 100})
    capped.fit(X, inp.labels[inp.trainable])
    assert 100 * 1 <= capped.n_candidate_rows <= 100 * capped.depth * 3
    assert capped.class_count.sum() == len(X)  # the frequency prior still counts every row


def test_saved_candidate_model_reloads_and_predicts_the_same(many):
    d, srcs, run = many
    inp = StackInputs(srcs)
    X, _, _, _ = candidate_matrix(inp)
    stem = run.path / "weights" / "fold0"
    model = stacker_class("candidate").load(stem, params={"n_jobs": 1}, n_sources=3,
                                            pooled_dims=None)
    again = model.predict_proba(X[:40])
    fold0 = np.flatnonzero(inp.assignment[inp.trainable] == 0)[:40]
    ref = run.probs("oof")[fold0]
    np.testing.assert_array_equal(model.predict_proba(X[fold0]).idx, ref.idx)
    assert isinstance(again, TopK) and again.shape == (40, inp.k)


def test_bad_inputs_are_one_line(many, tmp_path, monkeypatch):
    _, srcs, _ = many
    with pytest.raises(StackError, match="takes the runs' top-k probabilities only"):
        stack(srcs, stacker="candidate", features="probs+pooled",
              pooled=np.zeros((2500, 4)), out=tmp_path / "p")
    monkeypatch.setattr("fusion.stack.inputs.DENSE_FEATURES_MAX_BYTES", 1024)
    with pytest.raises(StackError, match="use --stacker candidate"):
        stack(srcs, stacker="logreg", out=tmp_path / "l")
    with pytest.raises(StackError, match="depth=0 must be >= 1"):
        create_stacker("candidate", n_classes=10, n_sources=2, params={"depth": 0})
    with pytest.raises(StackError, match="max_fit_items=0 must be >= 1"):
        create_stacker("candidate", n_classes=10, n_sources=2, params={"max_fit_items": 0})
