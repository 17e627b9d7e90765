"""Stores behind fsspec URLs: memory://, file://, http:// (read-only) and S3 on a loopback moto
server started by the tests (marked ``remote``)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest
from typer.testing import CliRunner

import embedstore as es
from cli.embedstore_app import app as es_app
from embedstore.verify import verify_store

from .conftest import fill_image, fill_text, minilm_spec

runner = CliRunner()


def test_memory_url_round_trip_and_verify():
    url = f"memory://embedstore-tests/{uuid.uuid4().hex}/s.zarr"
    s = es.create_store(url, [f"i{i}" for i in range(30)], ["a", "b", "c"] * 10, folds=3)
    toks, pooled = fill_text(s, "txt", np.arange(30) % 6, block_rows=8)
    regions, _ = fill_image(s, "img", block_rows=8)
    r = es.open_store(url)
    assert r.ids.tolist()[:2] == ["i0", "i1"] and r.classes == ["a", "b", "c"]
    for i in (0, 7, 29):
        np.testing.assert_array_equal(r.features["txt"].tokens(i), toks[i])
    np.testing.assert_array_equal(r.features["txt"].pooled_all(), pooled)
    np.testing.assert_array_equal(r.features["img"].regions_rows([3, 17]), regions[[3, 17]])
    rep = verify_store(r)
    assert rep.ok, rep.problems
    res = runner.invoke(es_app, ["info", url, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["features"]["img"]["status"] == "complete"


def test_file_url_and_plain_path_open_the_same_store(small_store):
    url = "file://" + os.path.abspath(small_store.url)
    s = es.open_store(url)
    assert list(s.features) == ["img", "txt"]
    np.testing.assert_array_equal(s.features["txt"].tokens(9), small_store.expected["tokens"][9])
    res = runner.invoke(es_app, ["verify", url])
    assert res.exit_code == 0 and "OK" in res.output


@pytest.fixture
def http_root(tmp_path):
    """A plain static HTTP server (no listing API, no writes) over ``tmp_path``."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_store_is_readable_and_read_only(small_store, http_root):
    url = f"{http_root}/small.zarr"
    s = es.open_store(url)
    assert sorted(s.features) == ["img", "txt"] and s.n_items == 50
    np.testing.assert_array_equal(s.features["img"].regions(4), small_store.expected["regions"][4])
    res = runner.invoke(es_app, ["info", url, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["features"]["txt"]["n_done"] == 50
    with pytest.raises(es.InvalidInputError, match=r"is read-only \(http:// cannot be written\)"):
        es.open_store(url, mode="r+")
    with pytest.raises(es.InvalidInputError, match="stores are read-only"):
        es.create_store(f"{http_root}/new.zarr", ["a", "b"])


def _spec_reader(base: str):
    """A reader written from docs/format.md alone: HTTP GETs, JSON, zstd / Blosc, CRC-32C,
    numpy. No zarr, no fsspec (what a team using another language would write)."""
    import struct
    import urllib.request

    import google_crc32c
    from numcodecs import Blosc, Zstd

    def get(key: str) -> bytes:
        with urllib.request.urlopen(f"{base}/{key}") as r:
            return r.read()

    root = json.loads(get("zarr.json"))
    nodes = root["consolidated_metadata"]["metadata"]

    def array(path: str) -> np.ndarray:
        meta = nodes[path]
        shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        parts = []
        for c in range(-(-shape[0] // chunk[0])):
            raw = get(f"{path}/c/{c}" + "/0" * (len(shape) - 1))
            body, crc = raw[:-4], raw[-4:]
            assert struct.unpack("<I", crc)[0] == google_crc32c.value(body), path
            comp = meta["codecs"][-2]["name"]  # the compressor before the crc32c
            data = (Blosc() if comp == "blosc" else Zstd()).decode(body)
            if meta["data_type"] == "string":
                n, pos, items = struct.unpack_from("<I", data)[0], 4, []
                for _ in range(n):
                    size = struct.unpack_from("<I", data, pos)[0]
                    items.append(bytes(data[pos + 4 : pos + 4 + size]).decode())
                    pos += 4 + size
                parts.append(np.array(items, dtype=object))
            else:
                parts.append(np.frombuffer(data, dtype="<" + np.dtype(meta["data_type"]).str[1:])
                             .reshape(chunk))
        return np.concatenate(parts)[: shape[0]]

    return root["attributes"]["embedstore"], nodes, array


def test_a_reader_written_from_the_spec_alone_reads_the_store(small_store, http_root):
    meta, nodes, array = _spec_reader(f"{http_root}/small.zarr")
    assert meta["format"] == 1 and meta["n_items"] == 50
    names = sorted(k.split("/")[1] for k in nodes if k.count("/") == 1
                   and k.startswith("features/") and not k.split("/")[1].startswith("."))
    assert names == ["img", "txt"]
    txt = nodes["features/txt"]["attributes"]["embedstore"]
    assert txt["status"] == "complete" and txt["layers"] == [5, 6]
    assert array("ids")[:2].tolist() == ["item-000", "item-001"]
    off, ln, tok = (array(f"features/txt/{a}") for a in ("offsets", "lengths", "tokens"))
    for i in (0, 9, 16, 33, 49):  # rows on both sides of block boundaries (16 rows a block)
        np.testing.assert_array_equal(tok[off[i] : off[i] + ln[i]],
                                      small_store.expected["tokens"][i])
    np.testing.assert_array_equal(array("features/img/regions"), small_store.expected["regions"])
    assert array("features/img/done").all() and (array("features/txt/errors") == "").all()


def test_unreachable_object_store_is_one_line_exit_2(monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    res = runner.invoke(es_app, ["info", "s3://bucket/x.zarr", "-S",
                                 "endpoint_url=http://127.0.0.1:9", "-S",
                                 "config_kwargs.retries.max_attempts=1"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot reach 's3://bucket/x.zarr': EndpointConnectionError" in (
        lines[0]), res.output


# -- S3 (moto) ----------------------------------------------------------------------------------


@pytest.mark.remote
def test_s3_store_from_extract_serves_info_verify_and_fusion_train(s3_server, make_catalog,
                                                                   tmp_path):
    from cli.fusion_app import app as fusion_app

    cat = make_catalog(40)
    url = f"s3://{s3_server.new_bucket()}/cat.zarr"
    so = s3_server.cli_options
    res = runner.invoke(es_app, ["extract", str(cat), "--store", url, "--text", minilm_spec(),
                                 "--image", "timm:vit_tiny_patch16_224@random", "--image-size",
                                 "32", "--text-name", "minilm", "--image-name", "vit",
                                 "--block-rows", "16", "--device", "cpu", "-q", *so])
    assert res.exit_code == 0, res.output
    res = runner.invoke(es_app, ["info", url, "--json", *so])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["n_items"] == 40 and info["classes"] == ["kettle", "mug"]
    assert {k: (v["status"], v["n_done"]) for k, v in info["features"].items()} == {
        "minilm": ("complete", 40), "vit": ("complete", 40)}
    assert info["features"]["minilm"]["dim"] == 384
    res = runner.invoke(es_app, ["verify", url, *so])
    assert res.exit_code == 0 and "OK" in res.output, res.output
    out = tmp_path / "run"
    res = runner.invoke(fusion_app, ["train", "--store", url, *so, "--head", "concat",
                                     "--epochs", "2", "--folds", "2", "--device", "cpu", "-q",
                                     "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["macro_f1"] <= 1
    assert json.loads((out / "config.json").read_text())["store"]["url"] == url


@pytest.mark.remote
def test_opening_a_remote_store_costs_two_requests_whatever_its_size(s3_server, request):
    url = f"s3://{s3_server.new_bucket()}/count.zarr"
    so = s3_server.options
    s = es.create_store(url, [f"i{i}" for i in range(40)], ["a", "b"] * 20,
                        storage_options=so)
    fill_text(s, "t0", np.arange(40) % 5, block_rows=8)

    def cost(consolidated: bool = True) -> int:
        s3_server.requests.clear()
        if consolidated:
            r = es.open_store(url, storage_options=so)
            for name in r.features:  # list, and parse each set's metadata
                assert r.features[name].status == "complete"
        else:  # what opening costs without consolidated metadata: a walk of every node
            import zarr

            from embedstore._storage import zarr_store

            g = zarr.open_group(store=zarr_store(url, read_only=True, storage_options=so),
                                mode="r", use_consolidated=False, zarr_format=3)
            list(g.members(max_depth=None))
        return len(s3_server.requests)

    small = cost()
    for k in (1, 2, 3):
        fill_image(s, f"i{k}", block_rows=8)
    big, walk = cost(), cost(consolidated=False)
    request.node.user_properties += [("requests_open_1_set", small),
                                     ("requests_open_4_sets", big),
                                     ("requests_walk_4_sets", walk)]
    print(f"S3 requests to open: 1 set {small}, 4 sets {big}; without consolidated "
          f"metadata {walk}")
    assert small == big == 2  # HEAD + GET of the root zarr.json
    assert walk > 10 * big


_APPENDER = textwrap.dedent("""
    import json, sys, numpy as np, embedstore as es
    url, so = sys.argv[1], json.loads(sys.argv[2])
    s = es.open_store(url, mode="r+", storage_options=so)
    rng = np.random.default_rng(5)
    regions = rng.standard_normal((s.n_items, 4, 6)).astype(np.float16)
    pooled = rng.standard_normal((s.n_items, 6)).astype(np.float32)
    w = s.create_feature("b", modality="image", dim=6, n_regions=4, block_rows=8,
                         attrs={"encoder": {"spec": "test:b"}})
    for blk in w.pending_blocks():
        a, e = w.block_range(blk)
        w.write_block(blk, regions=regions[a:e], pooled=pooled[a:e])
    print("complete" if w.finalize() else "partial", flush=True)
""")


@pytest.mark.remote
def test_a_second_process_reads_while_the_first_appends_a_feature_set(s3_server, tmp_path):
    url = f"s3://{s3_server.new_bucket()}/shared.zarr"
    so = s3_server.options
    s = es.create_store(url, [f"i{i}" for i in range(40)], ["a", "b"] * 20, storage_options=so)
    toks, _ = fill_text(s, "a", np.arange(40) % 7, block_rows=8)
    script = tmp_path / "append.py"
    script.write_text(_APPENDER)
    release = tmp_path / "go"
    env = {**os.environ, "EMBEDSTORE_TEST_PAUSE": "after_done:1",
           "EMBEDSTORE_TEST_RELEASE": str(release)}
    p = subprocess.Popen([sys.executable, str(script), url, json.dumps(so)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while "EMBEDSTORE_TEST_PAUSE after_done:1" not in p.stderr.readline():
            assert p.poll() is None and time.time() < deadline, p.stderr.read()
        # the writer is half-way through "b" (blocks 0-1 of 5 done); this process reads
        reader = es.open_store(url, storage_options=so)
        assert reader.features["b"].status == "writing" and reader.features["b"].n_done == 16
        with pytest.raises(es.FeatureIncompleteError, match="16/40 rows done.*--resume"):
            reader.loader(range(40), image="b")
        batch = next(iter(reader.loader(range(40), text="a", batch_size=40, max_ram=0)))
        for j in (0, 13, 39):
            n = int(batch["text_mask"][j].sum())
            np.testing.assert_array_equal(batch["text_tokens"][j, :n].numpy(),
                                          toks[j].astype(np.float32))
        rep = verify_store(reader)
        assert rep.ok and rep.checked["b"]["status"] == "writing", rep.problems
        release.touch()
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0 and out.strip() == "complete", err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    reader.refresh()
    assert reader.features["b"].status == "complete" and reader.features["b"].n_done == 40
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(reader.features["b"].regions(33),
                                  rng.standard_normal((40, 4, 6)).astype(np.float16)[33])
    np.testing.assert_array_equal(reader.features["a"].tokens(13), toks[13])
    assert verify_store(reader).ok
