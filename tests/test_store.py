"""Store format v1: round trip, layout, loader feeds, resume after a real kill, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import embedstore as es
from embedstore.format import token_layout

from .conftest import fill_text


def test_round_trip_ragged_lengths_zero_to_n(small_store):
    s = es.open_store(small_store.url)
    exp = small_store.expected
    fs = s.features["txt"]
    assert fs.status == "complete" and fs.n_done == 50 and fs.layers == [5, 6]
    for i in range(50):
        assert fs.tokens(i).shape == (exp["lengths"][i], 2, 8)
        np.testing.assert_array_equal(fs.tokens(i), exp["tokens"][i])
    np.testing.assert_array_equal(fs.pooled_all(), exp["text_pooled"])
    rows = [7, 0, 49, 10]
    for got, r in zip(fs.tokens_rows(rows), rows, strict=True):
        np.testing.assert_array_equal(got, exp["tokens"][r])
    img = s.features["img"]
    np.testing.assert_array_equal(img.regions_rows(rows), exp["regions"][rows])
    np.testing.assert_array_equal(img.pooled_range(3, 9), exp["image_pooled"][3:9])
    assert img.prefix_tokens == 1 and img.grid == [2, 2]


def test_store_dataset_arrays(small_store):
    s = es.open_store(small_store.url)
    assert s.ids.tolist() == [f"item-{i:03d}" for i in range(50)]
    assert s.classes == ["bag", "hat", "shoe"]
    assert [s.classes[c] for c in s.labels[:3]] == ["shoe", "bag", "hat"]
    folds = s.folds
    assert (folds == -1).sum() == 10  # 20% holdout
    assert sorted(set(folds.tolist())) == [-1, 0, 1, 2, 3, 4]
    assert s.fold_info["stratified"] is True


def test_token_layout_aligns_blocks_to_chunks():
    lengths = np.array([3, 0, 5, 2, 7, 1, 0, 4])
    off, total = token_layout(lengths, block_rows=4, token_chunk=8)
    assert off[0] == 0 and off[4] == 16  # block 1 starts on the next chunk boundary
    np.testing.assert_array_equal(off[1:4], [3, 3, 8])
    np.testing.assert_array_equal(off[5:8] - off[4], [7, 8, 8])
    assert total == off[8] == 16 + 12
    assert (off[:-1] + lengths <= off[1:]).all()


@pytest.mark.parametrize("max_ram", [None, 0], ids=["ram", "streaming"])
def test_loader_yields_padded_aligned_batches(small_store, max_ram):
    s = es.open_store(small_store.url)
    exp = small_store.expected
    rows = np.flatnonzero(s.folds >= 0)
    loader = s.loader(rows, text="txt", image="img", batch_size=7, shuffle=True, seed=3,
                      max_ram=max_ram)
    assert bool(loader.streaming) == (max_ram == 0)
    seen = []
    for b in loader:
        r = b["rows"].numpy()
        seen.extend(r.tolist())
        assert b["text_tokens"].shape[:3] == (len(r), max(1, exp["lengths"][r].max()), 2)
        for j, row in enumerate(r):
            n = int(b["text_mask"][j].sum())
            assert n == exp["lengths"][row]
            np.testing.assert_array_equal(b["text_tokens"][j, :n].numpy(),
                                          exp["tokens"][row].astype(np.float32))
            assert not b["text_tokens"][j, n:].any()
        np.testing.assert_array_equal(b["image_regions"].numpy(),
                                      exp["regions"][r].astype(np.float32))
        np.testing.assert_array_equal(b["labels"].numpy(), s.labels[r])
        assert b["image_prefix"] == 1
    assert sorted(seen) == sorted(rows.tolist())


def test_loader_shuffle_is_seeded_and_changes_per_epoch(small_store):
    s = es.open_store(small_store.url)
    order = lambda ld: [r for b in ld for r in b["rows"].tolist()]  # noqa: E731
    a = s.loader(range(50), text="txt", batch_size=8, shuffle=True, seed=1)
    b = s.loader(range(50), text="txt", batch_size=8, shuffle=True, seed=1)
    first = order(a)
    assert first == order(b)
    a.set_epoch(1)
    assert order(a) != first


def test_loader_layer_selection(small_store):
    s = es.open_store(small_store.url)
    b = next(iter(s.loader([9], text="txt", layers=[-1])))
    np.testing.assert_array_equal(b["text_tokens"][0, :, 0].numpy(),
                                  small_store.expected["tokens"][9][:, 1].astype(np.float32))
    b = next(iter(s.loader([9], text="txt", layers=[5])))
    np.testing.assert_array_equal(b["text_tokens"][0, :, 0].numpy(),
                                  small_store.expected["tokens"][9][:, 0].astype(np.float32))
    with pytest.raises(es.InvalidInputError, match="layer 3 is not cached"):
        s.loader([9], text="txt", layers=[3])


def test_pooled_only_fields_skip_token_arrays(small_store):
    s = es.open_store(small_store.url)
    ld = s.loader(range(10), text="txt", fields={"text_pooled"}, max_ram=0)
    b = next(iter(ld))
    assert "text_tokens" not in b and b["text_pooled"].shape == (10, 8)
    assert not s.features["txt"].in_ram


# -- resume after a real kill --------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys, time, numpy as np, embedstore as es
    url, slow = sys.argv[1], float(sys.argv[2])
    s = es.open_store(url, mode="r+")
    lengths = np.arange(s.n_items) % 13
    rng = np.random.default_rng(0)
    toks = [rng.standard_normal((int(n), 1, 8)).astype(np.float16) for n in lengths]
    pooled = rng.standard_normal((s.n_items, 8)).astype(np.float32)
    if "t" in s.features:
        w = s.feature_writer("t")
    else:
        w = s.create_feature("t", modality="text", dim=8, lengths=lengths, layers=[0],
                             block_rows=8, attrs={"encoder": {"spec": "test"}})
    for b in w.pending_blocks():
        a, e = w.block_range(b)
        w.write_block(b, tokens=toks[a:e], pooled=pooled[a:e])
        print("block", b, flush=True)
        time.sleep(slow)
    w.finalize()
    print("complete", flush=True)
""")


def _arrays(url: str) -> dict[str, bytes]:
    g = zarr.open_group(url, mode="r", path="features/t")
    return {k: np.asarray(g[k][:]).tobytes() for k in ("tokens", "pooled", "offsets", "done")}


def test_writer_killed_midway_resumes_to_identical_bytes(tmp_path):
    ids = [str(i) for i in range(80)]
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    ref = tmp_path / "ref.zarr"
    es.create_store(ref, ids, folds=2, holdout=0)
    subprocess.run([sys.executable, str(script), str(ref), "0"], check=True,
                   capture_output=True)
    url = tmp_path / "killed.zarr"
    es.create_store(url, ids, folds=2, holdout=0)
    proc = subprocess.Popen([sys.executable, str(script), str(url), "0.5"],
                            stdout=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.time() + 60
    while seen < 3 and time.time() < deadline:
        if proc.stdout.readline().startswith("block"):
            seen += 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s = es.open_store(url)
    fs = s.features["t"]
    assert fs.status == "writing" and 0 < fs.n_done < 80
    done_before = fs.done().copy()
    tokens_before = np.asarray(fs.group["tokens"][:])
    with pytest.raises(es.FeatureIncompleteError, match="--resume"):
        s.loader([0], text="t")
    out = subprocess.run([sys.executable, str(script), str(url), "0"], check=True,
                         capture_output=True, text=True).stdout
    assert out.count("block") == 10 - done_before.reshape(-1, 8).all(1).sum()
    assert _arrays(str(url)) == _arrays(str(ref))
    after = es.open_store(url).features["t"]
    assert after.status == "complete"
    # finished rows were not touched by the resumed writer
    off, ln = after.offsets(), after.lengths()
    for r in np.flatnonzero(done_before):
        np.testing.assert_array_equal(np.asarray(after.group["tokens"][:])[off[r]:off[r] + ln[r]],
                                      tokens_before[off[r]:off[r] + ln[r]])


# -- bad input ------------------------------------------------------------------------------

def test_duplicate_ids_refused_and_nothing_written(tmp_path):
    with pytest.raises(es.InvalidInputError, match=r"not unique: \['a'\]"):
        es.create_store(tmp_path / "d.zarr", ["a", "b", "a"])
    assert not (tmp_path / "d.zarr").exists()


def test_empty_ids_refused(tmp_path):
    with pytest.raises(es.InvalidInputError, match="id list is empty"):
        es.create_store(tmp_path / "e.zarr", [])


def test_labels_of_wrong_length_refused(tmp_path):
    with pytest.raises(es.InvalidInputError, match="labels has 2 values but there are 3 ids"):
        es.create_store(tmp_path / "l.zarr", ["a", "b", "c"], ["x", "y"])
    assert not (tmp_path / "l.zarr").exists()


def test_nan_label_refused(tmp_path):
    with pytest.raises(es.InvalidInputError, match="label of item 1 is missing"):
        es.create_store(tmp_path / "n.zarr", ["a", "b", "c"], ["x", float("nan"), "y"])


def test_mixed_id_types_refused(tmp_path):
    with pytest.raises(es.InvalidInputError, match="ids mix types"):
        es.create_store(tmp_path / "m.zarr", ["1", 2, "3"])


def test_existing_store_not_overwritten(small_store):
    with pytest.raises(es.StoreExistsError, match="already exists"):
        es.create_store(small_store.url, ["a", "b"])
    assert es.open_store(small_store.url).n_items == 50


def test_newer_format_version_refused(small_store):
    meta_file = Path(small_store.url) / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["embedstore"]["format"] = 3
    meta.pop("consolidated_metadata", None)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(es.StoreFormatError, match="format 3, newer than this embedstore"):
        es.open_store(small_store.url)


def test_missing_store_url(tmp_path):
    with pytest.raises(es.StoreNotFoundError, match="no store at"):
        es.open_store(tmp_path / "nope.zarr")


def test_unknown_feature_name_lists_available(small_store):
    s = es.open_store(small_store.url)
    with pytest.raises(es.FeatureNotFoundError, match=r"'bert' is not in store.*\['img', 'txt'\]"):
        s.features["bert"]


def test_complete_feature_set_not_overwritten_without_flag(small_store):
    s = es.open_store(small_store.url, mode="r+")
    with pytest.raises(es.FeatureExistsError, match="--overwrite"):
        fill_text(s, "txt", np.ones(50, int))
    np.testing.assert_array_equal(s.features["txt"].tokens(3), small_store.expected["tokens"][3])


def test_overwrite_replaces_feature_set(small_store):
    s = es.open_store(small_store.url, mode="r+")
    w = s.create_feature("txt", modality="text", dim=8, lengths=np.ones(50, int), layers=[1],
                         block_rows=16, overwrite=True, attrs={"encoder": {"spec": "v2"}})
    # until the new set is complete, readers still see the old one
    assert es.open_store(small_store.url).features["txt"].layers == [5, 6]
    with w:
        for b in w.pending_blocks():
            a, e = w.block_range(b)
            w.write_block(b, tokens=np.ones((e - a, 1, 8)), pooled=np.zeros((e - a, 8)))
    fs = es.open_store(small_store.url).features["txt"]
    assert fs.layers == [1] and fs.encoder["spec"] == "v2" and fs.tokens(0).shape == (1, 1, 8)


def test_write_block_shape_errors_name_the_block(small_store):
    s = es.open_store(small_store.url, mode="r+")
    w = s.create_feature("new", modality="image", dim=6, n_regions=5, block_rows=16,
                         attrs={"encoder": {}})
    with pytest.raises(es.InvalidInputError, match=r"block 0: regions must be \(16, 5, 6\)"):
        w.write_block(0, regions=np.zeros((16, 4, 6)), pooled=np.zeros((16, 6)))
    assert s.features["new"].n_done == 0


def test_read_only_store_refuses_writes(small_store):
    s = es.open_store(small_store.url)
    with pytest.raises(es.InvalidInputError, match="read-only"):
        s.create_feature("x", modality="image", dim=2, n_regions=1)
