"""Issue 15: the candidate stacker, whose cost does not grow with the number of classes."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.errors import StackError
from fusion.probs import TopK
from fusion.rundir import load_run
from fusion.stack import create_stacker, stack, stacker_class, summarize_contributions
from fusion.stack.candidates import features, item_blocks, split_columns
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
    assert "at most 1000 items per scored block" in run.metrics["attribution"]["sample"]
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
    with pytest.raises(StackError, match="explain_rows=0 must be >= 1"):
        create_stacker("candidate", n_classes=10, n_sources=2, params={"explain_rows": 0})
    with pytest.raises(StackError, match="max_fit_rows=0 must be >= 1"):
        create_stacker("candidate", n_classes=10, n_sources=2, params={"max_fit_rows": 0})


def test_fit_keeps_every_positive_row_and_samples_negatives_above_max_fit_rows(many):
    _, srcs, _ = many
    inp = StackInputs(srcs)
    X, _, _, _ = candidate_matrix(inp)
    y = inp.labels[inp.trainable][:1500]
    big = create_stacker("candidate", n_classes=inp.k, n_sources=3)
    item, target, _, n, frac = big._fit_rows(X[:1500], y, np.random.default_rng(0))
    assert frac == 1.0 and n == len(item) > 10_000  # no cap by default: every row
    small = create_stacker("candidate", n_classes=inp.k, n_sources=3,
                           params={"max_fit_rows": 6000})
    s_item, s_target, s_F, s_n, s_frac = small._fit_rows(X[:1500], y, np.random.default_rng(0))
    assert s_n == n and s_target.sum() == target.sum() > 1000  # every positive row kept
    assert abs(len(s_item) - 6000) < 300 and s_F.shape == (len(s_item), small.n_features)
    share = (len(s_target) - s_target.sum()) / (len(target) - target.sum())
    assert abs(share - s_frac) < 0.03
    # the early-stopping rows are sampled at the training rows' rate
    *_, v_frac = small._fit_rows(X[:300], y[:300], np.random.default_rng(1), s_frac)
    assert v_frac == s_frac


def _reference_rows(X, n_runs, depth, n_classes, class_freq):
    """The candidate rows by a plain loop over items and classes (the definition)."""
    width = X.shape[1] // n_runs
    k = (width - 1) // 2
    items, classes, feats = [], [], []
    for i, row in enumerate(X):
        runs = [(row[j * width:j * width + k].astype(int), row[j * width + k:j * width + 2 * k],
                 row[j * width + 2 * k]) for j in range(n_runs)]
        for c in sorted({int(c) for idx, _, _ in runs for c in idx[:depth]}):
            f, first = [], 0
            for idx, p, rest in runs:
                hit = np.flatnonzero(idx == c)
                pc = float(p[hit[0]]) if len(hit) else float(rest) / (n_classes - k)
                pc = min(max(pc, 1e-7), 1 - 1e-7)
                rank = hit[0] + 1 if len(hit) else k + 1
                first += rank == 1
                f += [pc, rank, np.log(pc / (1 - pc)), np.log(max(float(p[0]), 1e-7)) - np.log(pc)]
            items.append(i)
            classes.append(c)
            feats.append([*f, first, class_freq[c]])
    return np.array(items), np.array(classes), np.array(feats)


def test_vectorised_candidate_rows_match_the_per_item_definition(many):
    _, srcs, _ = many
    inp = StackInputs(srcs)
    X, _, _, _ = candidate_matrix(inp)
    X = X[:60]
    model = create_stacker("candidate", n_classes=inp.k, n_sources=3, params={"depth": 7})
    model.class_count = np.bincount(inp.labels[inp.trainable], minlength=inp.k)
    model.n_fit = int(model.class_count.sum())
    item, cls, F = model.candidates(X)
    ref_item, ref_cls, ref_F = _reference_rows(X, 3, 7, inp.k, model._class_freq())
    np.testing.assert_array_equal(item, ref_item)
    np.testing.assert_array_equal(cls, ref_cls)
    np.testing.assert_allclose(F, ref_F, rtol=1e-5, atol=1e-6)
    assert F.dtype == np.float32 and len(np.unique(item)) == 60
    # a class no run kept (the contributions of an averaged prediction can ask for one)
    kept = {int(c) for j in range(3) for c in X[0, j * 41:j * 41 + 20]}
    absent = np.array([next(c for c in range(inp.k) if c not in kept)])
    one = features(split_columns(X[:1], 3), np.zeros(1, np.int64), absent, inp.k,
                   model._class_freq())
    assert one[0, 1] == one[0, 5] == one[0, 9] == 21  # rank k + 1 in every run
    assert one[0, 0] == pytest.approx(X[0, 40] / (inp.k - 20), rel=1e-6)  # run0's fill


def test_blocks_do_not_change_the_prediction(many, monkeypatch):
    _, srcs, run = many
    inp = StackInputs(srcs)
    X, _, _, _ = candidate_matrix(inp)
    model = stacker_class("candidate").load(run.path / "weights" / "fold0", params={"n_jobs": 1},
                                            n_sources=3, pooled_dims=None)
    whole, rows = model.predict_proba(X[:300]), model.candidates(X[:300])
    monkeypatch.setattr("fusion.stack.candidates.BLOCK_ITEMS", 37)
    assert len(list(item_blocks(300))) == 9
    blocked = model.predict_proba(X[:300])
    np.testing.assert_array_equal(blocked.idx, whole.idx)
    np.testing.assert_array_equal(blocked.p, whole.p)
    for a, b in zip(model.candidates(X[:300]), rows, strict=True):  # the fit's rows too
        np.testing.assert_array_equal(a, b)


def test_treeshap_explains_a_seeded_sample_the_same_for_every_model(many, tmp_path):
    _, srcs, _ = many
    inp = StackInputs(srcs)
    X, _, _, _ = candidate_matrix(inp)
    y = inp.labels[inp.trainable]
    a, b = (create_stacker("candidate", n_classes=inp.k, n_sources=3, seed=4,
                           params={"n_jobs": 1, "n_estimators": 10, "explain_rows": 25})
            .fit(X[s:s + 800], y[s:s + 800]) for s in (0, 800))
    pred = a.predict_proba(X[:100]).argmax(1)
    ca, cb = a.contributions(X[:100], pred), b.contributions(X[:100], pred)
    done = ~np.isnan(ca).all(1)
    assert done.sum() == 25 and np.array_equal(done, ~np.isnan(cb).all(1))
    item, cls, raw, _ = a.scores(X[:100])
    mine = cls == pred[item]
    np.testing.assert_allclose(ca[done].sum(1), raw[mine][np.argsort(item[mine])][done],
                               atol=1e-6)
    # the stack run: each OOF fold and the holdout explain explain_rows items
    small = stack(srcs, stacker="candidate", params={"n_jobs": 1, "explain_rows": 30},
                  out=tmp_path / "s")
    rows = (small.path / "contributions.csv").read_text().splitlines()[1:]
    n_ho = sum(r.split(",")[1] == "holdout" for r in rows)
    assert n_ho == 30 and len(rows) == 30 * (inp.n_folds + 1)
    assert small.config["params"]["explain_rows"] == 30
    assert set(summarize_contributions(small.path)["mean_abs"]) == {"run0", "run1", "run2"}
