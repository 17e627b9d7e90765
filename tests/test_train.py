"""`fusion train` on cached tensors: fusion beats unimodal, run directory, reproducibility,
compare/report, user heads, bad input."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

import embedstore as es
import fusion
from cli.fusion_app import app
from fusion.rundir import write_run

from .conftest import fill_text, make_complementary_store

runner = CliRunner()
SMALL = {  # small widths keep the suite fast; the maths is the same
    "text": {}, "image": {}, "concat": {"dim": 64, "hidden": 64}, "add": {"dim": 64},
    "late": {"hidden": 64}, "hanet": {"dim": 64, "key_dim": 32},
    "coattention": {"lstm_dim": 64, "attn_dim": 32, "hidden": 64},
    "gated-xattn": {"dim": 32},
}
FIT = {"epochs": 12, "folds": 2, "batch_size": 32, "lr": 3e-3, "patience": 4}


@pytest.fixture(scope="module")
def comp_store(tmp_path_factory):
    return make_complementary_store(tmp_path_factory.mktemp("comp") / "c.zarr", n=400)


@pytest.fixture(scope="module")
def runs(comp_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {h: fusion.train(comp_store, h, out=root / h, **FIT, **opts)
            for h, opts in SMALL.items()}


@pytest.mark.slow
@pytest.mark.parametrize("head", [h for h in SMALL if h not in ("text", "image")])
def test_every_fusion_head_beats_both_unimodal_heads(runs, head):
    best_uni_oof = max(runs["text"].metrics["macro_f1"], runs["image"].metrics["macro_f1"])
    best_uni_hold = max(runs["text"].metrics["holdout"]["macro_f1"],
                        runs["image"].metrics["holdout"]["macro_f1"])
    m = runs[head].metrics
    assert m["macro_f1"] > best_uni_oof + 0.1, (head, m["macro_f1"], best_uni_oof)
    assert m["holdout"]["macro_f1"] > best_uni_hold + 0.1


def test_unimodal_heads_stay_near_their_ceiling(runs):
    # text can only see 3 of 6 factors, image 2 of 6: both well below fusion by construction
    assert runs["text"].metrics["accuracy"] < 0.7
    assert runs["image"].metrics["accuracy"] < 0.6


def test_run_directory_contents(runs, comp_store):
    run = runs["concat"]
    p = run.path
    for f in ("config.json", "metrics.json", "oof.npy", "oof_rows.npy", "holdout.npy",
              "holdout_rows.npy", "predictions.csv", "DONE", "weights/fold0.safetensors",
              "weights/fold1.safetensors"):
        assert (p / f).exists(), f
    folds = comp_store.folds
    want_oof = np.flatnonzero((folds == 0) | (folds == 1))
    np.testing.assert_array_equal(run.oof_rows, want_oof)
    np.testing.assert_array_equal(run.holdout_rows, np.flatnonzero(folds == -1))
    np.testing.assert_allclose(run.oof.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(run.holdout.sum(1), 1, atol=1e-5)
    m = json.loads((p / "metrics.json").read_text())
    for key in ("head", "accuracy", "macro_f1", "holdout", "folds", "train_seconds",
                "epoch_seconds", "per_class_f1"):
        assert key in m
    assert m["head"] == "concat" and len(m["folds"]) == 2
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["store"]["fingerprint"] == comp_store.fingerprint
    assert cfg["features"]["text"]["name"] == "txt" and cfg["head_config"]["options"]["dim"] == 64
    with open(p / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(run.oof_rows) + len(run.holdout_rows)
    assert set(rows[0]) == {"id", "split", "fold", "true", "predicted", "probability"}
    state = load_file(p / "weights/fold0.safetensors")
    head = fusion.create_head(cfg["head"], **cfg["head_config"]["dims"],
                              **cfg["head_config"]["options"])
    head.load_state_dict(state)


def test_training_is_reproducible_with_a_seed(comp_store, runs, tmp_path):
    again = fusion.train(comp_store, "concat", out=tmp_path / "again", **FIT, **SMALL["concat"])
    assert (again.path / "oof.npy").read_bytes() == (runs["concat"].path / "oof.npy").read_bytes()
    other = fusion.train(comp_store, "concat", **{**FIT, "seed": 1}, **SMALL["concat"])
    assert not np.array_equal(other.oof, runs["concat"].oof)


def test_late_head_records_alpha(runs):
    alphas = [f["on_fit_end"]["alpha"] for f in runs["late"].metrics["folds"]]
    assert all(0.0 <= a <= 1.0 for a in alphas)


def test_compare_ranks_runs_best_first(runs):
    res = runner.invoke(app, ["compare", *[str(r.path) for r in runs.values()], "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    scores = [r["holdout_macro_f1"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert rows[-1]["head"] in ("text", "image")


def _fixed_run(path: Path, head: str, right: set[int]) -> fusion.Run:
    """A run over 10 labelled rows (0-5 out-of-fold, 6-9 holdout) that is right exactly on the
    rows in ``right``."""
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    pred = np.array([c if r in right else (c + 1) % 3 for r, c in enumerate(y)])
    probs = np.eye(3, dtype=np.float32)[pred] * 0.8 + 0.2 / 3
    folds = np.array([0, 1, 0, 1, 0, 1, -1, -1, -1, -1])
    classes = ["a", "b", "c"]
    config = {"kind": "train", "head": head, "classes": classes, "labels": y.tolist(),
              "store": {"url": "mem", "fingerprint": "fp", "folds_fingerprint": "ff"}}
    return write_run(path, config=config, metrics={"head": head, "kind": "train"},
                     oof=probs[:6], oof_rows=np.arange(6), holdout=probs[6:],
                     holdout_rows=np.arange(6, 10), ids=[f"p{i}" for i in range(10)],
                     labels=y, folds=folds, classes=classes)


def test_report_complementarity_counts_and_plots(tmp_path):
    text = _fixed_run(tmp_path / "text", "text", {0, 1, 2, 6, 7})
    image = _fixed_run(tmp_path / "image", "image", {1, 2, 3, 4, 7, 8, 9})
    res = runner.invoke(app, ["report", str(text.path), "--text-run", str(text.path),
                              "--image-run", str(image.path), "--out", str(tmp_path / "png"),
                              "--json"])
    assert res.exit_code == 0, res.output
    c = json.loads(res.output)["complementarity"]
    assert c["holdout"] == {"split": "holdout", "n": 4, "both_right": 1, "only_text_right": 1,
                            "only_image_right": 2, "both_wrong": 0, "oracle_accuracy": 1.0,
                            "text_accuracy": 0.5, "image_accuracy": 0.75}
    assert (c["oof"]["n"], c["oof"]["both_right"], c["oof"]["only_text_right"],
            c["oof"]["only_image_right"], c["oof"]["both_wrong"]) == (6, 2, 1, 2, 1)
    assert c["oof"]["oracle_accuracy"] == pytest.approx(5 / 6)
    assert (tmp_path / "png" / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "png" / "per_class_f1.png").exists()


def test_compare_skips_what_is_not_a_run_with_a_note(runs, tmp_path):
    (tmp_path / "train.log").write_text("not a run\n")
    (tmp_path / "half").mkdir()  # an interrupted run: no DONE
    res = runner.invoke(app, ["compare", str(runs["text"].path), str(tmp_path / "train.log"),
                              str(tmp_path / "half"), str(runs["concat"].path), "--json"])
    assert res.exit_code == 0, res.output
    assert "note: skipping" in res.output and "train.log" in res.output
    assert "incomplete" in res.output
    res = runner.invoke(app, ["compare", str(tmp_path / "train.log")])
    assert res.exit_code == 2 and "none of the 1 path(s) is a finished run" in res.output


def test_compare_ranks_every_run_on_the_one_macro_f1(tmp_path):
    """A run written before the metrics were unified (a stack that averaged F1 over the classes
    present only) is ranked on the macro-F1 over all classes, recomputed from its predictions."""
    from sklearn.metrics import f1_score

    from fusion.report import compare

    run = _fixed_run(tmp_path / "old-stack", "stack:lightgbm", {0, 1, 2, 6, 7})
    m = json.loads((run.path / "metrics.json").read_text())
    m["macro_f1"], m["holdout"]["macro_f1"] = 0.99, 0.99  # another definition
    (run.path / "metrics.json").write_text(json.dumps(m))
    (row,) = compare([run.path])
    y = np.array(run.config["labels"])
    for key, rows, probs in (("macro_f1", run.oof_rows, run.oof),
                             ("holdout_macro_f1", run.holdout_rows, run.holdout)):
        want = f1_score(y[rows], probs.argmax(1), labels=range(3), average="macro",
                        zero_division=0)
        assert row[key] == pytest.approx(want, abs=1e-12) and want != 0.99


def test_macro_f1_of_a_run_whose_split_lacks_a_class_is_sklearns_over_all_classes(tmp_path):
    """The store declares 4 classes; 'ghost' has no item at all: the run's macro-F1 averages
    over the 4 (F1 0 for 'ghost'), as f1_score(labels=range(K), zero_division=0) does."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    n = 120
    y = rng.integers(0, 3, n)
    s = es.create_store(tmp_path / "ghost.zarr", [f"g{i}" for i in range(n)],
                        [["a", "b", "c"][c] for c in y], classes=["a", "b", "c", "ghost"],
                        folds=2, holdout=0.25)
    fill_text(s, "t", np.ones(n, int), layers=(1,), dim=8)
    run = fusion.train(s, "text", epochs=2, batch_size=32, hidden=8)
    labels = np.asarray(run.config["labels"])
    for rows, probs, m in ((run.oof_rows, run.oof, run.metrics),
                           (run.holdout_rows, run.holdout, run.metrics["holdout"])):
        yt, p = labels[rows], probs.argmax(1)
        assert 3 not in yt  # the split lacks 'ghost'
        want = f1_score(yt, p, labels=range(4), average="macro", zero_division=0)
        assert m["macro_f1"] == pytest.approx(want, abs=1e-12)
        assert len(m["per_class_f1"]) == 4 and m["per_class_f1"][3] == 0.0


# -- user heads --------------------------------------------------------------------------------

USER_HEAD = textwrap.dedent("""
    import torch
    from torch import nn
    from fusion import FusionHead

    class GatedSum(FusionHead):
        modalities = ("text", "image")
        needs = frozenset({"text_pooled", "image_pooled"})

        def __init__(self, *, text_dim, image_dim, num_classes, text_layers=1, dim=32):
            super().__init__(text_dim=text_dim, image_dim=image_dim, num_classes=num_classes,
                             text_layers=text_layers)
            self.t, self.i = nn.Linear(text_dim, dim), nn.Linear(image_dim, dim)
            self.g = nn.Linear(2 * dim, 1)
            self.fc = nn.Linear(dim, num_classes)

        def forward_features(self, batch):
            t, i = torch.tanh(self.t(batch.text_pooled)), torch.tanh(self.i(batch.image_pooled))
            g = torch.sigmoid(self.g(torch.cat([t, i], -1)))
            return g * t + (1 - g) * i
""")


def test_user_head_from_file_trains_via_cli(comp_store, tmp_path):
    f = tmp_path / "my_head.py"
    f.write_text(USER_HEAD)
    out = tmp_path / "user"
    res = runner.invoke(app, ["train", "--store", comp_store.url, "--head", f"{f}:GatedSum",
                              "--folds", "1", "--epochs", "2", "--set", "dim=16", "--out",
                              str(out), "-q"])
    assert res.exit_code == 0, res.output
    run = fusion.load_run(out)
    assert run.head.endswith("GatedSum") and run.config["head_config"]["options"]["dim"] == 16
    assert "OOF macro-F1" in res.output


def test_config_re_runs_a_run(comp_store, tmp_path):
    first = tmp_path / "first"
    res = runner.invoke(app, ["train", "--store", comp_store.url, "--head", "concat", "--folds",
                              "1", "--epochs", "3", "--lr", "0.003", "--seed", "2",
                              "--class-weight", "--set", "dim=16", "--set", "hidden=8",
                              "--out", str(first), "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--config", str(first), "-q"])
    assert res.exit_code == 0, res.output
    a, b = fusion.load_run(first), fusion.load_run(tmp_path / "first-rerun")
    assert b.config["train"] == a.config["train"]
    assert a.config["train"]["seed"] == 2 and a.config["train"]["class_weight"] is True
    assert b.config["head_config"] == a.config["head_config"]
    assert b.config["features"] == a.config["features"]
    assert (b.path / "oof.npy").read_bytes() == (a.path / "oof.npy").read_bytes()
    # flags given with --config override the run's values; --set merges into its options
    res = runner.invoke(app, ["train", "--config", str(first / "config.json"), "--epochs", "1",
                              "--set", "hidden=4", "--out", str(tmp_path / "c"), "-q"])
    assert res.exit_code == 0, res.output
    c = fusion.load_run(tmp_path / "c").config
    assert c["train"]["epochs"] == 1 and c["train"]["lr"] == 0.003
    assert c["head_config"]["options"]["dim"] == 16 and c["head_config"]["options"]["hidden"] == 4


def test_config_of_a_stack_or_nothing_is_refused_in_one_line(tmp_path):
    stack_run = _fixed_run(tmp_path / "stack", "stack:lightgbm", {0})
    cfg = json.loads((stack_run.path / "config.json").read_text())
    (stack_run.path / "config.json").write_text(json.dumps({**cfg, "kind": "stack"}))
    res = runner.invoke(app, ["train", "--config", str(stack_run.path)])
    assert res.exit_code == 2 and "is a 'stack' run; --config re-runs" in res.output
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["train", "--head", "text"])
    assert res.exit_code == 2 and "no store given; pass --store" in res.output


def test_user_head_class_trains_via_python(comp_store):
    ns: dict = {}
    exec(USER_HEAD, ns)  # a head defined "in a notebook cell"
    run = fusion.train(comp_store, ns["GatedSum"], folds=1, epochs=1, dim=8)
    assert run.oof.shape[1] == 6


# -- bad input -----------------------------------------------------------------------------------

def _no_run(path: Path) -> None:
    assert not path.exists()
    assert not list(path.parent.glob(f".{path.name}.tmp*"))


def test_unknown_head_lists_available(comp_store, tmp_path):
    res = runner.invoke(app, ["train", "--store", comp_store.url, "--head", "transformer",
                              "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "transformer" in res.output and "hanet" in res.output
    _no_run(tmp_path / "r")


def test_unknown_head_option_refused(comp_store, tmp_path):
    res = runner.invoke(app, ["train", "--store", comp_store.url, "--head", "hanet", "--set",
                              "depth=3", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "unknown option 'depth'" in res.output
    _no_run(tmp_path / "r")


def test_store_without_labels_refused(tmp_path):
    s = es.create_store(tmp_path / "nolab.zarr", [str(i) for i in range(20)])
    fill_text(s, "t", np.ones(20, int), dim=4)
    with pytest.raises(fusion.TrainError, match="has no labels"):
        fusion.train(s, "text", out=tmp_path / "r")
    _no_run(tmp_path / "r")


def test_incomplete_feature_set_refused(tmp_path):
    s = es.create_store(tmp_path / "inc.zarr", [str(i) for i in range(40)],
                        [i % 2 for i in range(40)])
    w = s.create_feature("t", modality="text", dim=4, lengths=np.ones(40, int), layers=[1],
                         block_rows=16, attrs={"encoder": {}})
    w.write_block(0, tokens=np.ones((16, 1, 4)), pooled=np.ones((16, 4)))
    with pytest.raises(es.FeatureIncompleteError, match="16/40 rows done.*--resume"):
        fusion.train(s, "text", out=tmp_path / "r")
    _no_run(tmp_path / "r")


def test_class_with_fewer_items_than_folds_trains_with_one_warning(tmp_path):
    # a long tail is trained on, not refused (issue 15; tests/test_longtail.py has the rest)
    from fusion.data import RareClassWarning

    labels = ["a"] * 30 + ["b"] * 30 + ["rare"] * 3
    s = es.create_store(tmp_path / "rare.zarr", [str(i) for i in range(63)], labels, holdout=0)
    fill_text(s, "t", np.ones(63, int), dim=4)
    with pytest.warns(RareClassWarning, match="1 of 3 classes have fewer trainable items"):
        run = fusion.train(s, "text", out=tmp_path / "r", epochs=1)
    assert len(run.metrics["per_class_f1"]) == 3  # scored over all K classes


def test_missing_modality_refused(tmp_path):
    s = es.create_store(tmp_path / "t.zarr", [str(i) for i in range(20)], [i % 2 for i in range(20)])
    fill_text(s, "t", np.ones(20, int), dim=4)
    with pytest.raises(fusion.TrainError, match="needs a image feature set but store"):
        fusion.train(s, "concat")


def test_epoch_macro_f1_equals_sklearn():
    from sklearn.metrics import f1_score

    from fusion.metrics import macro_f1

    rng = np.random.default_rng(0)
    for k in (2, 5, 27):
        y, p = rng.integers(0, k, 300), rng.integers(0, k, 300)
        p[:50] = y[:50]
        y[-5:] = 0  # some classes may be absent from y or p: zero_division=0 semantics
        want = f1_score(y, p, labels=np.arange(k), average="macro", zero_division=0)
        assert macro_f1(y, p, k) == pytest.approx(want, abs=1e-12)


def test_threads_option_sets_torch_threads_during_the_run_and_rejects_zero(comp_store):
    import torch

    before = torch.get_num_threads()  # 1: the session fixture
    seen: list[int] = []
    fusion.train(comp_store, "text", fold=0, epochs=2, threads=before + 2,
                 progress=lambda ev: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {before + 2}  # every epoch ran with the asked thread count
    assert torch.get_num_threads() == before  # and the process setting is given back
    with pytest.raises(fusion.TrainError, match="--threads must be >= 1, got 0"):
        fusion.train(comp_store, "text", fold=0, epochs=1, threads=0)


# -- leakage -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noise_store(tmp_path_factory):
    """Random 256-d pooled vectors and labels drawn independently of them: there is nothing to
    learn and everything to memorise, so a model scores above chance only on rows it saw."""
    n, k = 300, 3
    rng = np.random.default_rng(0)
    labels = [f"c{c}" for c in rng.integers(0, k, n)]
    s = es.create_store(tmp_path_factory.mktemp("noise") / "n.zarr", [f"i{i}" for i in range(n)],
                        labels, folds=3, holdout=0.2)
    fill_text(s, "t", np.ones(n, int), layers=(1,), dim=256, block_rows=128)
    return s


def test_out_of_fold_rows_are_scored_by_a_model_that_never_trained_on_them(noise_store):
    run = fusion.train(noise_store, "text", epochs=15, batch_size=32, lr=3e-3, patience=15,
                       hidden=256, dropout=0.0)
    chance = 1 / 3
    # a fold model that also fits the rows it predicts memorises them (accuracy near 1)
    assert run.metrics["accuracy"] < chance + 0.15, run.metrics["accuracy"]
    assert run.metrics["holdout"]["accuracy"] < chance + 0.15


# -- leak-free selection (issue 12) ----------------------------------------------------------------

def _relabelled_copy(store, dst: Path, rows: np.ndarray) -> es.Store:
    """A copy of ``store`` whose labels on ``rows`` are shifted to the next class (the folds,
    ids and features are unchanged: the labels array is rewritten in place)."""
    import shutil

    import zarr

    shutil.copytree(store.url, dst)
    arr = zarr.open_array(str(dst / "labels"), mode="r+")
    labels = arr[:]
    labels[rows] = (labels[rows] + 1) % len(store.classes)
    arr[:] = labels
    return es.open_store(dst)


SELECT = {"epochs": 8, "batch_size": 32, "lr": 3e-3, "patience": 2, "hidden": 16}


def test_relabelling_a_fold_leaves_its_out_of_fold_probabilities_bit_identical(comp_store,
                                                                               tmp_path):
    """Nothing fitted or chosen for fold f looks at fold f's labels (early stopping, best epoch,
    late's alpha use an inner split of the other folds), so relabelling fold f's rows leaves
    fold f's OOF probabilities bit-identical; every other fold trained on them and changes."""
    f = 1
    rows = np.flatnonzero(comp_store.folds == f)
    other = _relabelled_copy(comp_store, tmp_path / "relabelled.zarr", rows)
    kw = {**SELECT, "folds": 3}
    for head, extra in (("text", {}), ("late", {"class_weight": True})):
        a = fusion.train(comp_store, head, **kw, **extra)
        b = fusion.train(other, head, **kw, **extra)
        np.testing.assert_array_equal(a.oof_rows, b.oof_rows)
        in_f = comp_store.folds[a.oof_rows] == f
        assert np.array_equal(a.oof[in_f], b.oof[in_f]), head  # bit-identical
        for g in (0, 2):
            in_g = comp_store.folds[a.oof_rows] == g
            assert not np.array_equal(a.oof[in_g], b.oof[in_g]), (head, g)


def test_inner_split_is_stratified_seeded_and_inside_the_training_rows():
    from fusion.data import inner_split

    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(4), [400, 200, 100, 10]))
    rows = np.sort(rng.choice(len(labels), 600, replace=False))
    fit, inner = inner_split(labels, rows, 0.1, 0, 2)
    assert len(inner) == 60 and np.array_equal(np.sort(np.concatenate([fit, inner])), rows)
    assert not np.intersect1d(fit, inner).size and np.all(np.diff(inner) > 0)
    want = 60 * np.bincount(labels[rows], minlength=4) / 600
    assert np.all(np.abs(np.bincount(labels[inner], minlength=4) - want) < 1)  # stratified
    assert np.array_equal(inner, inner_split(labels, rows, 0.1, 0, 2)[1])  # seeded
    assert not np.array_equal(inner, inner_split(labels, rows, 0.1, 1, 2)[1])  # by seed
    assert not np.array_equal(inner, inner_split(labels, rows, 0.1, 0, 3)[1])  # and by fold
    # every class keeps a fit row, even one whose share rounds up to all of it
    fit, inner = inner_split(np.array([0] * 8 + [1]), np.arange(9), 0.5, 0, 0)
    assert 8 in fit and len(inner) == 4


SEEDED = {"folds": 2, "epochs": 3, "batch_size": 32, "lr": 3e-3, "dim": 16, "hidden": 16}


def test_seeds_train_repeats_into_one_run_with_mean_probabilities_and_spread(comp_store,
                                                                              tmp_path):
    run = fusion.train(comp_store, "concat", out=tmp_path / "rep", seeds=[0, 1, 2], **SEEDED)
    single = [fusion.train(comp_store, "concat", seed=s, **SEEDED) for s in (0, 1, 2)]
    np.testing.assert_allclose(run.oof, np.mean([r.oof for r in single], 0), atol=1e-6)
    hold = np.mean([r.holdout for r in single], 0)
    np.testing.assert_allclose(run.holdout, hold / hold.sum(1, keepdims=True), atol=1e-6)
    m = run.metrics
    assert [x["seed"] for x in m["seeds"]] == [0, 1, 2]
    for x, r in zip(m["seeds"], single, strict=True):  # each seed scores as its own run would
        assert x["macro_f1"] == pytest.approx(r.metrics["macro_f1"], abs=1e-12)
        assert x["holdout"]["accuracy"] == pytest.approx(r.metrics["holdout"]["accuracy"],
                                                         abs=1e-12)
    f1 = [r.metrics["holdout"]["macro_f1"] for r in single]
    assert m["spread"]["holdout"]["macro_f1"] == pytest.approx(
        {"mean": np.mean(f1), "std": np.std(f1, ddof=1)}, abs=1e-12)
    assert m["spread"]["macro_f1"]["std"] > 0
    assert [(x["seed"], x["fold"]) for x in m["folds"]] == [(s, f) for s in (0, 1, 2)
                                                            for f in (0, 1)]
    for s in (0, 1, 2):
        for f in (0, 1):
            assert (run.path / f"weights/seed{s}/fold{f}.safetensors").exists()
    assert not (run.path / "weights/fold0.safetensors").exists()
    assert run.config["seeds"] == [0, 1, 2] and run.config["train"]["seeds"] == [0, 1, 2]
    assert run.config["selection"]["inner_val"] == 0.1


def test_rows_npz_records_each_folds_inner_split_outside_the_fold(comp_store, tmp_path):
    run = fusion.train(comp_store, "concat", out=tmp_path / "r", seeds=[3, 4], **SEEDED)
    rows = np.load(run.path / "rows.npz")
    folds = comp_store.folds
    assert list(rows["seeds"]) == [3, 4]
    np.testing.assert_array_equal(rows["folds"], folds)
    np.testing.assert_array_equal(rows["oof_rows"], run.oof_rows)
    for i, seed in enumerate((3, 4)):
        for f in (0, 1):
            inner = rows[f"seed{seed}_fold{f}_inner"]
            train = np.flatnonzero((folds >= 0) & (folds != f))
            assert np.isin(inner, train).all()  # never the fold's own rows, nor the holdout
            assert len(inner) == round(0.1 * len(train))
            n_fit = run.metrics["folds"][2 * i + f]["n_fit"]
            assert n_fit == len(train) - len(inner)
    assert not np.array_equal(rows["seed3_fold0_inner"], rows["seed4_fold0_inner"])


def test_label_smoothing_reaches_the_loss(comp_store):
    kw = {"fold": 0, "epochs": 15, "batch_size": 32, "lr": 1e-2, "patience": 15, "dim": 16,
          "hidden": 16}
    plain = fusion.train(comp_store, "concat", **kw)
    smooth = fusion.train(comp_store, "concat", label_smoothing=0.5, **kw)
    assert smooth.config["train"]["label_smoothing"] == 0.5
    # smoothed targets (top class 0.5 + 0.5/6) cap the confidence the model learns
    assert plain.oof.max(1).mean() > 0.9 and smooth.oof.max(1).mean() < 0.6
    # late's own loss (two cross-entropies) takes it too
    late = [fusion.train(comp_store, "late", label_smoothing=ls, fold=0, epochs=2, hidden=16)
            for ls in (0.0, 0.5)]
    assert not np.array_equal(late[0].oof, late[1].oof)


def test_label_smoothing_with_a_head_whose_loss_lacks_it_is_refused(comp_store):
    ns: dict = {}
    exec(USER_HEAD + textwrap.dedent("""
        class OwnLoss(GatedSum):
            def loss(self, batch, logits, class_weight=None):
                return super().loss(batch, logits, class_weight)
    """), ns)
    with pytest.raises(fusion.TrainError, match="overrides loss.. without a label_smoothing"):
        fusion.train(comp_store, ns["OwnLoss"], fold=0, epochs=1, label_smoothing=0.1)
    fusion.train(comp_store, ns["OwnLoss"], fold=0, epochs=1)  # without the flag it trains


@pytest.mark.parametrize("args,msg", [
    (["--seeds", "0,1,0"], "repeats seed 0"),
    (["--seeds", ""], "--seeds is empty"),
    (["--seeds", "0,a"], "is not a comma-separated list of integers"),
    (["--seeds", "0,1", "--seed", "2"], "pass one"),
    (["--inner-val", "0"], "--inner-val must be in (0, 1), got 0.0"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
])
def test_bad_seeds_inner_val_or_smoothing_one_line_exit_2(comp_store, tmp_path, args, msg):
    res = runner.invoke(app, ["train", "--store", comp_store.url, "--head", "text", *args,
                              "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 2 and msg in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    _no_run(tmp_path / "r")


def test_cli_seeds_prints_the_spread(comp_store, tmp_path):
    res = runner.invoke(app, ["train", "--store", comp_store.url, "--head", "text", "--seeds",
                              "0,1", "--folds", "1", "--epochs", "1", "--out",
                              str(tmp_path / "r"), "-q"])
    assert res.exit_code == 0, res.output
    assert "2 seeds: OOF macro-F1" in res.output and "±" in res.output
    assert fusion.load_run(tmp_path / "r").config["seeds"] == [0, 1]
