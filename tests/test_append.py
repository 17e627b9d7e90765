"""Appends (issue 13 part 1, docs/format.md §2.3): new items become an immutable segment.

Real encoders (MiniLM-L6 from its package, a seeded random-init ViT-tiny), real Zarr, a real
SIGKILL. The appended rows read back equal to the same items extracted into a fresh store; no
file of the original store is rewritten; folds of new ids are a function of the id; every
refusal leaves the store byte-identical."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.embedstore_app import app
from embedstore import open_store
from embedstore.create import hash_folds
from embedstore.errors import InvalidInputError
from embedstore.extract import ExtractConfig, extract
from embedstore.extract.append import append
from embedstore.verify import verify_store

from .conftest import kill_when, minilm_spec, write_tiny_catalog

runner = CliRunner()
VIT = "timm:vit_tiny_patch16_224@random"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
CFG = dict(layers="-1", image_size=32, block_rows=4, batch_size=4, device="cpu", folds=2,
           holdout=0.25)


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, str]], drop: tuple[str, ...] = ()) -> Path:
    cols = [c for c in rows[0] if c not in drop]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    """A 30-item catalog split: 20 old items (the store), 10 new (the append)."""
    root = tmp_path_factory.mktemp("append")
    cat = write_tiny_catalog(root, n=30, n_classes=3)
    rows = rows_of(cat)
    return {"root": root, "old": write_rows(root / "old.csv", rows[:20]),
            "new": write_rows(root / "new.csv", rows[20:]),
            "new_unlabelled": write_rows(root / "new_u.csv", rows[20:], drop=("label",)),
            "all": cat}


def fresh_store(path: Path, catalog: Path) -> Path:
    extract(catalog, path, ExtractConfig(text=minilm_spec(), image=VIT, text_name="t",
                                         image_name="i", **CFG))
    return path


def test_appended_rows_equal_a_fresh_extraction_and_nothing_old_is_rewritten(catalogs, tmp_path):
    store = fresh_store(tmp_path / "s.zarr", catalogs["old"])
    before = {k: v for k, v in snapshot(store).items() if k != "zarr.json"}
    append(catalogs["new"], store)
    after = snapshot(store)
    assert all(after[k] == v for k, v in before.items() if not k.endswith("zarr.json")), \
        "an append rewrote a chunk of the original store"
    s = open_store(store)
    assert s.n_items == 30 and s.meta["format"] == 2 and len(s.segments) == 2
    assert s.ids.tolist() == [r["id"] for r in rows_of(catalogs["all"])]
    ref = open_store(fresh_store(tmp_path / "ref.zarr", catalogs["new"]))
    for name in ("t", "i"):
        got = s.features[name]
        assert got.status == "complete" and got.n_items == 30
        new = np.arange(20, 30)
        np.testing.assert_array_equal(got.pooled_rows(new), ref.features[name].pooled_rows(
            np.arange(10)))
        if name == "t":
            for a, b in zip(got.tokens_rows(new), ref.features[name].tokens_rows(range(10)),
                            strict=True):
                np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_array_equal(got.regions_rows(new),
                                          ref.features[name].regions_rows(np.arange(10)))
    # the loader streams across the segment boundary (blocks of 4 rows: 20 is a boundary,
    # 18..21 spans it) and in RAM alike
    for max_ram in (0, None):
        batches = list(s.loader(np.arange(16, 24), text="t", image="i", batch_size=8,
                                max_ram=max_ram))
        assert batches[0]["rows"].tolist() == list(range(16, 24))
    labels = [s.classes[c] for c in s.labels[20:]]
    assert labels == [r["label"] for r in rows_of(catalogs["new"])]
    k = s.fold_info["k"]
    want = hash_folds(s.ids[20:].tolist(), k=k, holdout=0.25, salt=s.fold_info["hash_salt"])
    assert s.folds[20:].tolist() == want.tolist()
    assert verify_store(s).ok, verify_store(s).problems


def test_hash_folds_do_not_depend_on_order_or_batching():
    ids = [f"id{i}" for i in range(200)]
    a = hash_folds(ids, k=5, holdout=0.2, salt="x")
    b = hash_folds(ids[::-1], k=5, holdout=0.2, salt="x")[::-1]
    c = np.concatenate([hash_folds(ids[:77], k=5, holdout=0.2, salt="x"),
                        hash_folds(ids[77:], k=5, holdout=0.2, salt="x")])
    assert a.tolist() == b.tolist() == c.tolist()
    share = (a == -1).mean()
    assert 0.12 < share < 0.28 and set(a.tolist()) == {-1, 0, 1, 2, 3, 4}


def test_unlabelled_append_is_in_no_fold_and_trains_around_it(catalogs, tmp_path):
    import fusion

    store = fresh_store(tmp_path / "s.zarr", catalogs["old"])
    append(catalogs["new_unlabelled"], store)
    s = open_store(store)
    assert (s.labels[20:] == -1).all() and (s.folds[20:] == -2).all()
    run = fusion.train(s, "concat", epochs=1, batch_size=8, threads=1, dim=8, hidden=8)
    assert not set(run.oof_rows.tolist()) & set(range(20, 30))
    assert not set(run.holdout_rows.tolist()) & set(range(20, 30))
    # a new feature set on a grown store would lack the segments' rows: refused, nothing written
    before = snapshot(store)
    with pytest.raises(InvalidInputError, match="appended segment"):
        extract(catalogs["all"], store, ExtractConfig(text=minilm_spec(), text_name="t2", **CFG))
    assert snapshot(store) == before


@pytest.mark.parametrize("case", ["duplicate", "columns", "incomplete"])
def test_refusals_are_one_line_exit_2_and_leave_the_store_byte_identical(catalogs, tmp_path,
                                                                        case):
    store = fresh_store(tmp_path / "s.zarr", catalogs["old"])
    new = catalogs["new"]
    if case == "duplicate":
        new = write_rows(tmp_path / "dup.csv", rows_of(catalogs["all"])[18:])
        want = "already in store"
    elif case == "columns":
        new = write_rows(tmp_path / "cols.csv", rows_of(catalogs["new"]), drop=("title",))
        want = "lacks column(s) ['title']"
    else:
        s = open_store(store, mode="r+")  # a set left 'writing' (no block written)
        s.create_feature("half", modality="image", dim=4, n_regions=2, block_rows=4,
                         attrs={"encoder": {"spec": "test:random"}})
        want = "'half' of"
    before = snapshot(store)
    res = runner.invoke(app, ["extract", str(new), "--store", str(store), "--append"])
    assert res.exit_code == 2, res.output
    assert want in res.output and "Traceback" not in res.output
    assert len([ln for ln in res.output.strip().splitlines() if ln.strip()]) <= 3
    assert snapshot(store) == before


@pytest.mark.timeout(900)  # a regression that reads the blocked image would hang, not fail
def test_sigkill_during_an_append_then_resume_gives_the_bytes_of_an_uninterrupted_one(
        catalogs, tmp_path):
    ref = fresh_store(tmp_path / "ref.zarr", catalogs["old"])
    append(catalogs["new"], ref)
    # the same append elsewhere, with new item 26's image a named pipe: reading it blocks, so
    # the run has written the text set and image block 0 of the segment when it is killed
    store = fresh_store(tmp_path / "s.zarr", catalogs["old"])
    rows = rows_of(catalogs["new"])
    blocked = catalogs["root"] / "blocked.png"
    if blocked.exists():
        blocked.unlink()
    os.mkfifo(blocked)
    try:
        rows[6]["image"] = "blocked.png"
        new = write_rows(catalogs["root"] / "new_blocked.csv", rows)
        cmd = [str(BIN / "embedstore"), "extract", str(new), "--store", str(store), "--append",
               "--threads", "1", "-q"]
        kill_when(cmd, ENV, store / "segments" / ".1.new" / "features" / "i" / "done" / "c" / "0")
        s = open_store(store)  # readers never see half an append
        assert s.n_items == 20 and s.meta["format"] == 1
        res = runner.invoke(app, ["extract", str(new), "--store", str(store), "--append"])
        assert res.exit_code == 2 and "--resume" in res.output
    finally:
        blocked.unlink()
    os.link(catalogs["root"] / "img" / "26.png", blocked)  # the same image as the reference
    out = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    a, b = open_store(ref), open_store(store)
    assert b.n_items == a.n_items == 30 and b.ids.tolist() == a.ids.tolist()
    for name in ("t", "i"):
        for sub in ("features/" + name,):
            ca = {k: v for k, v in snapshot(ref / "segments" / "1" / sub).items() if "/c/" in
                  f"/{k}"}
            cb = {k: v for k, v in snapshot(store / "segments" / "1" / sub).items() if "/c/"
                  in f"/{k}"}
            assert ca and ca == cb, name
    assert a.folds.tolist() == b.folds.tolist() and a.fingerprint == b.fingerprint
