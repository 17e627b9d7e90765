"""The float codec (issue 15, the feed): new feature sets compress their float arrays with
Blosc-LZ4 (decodes at memory speed), every other array with zstd; ``codec="zstd"`` keeps the
chain every store had before, and such stores read, stream and verify as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import embedstore as es
from cli.embedstore_app import app
from embedstore import create_store
from embedstore.extract import ExtractConfig
from embedstore.extract.append import set_config
from embedstore.format import DEFAULT_FLOAT_CODEC
from embedstore.verify import verify_store

from .conftest import fill_image, fill_text

runner = CliRunner()
# the chain of every array before this change (docs/format.md §6): what old stores hold
ZSTD_CHAIN = [{"name": "zstd", "configuration": {"level": 1, "checksum": False}},
              {"name": "crc32c"}]
N = 40


def chains(path) -> dict[str, list]:
    """Array path -> its bytes-to-bytes codecs, from the consolidated metadata."""
    root = json.loads(Path(path, "zarr.json").read_text())
    return {k: m["codecs"][1:] for k, m in root["consolidated_metadata"]["metadata"].items()
            if m["node_type"] == "array"}


def two_sets(path, codec: str | None):
    store = create_store(path, [f"p{i}" for i in range(N)], ["a", "b"] * (N // 2), folds=2,
                         holdout=0.0)
    kw = {} if codec is None else {"codec": codec}
    orig = store.create_feature
    store.create_feature = lambda name, **a: orig(name, **a, **kw)  # the fixtures' writers
    toks, _ = fill_text(store, "txt", np.arange(N) % 7, layers=(0, 1, 2), dim=8)
    regions, _ = fill_image(store, "img", n_regions=5, dim=8)
    return toks, regions


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec")
    toks, regions = two_sets(d / "new.zarr", None)
    two_sets(d / "old.zarr", "zstd")  # the same data (seeded fixtures), written the old way
    return {"new": str(d / "new.zarr"), "old": str(d / "old.zarr"), "tokens": toks,
            "regions": regions}


def test_new_sets_get_lz4_on_float_arrays_and_zstd_elsewhere(stores):
    assert DEFAULT_FLOAT_CODEC == ExtractConfig().codec == "lz4"
    got = chains(stores["new"])
    lz4 = [{"name": "blosc", "configuration": {"typesize": 2, "cname": "lz4", "clevel": 5,
                                               "shuffle": "noshuffle", "blocksize": 0}},
           {"name": "crc32c"}]
    assert got["features/txt/tokens"] == got["features/img/regions"] == lz4
    assert got["features/img/pooled"][0]["configuration"]["typesize"] == 4  # float32
    float_arrays = {"features/txt/tokens", "features/img/regions", "features/txt/pooled",
                    "features/img/pooled"}
    for path, chain in got.items():
        assert chain[-1] == {"name": "crc32c"}, path  # every chunk stays checksummed
        assert (chain[0]["name"] == "blosc") == (path in float_arrays), path
        if path not in float_arrays:
            assert chain == ZSTD_CHAIN, path
    assert all(c == ZSTD_CHAIN for c in chains(stores["old"]).values())


@pytest.mark.parametrize("which", ["new", "old"])
def test_either_codec_streams_loads_and_verifies_the_same_values(stores, which):
    store = es.open_store(stores[which])
    assert verify_store(store).ok
    rows = np.arange(N)
    kw = {"text": "txt", "image": "img", "batch_size": 16, "shuffle": True, "seed": 3,
          "layers": [0, 2]}  # a non-contiguous layer selection: a copy per row
    ram = es.open_store(stores[which]).loader(rows, max_ram=None, **kw)
    stream = store.loader(rows, max_ram=0, window_blocks=1, **kw)
    assert not ram.streaming and stream.streaming
    for ld in (ram, stream):
        seen = []
        for b in ld:
            assert b["text_tokens"].dtype == b["image_regions"].dtype == torch.float32
            for j, r in enumerate(b["rows"].tolist()):
                n = int(b["text_mask"][j].sum())
                np.testing.assert_array_equal(b["text_tokens"][j, :n].numpy(),
                                              stores["tokens"][r][:, [0, 2]].astype(np.float32))
                assert not b["text_tokens"][j, n:].any()  # padding is zeros, not stale memory
                np.testing.assert_array_equal(b["image_regions"][j].numpy(),
                                              stores["regions"][r].astype(np.float32))
                seen.append(r)
        assert sorted(seen) == rows.tolist()


def test_a_flipped_byte_in_an_lz4_chunk_is_caught(stores, tmp_path):
    path = tmp_path / "bad.zarr"
    shutil.copytree(stores["new"], path)
    chunk = path / "features" / "img" / "regions" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    rep = verify_store(es.open_store(path))
    assert not rep.ok and any("features/img/regions" in p for p in rep.problems), rep.problems
    with pytest.raises(es.StoreCorruptError, match=r"features/img/regions', chunk 1"):
        es.open_store(path).features["img"].read_block(1)  # block = chunk 1


def test_appends_keep_the_codec_a_set_was_extracted_with():
    def fs(extract):
        return SimpleNamespace(name="t", modality="text", meta={
            "extract": extract, "encoder": {"spec": "hf:x"}})
    base = {"text_cols": ["title"], "block_rows": 16}
    assert set_config(fs(base)).codec == "zstd"  # extracted before the option: zstd
    assert set_config(fs({**base, "codec": "lz4"})).codec == "lz4"
    assert set_config(fs({**base, "codec": "zstd"})).codec == "zstd"


def test_extract_codec_option_and_a_bad_value(make_catalog, tmp_path):
    cat = make_catalog(8)
    args = ["extract", str(cat), "--image", "timm:vit_tiny_patch16_224@random", "--image-size",
            "32", "--image-name", "vit", "--block-rows", "4", "--device", "cpu", "-q"]
    res = runner.invoke(app, [*args, "--store", str(tmp_path / "z.zarr"), "--codec", "zstd"])
    assert res.exit_code == 0, res.output
    assert chains(tmp_path / "z.zarr")["features/vit/regions"] == ZSTD_CHAIN
    fs = es.open_store(tmp_path / "z.zarr").features["vit"]
    assert fs.meta["extract"]["codec"] == "zstd"  # recorded: appends reuse it
    res = runner.invoke(app, [*args, "--store", str(tmp_path / "g.zarr"), "--codec", "gzip"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--codec must be one of lz4, zstd, got 'gzip'" in lines[0], (
        res.output)
    assert not (tmp_path / "g.zarr").exists()
