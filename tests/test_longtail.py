"""Long tails (issue 15 part 1) and the grouped inner split (issue 12 leftover).

A store with Zipf-sized classes, several of 1-4 items, trains: the rare classes are trained on
where they appear and scored where they land (one warning line says how many are below k),
metrics stay over all K classes, `embedstore info` shows the class-size distribution and
`fusion report` (PNG and --html) the macro-F1 of the head / torso / tail buckets. The inner
validation split keeps classes of 1-2 rows in the fit part and, on a grouped store, whole
groups on one side.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import fusion
from cli.embedstore_app import app as es_app
from cli.fusion_app import app as fusion_app
from embedstore import create_store
from embedstore.classes import frequency_buckets
from embedstore.create import make_folds
from fusion.data import RareClassWarning, inner_split
from fusion.html_report import html_report
from fusion.metrics import f1_by_frequency
from fusion.report import report

runner = CliRunner()
ZIPF = [60, 30, 20, 15, 12, 10, 8, 7, 6, 5, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1]  # 20 classes
FIT = {"folds": 3, "epochs": 4, "batch_size": 32, "lr": 1e-2, "dim": 16, "hidden": 16}


def zipf_store(path, sizes=ZIPF, *, dim: int = 8, seed: int = 0, grouped: bool = False):
    """Classes of ``sizes`` items, pooled vectors = a class centroid + noise (text and image),
    rows shuffled so that a class is not one run of rows. No holdout: every item trains.
    ``grouped``: each class's items in groups of up to 3 (near-duplicates of one product)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    n = len(y)
    groups = None
    if grouped:
        rank = np.empty(n, int)  # the item's position among its class's items
        for c in range(len(sizes)):
            rank[y == c] = np.arange((y == c).sum())
        groups = [f"c{c}g{r // 3}" for c, r in zip(y, rank, strict=True)]
    store = create_store(path, [f"p{i}" for i in range(n)], [f"c{c:02d}" for c in y], folds=3,
                         seed=seed, holdout=0.0, groups=groups)
    for name, mod, extra in (("txt", "text", {"lengths": np.ones(n, int), "layers": [0]}),
                             ("img", "image", {"n_regions": 1, "grid": [1, 1]})):
        centre = rng.standard_normal((len(sizes), dim)).astype(np.float32) * 3
        pooled = centre[y] + rng.standard_normal((n, dim)).astype(np.float32)
        w = store.create_feature(name, modality=mod, dim=dim, block_rows=64,
                                 attrs={"encoder": {"spec": "test:random"}}, **extra)
        with w:
            for b in w.pending_blocks():
                s, e = w.block_range(b)
                data = pooled[s:e].astype(np.float16)
                big = {"tokens": list(data[:, None, None, :])} if mod == "text" else {
                    "regions": data[:, None, :]}
                w.write_block(b, pooled=pooled[s:e], **big)
    return store


@pytest.fixture(scope="module")
def zipf_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zipf")
    store = zipf_store(root / "z.zarr")
    with pytest.warns(RareClassWarning) as caught:
        run = fusion.train(store, "concat", out=root / "concat", **FIT)
    return store, run, [str(w.message) for w in caught]


def test_a_zipf_store_with_classes_of_one_to_four_items_trains_and_warns_once(zipf_run):
    store, run, warned = zipf_run
    counts = np.bincount(store.labels[store.folds >= 0], minlength=len(ZIPF))
    below = int(((counts > 0) & (counts < 3)).sum())
    assert below == 6  # 2, 2, 1, 1, 1, 1
    assert len(warned) == 1 and warned[0].startswith(f"{below} of 20 classes have fewer "
                                                     "trainable items than the 3 folds")
    # every item is scored out of fold, even a single-item class, and metrics span all K
    assert len(run.oof_rows) == store.n_items and run.oof.shape == (store.n_items, 20)
    assert len(run.metrics["per_class_f1"]) == 20
    assert run.metrics["macro_f1"] == pytest.approx(np.mean(run.metrics["per_class_f1"]))
    # a rare item is predicted by the model of its own fold, which never trained on it: a
    # class whose only item sits in fold f is absent from that model's fit rows
    rows = np.load(run.path / "rows.npz")
    single = [c for c in range(20) if counts[c] == 1]
    for c in single:
        f = int(store.folds[store.labels == c][0])
        assert not (store.labels[np.flatnonzero((store.folds >= 0) & (store.folds != f))]
                    == c).any()
        assert np.isin(np.flatnonzero(store.labels == c), rows[f"seed0_fold{f}_inner"]).sum() == 0


def test_report_and_html_show_f1_by_head_torso_tail(zipf_run, tmp_path):
    store, run, _ = zipf_run
    res = report(run, out_dir=tmp_path / "png")
    freq = res["frequency"]["oof"]
    assert list(freq) == ["head", "torso", "tail"]
    assert sum(b["classes"] for b in freq.values()) == 20
    assert sum(b["items"] for b in freq.values()) == store.n_items
    per = np.asarray(run.metrics["per_class_f1"])
    bucket = frequency_buckets(np.bincount(store.labels, minlength=20))
    for j, name in enumerate(("head", "torso", "tail")):
        assert freq[name]["macro_f1"] == pytest.approx(per[bucket == j].mean())
    assert res["frequency"]["holdout"] is None  # this store has no holdout
    assert (tmp_path / "png" / "f1_by_frequency.png").stat().st_size > 1000
    page = html_report([run], tmp_path / "r.html").read_text()
    table = page.split('id="frequency"', 1)[1].split("</table>", 1)[0]
    assert "head (3 classes, 110 items)" in table  # 60 + 30 + 20 = 110 of 195 items
    assert f'data-v="{freq["tail"]["macro_f1"]}"' in table
    cli = runner.invoke(fusion_app, ["report", str(run.path), "--out", str(tmp_path / "c")])
    assert cli.exit_code == 0, cli.output
    assert "oof macro-F1 by class frequency: head" in cli.output


def test_frequency_buckets_by_cumulative_item_share():
    # 100 items: 50 | 20 + 10 | 8 + 6 + 4 + 2 + 0 -> head, torso, tail
    counts = np.array([20, 50, 10, 8, 6, 4, 2, 0])
    assert frequency_buckets(counts).tolist() == [1, 0, 1, 2, 2, 2, 2, 2]
    got = f1_by_frequency(np.linspace(0, 0.7, 8), counts)
    assert got["head"] == {"classes": 1, "items": 50, "macro_f1": pytest.approx(0.1)}
    assert got["torso"]["classes"] == 2 and got["torso"]["items"] == 30
    assert got["tail"]["macro_f1"] == pytest.approx(np.linspace(0, 0.7, 8)[3:].mean())


def test_info_shows_the_class_size_distribution(zipf_run):
    store, _, _ = zipf_run
    res = runner.invoke(es_app, ["info", store.url, "--json"])
    assert res.exit_code == 0, res.output
    sizes = json.loads(res.output)["class_sizes"]
    assert sizes == {"basis": "trainable items", "min": 1, "median": 4.5, "max": 60,
                     "below_5": 10, "below_20": 17, "head": 3, "torso": 5, "tail": 12,
                     "folds": 3, "below_folds": 6}
    res = runner.invoke(es_app, ["info", store.url])
    assert ("class sizes (trainable items): min 1 / median 4.5 / max 60; 10 classes below 5 "
            "items, 17 below 20, 6 below the 3 folds; head / torso / tail: 3 / 5 / 12") in res.output


def test_inner_split_keeps_classes_of_one_or_two_rows_in_the_fit_part():
    labels = np.repeat(np.arange(5), [40, 20, 3, 2, 1])
    rows = np.arange(len(labels))
    for seed in range(20):
        fit, inner = inner_split(labels, rows, 0.5, seed, 0)
        assert np.isin(np.flatnonzero(labels >= 3), fit).all()  # 2- and 1-row classes
        assert np.bincount(labels[fit], minlength=5).min() >= 1  # every class keeps a fit row
        assert len(inner) == 33  # round(0.5 * 66), from the classes that can give rows


def grouped_labels(n_groups: int, seed: int = 0):
    """Groups of 1-4 copies of one class; plus 3 rare classes (1-2 rows, one per group)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_groups)
    cls = rng.choice(4, n_groups, p=[0.4, 0.3, 0.2, 0.1])
    group = np.repeat(np.arange(n_groups), sizes)
    labels = np.repeat(cls, sizes)
    group = np.concatenate([group, n_groups + np.array([0, 0, 1, 2])])
    labels = np.concatenate([labels, [4, 4, 5, 6]])
    order = rng.permutation(len(group))
    return labels[order], group[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_inner_split_never_splits_a_group(seed):
    labels, groups = grouped_labels(150, seed)
    rows = np.sort(np.random.default_rng(seed).choice(len(labels), len(labels) - 30,
                                                      replace=False))
    fit, inner = inner_split(labels, rows, 0.2, seed, 1, groups=groups)
    assert np.array_equal(np.sort(np.concatenate([fit, inner])), rows)
    assert not np.intersect1d(groups[fit], groups[inner]).size  # every group on one side
    assert abs(len(inner) - 0.2 * len(rows)) <= 8  # the share, give or take a group or two
    assert not np.isin(labels[inner], [4, 5, 6]).any()  # rare classes stay in the fit part
    share = np.bincount(labels[inner], minlength=7)[:4] / len(inner)
    want = np.bincount(labels[rows], minlength=7)[:4] / len(rows)
    assert np.abs(share - want).max() < 0.1  # stratified by class, as far as groups allow
    again = inner_split(labels, rows, 0.2, seed, 1, groups=groups)[1]
    assert np.array_equal(inner, again)


def test_training_on_a_grouped_store_keeps_each_group_on_one_side_of_the_inner_split(
        tmp_path):
    store = zipf_store(tmp_path / "g.zarr", [90, 60, 30, 12, 6, 2, 1], grouped=True)
    codes = np.asarray(store.groups)
    assert len(np.unique(codes)) < store.n_items  # groups of up to 3 items
    with pytest.warns(RareClassWarning):
        run = fusion.train(store, "concat", out=tmp_path / "run", folds=3, epochs=1,
                           batch_size=64, dim=8, hidden=8)
    rows = np.load(run.path / "rows.npz")
    for f in range(3):
        inner = rows[f"seed0_fold{f}_inner"]
        train = np.flatnonzero((store.folds >= 0) & (store.folds != f))
        fit = np.setdiff1d(train, inner)
        assert len(inner) and not np.intersect1d(codes[fit], codes[inner]).size


def test_the_cli_prints_the_rare_class_warning_as_one_line(zipf_run, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    store, _, _ = zipf_run
    fusion_bin = Path(sys.executable).parent / "fusion"
    out = subprocess.run([str(fusion_bin), "train", "--store", store.url, "--head", "concat",
                          "--epochs", "1", "--folds", "3", "--out", str(tmp_path / "r"), "-q"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "fewer trainable items" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: 6 of 20 classes"), out.stderr
    assert "RareClassWarning" not in out.stderr and "warnings.warn" not in out.stderr


@pytest.mark.parametrize("holdout", [0.0, 0.2])
def test_a_long_tail_keeps_the_head_classes_stratified(holdout):
    """Best-effort stratification: classes with fewer items than folds share one pooled stratum,
    so a tail of 1-item classes does not turn every class's folds into a plain shuffle."""
    sizes = np.maximum(1, 3000 // np.arange(1, 1201))  # Zipf: 3000 .. 2, then 500 of size 2-1
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(len(sizes)), sizes))
    folds, stratified = make_folds(y, len(y), k=5, seed=0, holdout=holdout)
    assert not stratified  # not every class could be stratified: the store says so
    want = np.bincount(folds + 1, minlength=6) / len(y)
    for c in np.flatnonzero(sizes >= 200):
        share = np.bincount(folds[y == c] + 1, minlength=6) / sizes[c]
        assert np.abs(share - want).max() < 0.012, (c, share.round(3), want.round(3))
    tail = np.flatnonzero(sizes < 5)
    in_fold = np.isin(y, tail) & (folds >= 0)
    assert np.bincount(folds[in_fold], minlength=5).min() > 0.15 * in_fold.sum()  # spread evenly
