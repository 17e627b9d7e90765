"""Grouped folds (issue 12 part 4): `create_store(groups=...)` and `embedstore extract
--group-col` keep every group in one fold, or wholly in the holdout; the groups are stored
(root array ``groups``, ``folds.grouped`` / ``folds.group_col``) and shown by `info`; a store
without groups gets the folds it always got. Every check reads the store back through
open_store (real Zarr)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import embedstore.create
from cli.embedstore_app import app
from embedstore import create_store, open_store
from embedstore.errors import InvalidInputError, StoreFormatError
from embedstore.format import ATTRS_KEY, parse_root_attrs

runner = CliRunner()
VIT = "timm:vit_tiny_patch16_224@random"  # random-init weights, seeded: no download


def copies_dataset(n_groups: int, copies: int = 3, probs=(0.4, 0.3, 0.2, 0.1), seed: int = 0):
    """``copies`` near-duplicates per group, one class per group drawn with ``probs``; the
    rows are shuffled so that copies are not neighbours."""
    rng = np.random.default_rng(seed)
    cls = rng.choice(len(probs), size=n_groups, p=probs)
    group = np.repeat(np.arange(n_groups), copies)
    order = rng.permutation(len(group))
    group = group[order]
    labels = [f"c{cls[g]}" for g in group]
    return [f"item{i}" for i in range(len(group))], labels, [f"g{g}" for g in group]


def assert_no_group_split(store) -> None:
    """Every group has exactly one fold value (-1 = holdout) in the stored arrays."""
    folds, groups = store.folds, store.groups
    assert groups is not None and len(groups) == len(folds) == store.n_items
    pairs = np.unique(np.stack([np.unique(groups, return_inverse=True)[1].ravel(),
                                folds.astype(np.int64)]), axis=1)
    split = np.unique(pairs[0], return_counts=True)
    assert split[1].max() == 1, f"{(split[1] > 1).sum()} groups span several folds"


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_three_copies_per_group_never_cross_a_fold_or_the_holdout(tmp_path, seed):
    ids, labels, groups = copies_dataset(120, seed=seed)
    create_store(tmp_path / "g.zarr", ids, labels, folds=5, seed=seed, holdout=0.2,
                 groups=groups, group_col="family")
    store = open_store(tmp_path / "g.zarr")
    assert store.groups.tolist() == groups
    assert store.fold_info["grouped"] is True and store.fold_info["group_col"] == "family"
    assert_no_group_split(store)
    counts = np.bincount(store.folds.astype(np.int64) + 1, minlength=6)
    assert counts.min() > 0, counts  # a holdout and five non-empty folds
    assert 0.15 <= counts[0] / store.n_items <= 0.25, counts  # the share is approximate


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["StratifiedGroupKFold", "round robin"])
def test_grouped_folds_keep_the_class_proportions_of_small_groups(tmp_path, monkeypatch, seed,
                                                                  method):
    """Both fold makers: scikit-learn's, and the O(N log N) one for many groups."""
    if method == "round robin":
        monkeypatch.setattr(embedstore.create, "SKLEARN_MAX_GROUPS", 10)
    ids, labels, groups = copies_dataset(400, seed=seed)
    create_store(tmp_path / "g.zarr", ids, labels, folds=5, seed=seed, holdout=0.2,
                 groups=groups)
    store = open_store(tmp_path / "g.zarr")
    assert store.fold_info["stratified"] is True
    assert_no_group_split(store)
    y, folds = store.labels, store.folds
    overall = np.bincount(y, minlength=4) / len(y)
    for f in range(-1, 5):
        share = np.bincount(y[folds == f], minlength=4) / (folds == f).sum()
        assert np.abs(share - overall).max() < 0.03, (f, share.round(3), overall.round(3))


@pytest.mark.parametrize("labelled", [True, False])
def test_a_store_without_groups_gets_the_folds_it_always_got(tmp_path, labelled):
    """Fingerprints of the folds made before grouping existed (sitting 2's make_folds)."""
    want = {(True, 0): "4eaea380def4984d", (True, 3): "1467fc1132104101",
            (False, 0): "3b764eea3c1716db", (False, 3): "e40e026768e1bfda"}
    for seed in (0, 3):
        labels = [f"c{i % 3}" for i in range(90)] if labelled else None
        url = tmp_path / f"s{seed}.zarr"
        create_store(url, [f"i{i}" for i in range(90)], labels, folds=5, seed=seed, holdout=0.2)
        store = open_store(url)
        assert store.folds_fingerprint == want[labelled, seed]
        assert store.groups is None and "groups" not in store.group
        assert not {"grouped", "group_col", "groups_fingerprint"} & set(store.fold_info)


def test_the_dataset_fingerprint_ignores_the_groups(tmp_path):
    ids, labels, groups = copies_dataset(40)
    plain = create_store(tmp_path / "a.zarr", ids, labels)
    grouped = create_store(tmp_path / "b.zarr", ids, labels, groups=groups)
    assert plain.fingerprint == grouped.fingerprint


def test_grouped_attributes_are_validated_and_info_names_an_api_grouping(tmp_path):
    ids, labels, groups = copies_dataset(40)
    store = create_store(tmp_path / "g.zarr", ids, labels, groups=groups)  # no group_col
    meta = dict(store.meta)
    parse_root_attrs({ATTRS_KEY: meta})
    for field, bad in (("grouped", "yes"), ("group_col", 3)):
        broken = {**meta, "folds": {**meta["folds"], field: bad}}
        with pytest.raises(StoreFormatError, match=f"field {field!r} must be"):
            parse_root_attrs({ATTRS_KEY: broken})
    res = runner.invoke(app, ["info", str(tmp_path / "g.zarr")])
    assert "grouped folds: 40 groups from create_store(groups=...) (largest: 3 items)" in res.output


@pytest.mark.parametrize(("groups", "message"), [
    (["g"] * 59 + [""], r"1 items have an empty group \(first: item 59\)"),
    (["g"] * 59 + [None], r"1 items have an empty group"),
    (["g"] * 59, r"groups has 59 values but there are 60 ids"),
    (["one"] * 30 + ["two"] * 30, r"groups of trainable items cannot be split into 5 folds"),
])
def test_bad_groups_are_refused_before_anything_is_written(tmp_path, groups, message):
    url = tmp_path / "bad.zarr"
    with pytest.raises(InvalidInputError, match=message):
        create_store(url, [f"i{i}" for i in range(60)], [f"c{i % 2}" for i in range(60)],
                     groups=groups)
    assert not url.exists()


# ---------------------------------------------------------------------------------------------
# the CLI


def grouped_catalog(make_catalog, n: int = 48, overrides: dict | None = None,
                    column: str = "family"):
    """make_catalog's CSV plus a ``family`` column: 3 copies (same label) per family;
    ``overrides``: row -> value."""
    path = make_catalog(n)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row[column] = (overrides or {}).get(i, f"fam{i // 6}-{i % 2}")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path, [r[column] for r in rows]


def extract(catalog, store, *extra):
    return runner.invoke(app, ["extract", str(catalog), "--store", str(store), "--image", VIT,
                               "--image-size", "32", "-q", *map(str, extra)])


def test_extract_group_col_end_to_end_and_info_shows_the_grouping(tmp_path, make_catalog):
    catalog, families = grouped_catalog(make_catalog, overrides={6: "fam0-0", 8: "fam0-0"})
    res = extract(catalog, tmp_path / "cat.zarr", "--group-col", "family")
    assert res.exit_code == 0, res.output
    store = open_store(tmp_path / "cat.zarr")
    assert store.groups.tolist() == families
    assert store.fold_info["group_col"] == "family"
    assert_no_group_split(store)
    assert (store.folds == -1).any() and store.features["vit-tiny-patch16-224"].n_done == 48
    res = runner.invoke(app, ["info", str(tmp_path / "cat.zarr")])
    assert res.exit_code == 0, res.output
    assert "grouped folds: 16 groups from column 'family' (largest: 5 items)" in res.output
    res = runner.invoke(app, ["info", str(tmp_path / "cat.zarr"), "--json"])
    info = json.loads(res.output)
    assert info["grouping"] == {"group_col": "family", "n_groups": 16, "largest_group": 5}
    assert info["folds"]["grouped"] is True
    # a second extraction into the grouped store with the same column is fine
    res = extract(catalog, tmp_path / "cat.zarr", "--group-col", "family", "--image-name", "v2")
    assert res.exit_code == 0, res.output


def _one_error_line(res, pattern: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(("case", "pattern"), [
    ("empty", r"group column 'family' is empty in 2 rows \(first: \['p003', 'p010'\]\)"),
    ("missing", r"lacks column\(s\) \['family'\].*--group-col"),
])
def test_bad_group_column_is_one_line_exit_2_and_nothing_written(tmp_path, make_catalog, case,
                                                                 pattern):
    if case == "empty":
        catalog, _ = grouped_catalog(make_catalog, overrides={3: "", 10: " "})
    else:
        catalog, _ = grouped_catalog(make_catalog, column="fam")
    _one_error_line(extract(catalog, tmp_path / "new.zarr", "--group-col", "family"), pattern)
    assert not (tmp_path / "new.zarr").exists()


def test_group_col_into_a_store_made_otherwise_is_refused(tmp_path, make_catalog):
    catalog, families = grouped_catalog(make_catalog)
    with open(catalog, newline="") as f:
        rows = list(csv.DictReader(f))
    ids, labels = [r["id"] for r in rows], [r["label"] for r in rows]
    create_store(tmp_path / "plain.zarr", ids, labels)
    before = sorted(p.name for p in (tmp_path / "plain.zarr").rglob("*"))
    _one_error_line(extract(catalog, tmp_path / "plain.zarr", "--group-col", "family"),
                    r"was created without groups, not --group-col 'family'")
    assert sorted(p.name for p in (tmp_path / "plain.zarr").rglob("*")) == before
    other = [f"x{i // 3}" for i in range(len(ids))]
    create_store(tmp_path / "other.zarr", ids, labels, groups=other, group_col="family")
    _one_error_line(extract(catalog, tmp_path / "other.zarr", "--group-col", "family"),
                    r"catalog column 'family' differs from the groups")
    assert not open_store(tmp_path / "other.zarr").features


def test_verify_reports_a_group_that_spans_two_folds(tmp_path):
    import zarr

    from embedstore.verify import verify_store

    ids, labels, groups = copies_dataset(40, seed=3)
    url = tmp_path / "g.zarr"
    create_store(url, ids, labels, folds=3, seed=3, holdout=0.2, groups=groups)
    assert verify_store(open_store(url)).ok
    folds = zarr.open_array(str(url / "folds"), mode="r+")
    f = folds[:]
    first = np.flatnonzero(np.asarray(groups) == groups[0])  # the three copies of one group
    f[first[0]] = (int(f[first[1]]) + 1) % 3  # move one copy to another fold
    folds[:] = f
    rep = verify_store(open_store(url))
    assert not rep.ok
    assert any(p.startswith("groups: 1 group(s) span several folds") and repr(groups[0]) in p
               for p in rep.problems), rep.problems
