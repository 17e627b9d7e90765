"""Faults and bad input, each with what the user sees (one line, an exit code) and proof that no
finished data was lost: SIGKILL at three points then --resume, disk full, permission denied, the
S3 server going away, broken catalog rows, unusable catalogs, damaged stores.

docs/reliability.md lists every case with the test that covers it. The extractions use the real
all-MiniLM-L6-v2 (shipped in a PyPI package) on a 40-item catalog, 5 blocks of 8 rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from transformers import AutoTokenizer
from typer.testing import CliRunner

import embedstore as es
from cli.embedstore_app import app
from embedstore.catalog import read_catalog

from .conftest import minilm_spec, write_tiny_catalog

runner = CliRunner()
NAME = "minilm"
ARRAYS = ("tokens", "offsets", "lengths", "pooled", "done", "errors")
VOLATILE = {"created", "finished", "generation", "timings"}
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def extract_args(catalog, store, *extra) -> list[str]:
    return ["extract", str(catalog), "--store", str(store), "--text", minilm_spec(),
            "--text-name", NAME, "--block-rows", "8", "--device", "cpu", "-q", *extra]


def snapshot(url: str, so: dict | None = None) -> dict:
    fs = es.open_store(url, storage_options=so).features[NAME]
    meta = {k: v for k, v in fs.meta.items() if k not in VOLATILE}
    return {"meta": meta, **{k: np.asarray(fs.group[k][:]).tobytes() for k in ARRAYS}}


def done_rows(url: str, so: dict | None = None) -> np.ndarray:
    g = es.open_store(url, storage_options=so).location.open_group(f"features/{NAME}")
    return np.asarray(g["done"][:], dtype=bool)


def one_error_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The catalog and an uninterrupted extraction of it: what every faulty run must end as."""
    root = tmp_path_factory.mktemp("ref")
    cat = write_tiny_catalog(root, n=40, size=32)
    url = str(root / "ref.zarr")
    res = runner.invoke(app, extract_args(cat, url))
    assert res.exit_code == 0, res.output
    return cat, snapshot(url)


def assert_finished_rows_kept(url: str, before: np.ndarray, ref: dict, so=None) -> None:
    """Rows done before a fault are still done and hold the reference's bytes."""
    fs = es.open_store(url, storage_options=so).features[NAME]
    g = fs.store.location.open_group(fs.group.path)
    done = np.asarray(g["done"][:], dtype=bool)
    assert done[before].all()
    off = np.frombuffer(ref["offsets"], np.int64)
    ln = np.frombuffer(ref["lengths"], np.int32)
    ref_tok = np.frombuffer(ref["tokens"], np.float16)
    tok = np.asarray(g["tokens"][:]).reshape(-1)
    width = g["tokens"].shape[1] * g["tokens"].shape[2]
    for r in np.flatnonzero(before):
        a, b = off[r] * width, (off[r] + ln[r]) * width
        np.testing.assert_array_equal(tok[a:b], ref_tok[a:b])


# -- SIGKILL at three points, then --resume --------------------------------------------------


def test_sigkill_while_encoding_writing_and_finalising_then_resume_equals_uninterrupted(
        reference, tmp_path):
    cat, ref = reference
    url = str(tmp_path / "killed.zarr")

    def killed_at(point: str, *extra: str) -> None:
        env = {**ENV, "EMBEDSTORE_TEST_PAUSE": point,
               "EMBEDSTORE_TEST_RELEASE": str(tmp_path / "never")}
        p = subprocess.Popen([str(BIN / "embedstore"), *extract_args(cat, url, *extra)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while f"EMBEDSTORE_TEST_PAUSE {point}" not in p.stderr.readline():
            assert p.poll() is None and time.time() < deadline, p.stderr.read()
        p.send_signal(signal.SIGKILL)
        p.wait()

    # 1. blocks 0-1 written and marked done; the encoder is busy with the next blocks
    killed_at("after_done:1")
    first = done_rows(url)
    assert first.sum() == 16 and first[:16].all()
    assert es.open_store(url).features[NAME].status == "writing"
    assert_finished_rows_kept(url, first, ref)
    # 2. block 3's chunks written, its rows not yet marked done
    killed_at("after_data:3", "--resume")
    second = done_rows(url)
    assert second.sum() == 24 and second[first].all() and not second[24:32].any()
    assert_finished_rows_kept(url, second, ref)
    # 3. every row done, status written, the consolidated metadata not yet rewritten
    killed_at("finalize", "--resume")
    assert done_rows(url).all()
    res = runner.invoke(app, extract_args(cat, url, "--resume"))
    assert res.exit_code == 0, res.output
    assert snapshot(url) == ref
    assert es.open_store(url).features[NAME].status == "complete"
    assert runner.invoke(app, ["verify", url]).exit_code == 0


def test_store_creation_killed_is_not_a_store_and_creating_it_again_finishes_it(tmp_path):
    url = tmp_path / "new.zarr"
    code = ("import embedstore as es, sys; "
            "es.create_store(sys.argv[1], ['a', 'b', 'c', 'd'], ['x', 'y', 'x', 'y'], folds=2)")
    env = {**ENV, "EMBEDSTORE_TEST_PAUSE": "store_arrays",
           "EMBEDSTORE_TEST_RELEASE": str(tmp_path / "never")}
    p = subprocess.Popen([sys.executable, "-c", code, str(url)], env=env, text=True,
                         stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while "EMBEDSTORE_TEST_PAUSE store_arrays" not in p.stderr.readline():
        assert p.poll() is None and time.time() < deadline, p.stderr.read()
    p.send_signal(signal.SIGKILL)
    p.wait()
    res = runner.invoke(app, ["info", str(url)])
    assert res.exit_code == 2
    assert "is not finished: its creation is running in another process or was interrupted" in (
        one_error_line(res.output))
    with pytest.raises(es.StoreExistsError, match="another store is being created"):
        es.create_store(url, ["a", "b"], folds=2, holdout=0)
    s = es.create_store(url, ["a", "b", "c", "d"], ["x", "y", "x", "y"], folds=2)
    assert es.open_store(url).ids.tolist() == ["a", "b", "c", "d"] and s.classes == ["x", "y"]


# -- storage faults mid-run: disk full, permission denied, server gone ------------------------


@contextlib.contextmanager
def paused_after_block(store_dir_probe, inject) -> None:
    """Run the body (an in-process extraction) with the writer held after block 1 is done;
    meanwhile a watcher waits for that, calls ``inject()`` (the fault), then lets it go on."""
    release = Path(os.environ["EMBEDSTORE_TEST_RELEASE"])
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            deadline = time.time() + 120
            while not store_dir_probe() and time.time() < deadline:
                time.sleep(0.05)
            inject()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            release.touch()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield
    finally:
        t.join(timeout=130)
    assert not errors, errors


@pytest.fixture
def pause_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDSTORE_TEST_PAUSE", "after_done:1")
    monkeypatch.setenv("EMBEDSTORE_TEST_RELEASE", str(tmp_path / "release"))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root); elsewhere a per-file size limit (EFBIG) plays the full disk."""
    d = tmp_path / "disk"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                             capture_output=True).returncode == 0
    state = {"filler": d / "filler", "limit": None}
    if not mounted:  # writes past the limit must fail with EFBIG, not kill the process
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def fill() -> None:
        if mounted:
            with open(state["filler"], "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        else:
            state["limit"] = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, state["limit"][1]))

    def free() -> None:
        if mounted:
            state["filler"].unlink(missing_ok=True)
        elif state["limit"] is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, state["limit"])
            state["limit"] = None

    yield d, fill, free
    if mounted:
        subprocess.run(["umount", str(d)], check=False)
    else:
        free()
        signal.signal(signal.SIGXFSZ, old_handler)


def test_disk_full_mid_run_is_one_clear_error_and_resume_completes(reference, small_disk,
                                                                   pause_env):
    cat, ref = reference
    disk, fill, free = small_disk
    url = str(disk / "s.zarr")
    probe = Path(url, "features", NAME, "done", "c", "1").exists
    with paused_after_block(probe, fill):
        res = runner.invoke(app, extract_args(cat, url))
    free()
    assert res.exit_code == 2
    line = one_error_line(res.output)
    assert f"cannot write feature set '{NAME}' (block 2, rows 16..23)" in line
    assert ("No space left on device" in line or "File too large" in line) and "--resume" in line
    assert_finished_rows_kept(url, np.arange(40) < 16, ref)
    os.environ.pop("EMBEDSTORE_TEST_PAUSE")
    res = runner.invoke(app, extract_args(cat, url, "--resume"))
    assert res.exit_code == 0, res.output
    assert snapshot(url) == ref


def test_write_permission_denied_mid_run_is_one_clear_error_and_resume_completes(
        reference, tmp_path, pause_env):
    cat, ref = reference
    url = tmp_path / "perm.zarr"
    chunk_dirs = [url / "features" / NAME / a / "c" for a in ("tokens", "pooled", "errors",
                                                               "done")]
    root = os.geteuid() == 0  # root ignores modes: make the directories immutable instead

    def lock(on: bool) -> None:
        for d in chunk_dirs:
            if root:
                subprocess.run(["chattr", "+i" if on else "-i", str(d)], check=True)
            else:
                d.chmod(0o555 if on else 0o755)

    probe = (url / "features" / NAME / "done" / "c" / "1").exists
    try:
        with paused_after_block(probe, lambda: lock(True)):
            res = runner.invoke(app, extract_args(cat, url))
    finally:
        lock(False)
    assert res.exit_code == 2
    line = one_error_line(res.output)
    assert f"cannot write feature set '{NAME}' (block 2, rows 16..23)" in line
    assert "PermissionError" in line and "--resume" in line
    assert_finished_rows_kept(str(url), np.arange(40) < 16, ref)
    os.environ.pop("EMBEDSTORE_TEST_PAUSE")
    res = runner.invoke(app, extract_args(cat, url, "--resume"))
    assert res.exit_code == 0, res.output
    assert snapshot(str(url)) == ref


@pytest.mark.remote
def test_s3_server_stopped_mid_run_is_one_clear_error_and_resume_completes(
        reference, s3_server, pause_env):
    import s3fs

    cat, ref = reference
    bucket = s3_server.new_bucket()
    url, so = f"s3://{bucket}/s.zarr", s3_server.options
    # fail fast once the server is gone: one botocore attempt, short connect timeout
    opts = [*s3_server.cli_options, "-S", "config_kwargs.retries.max_attempts=1",
            "-S", "config_kwargs.connect_timeout=1"]
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, skip_instance_cache=True,
                           use_listings_cache=False)
    probe = lambda: fs.exists(f"{bucket}/s.zarr/features/{NAME}/done/c/1")  # noqa: E731
    try:
        with paused_after_block(probe, s3_server.stop):
            res = runner.invoke(app, extract_args(cat, url, *opts))
    finally:
        s3_server.start()  # same port, same buckets: the outage is over
    assert res.exit_code == 2
    line = one_error_line(res.output)
    assert f"cannot write feature set '{NAME}' (block 2, rows 16..23)" in line
    assert "Could not connect to the endpoint URL" in line and "--resume" in line
    assert_finished_rows_kept(url, np.arange(40) < 16, ref, so)
    os.environ.pop("EMBEDSTORE_TEST_PAUSE")
    res = runner.invoke(app, extract_args(cat, url, "--resume", *opts))
    assert res.exit_code == 0, res.output
    assert snapshot(url, so) == ref


# -- catalog faults -------------------------------------------------------------------------


def _png_then(data: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + data


def _jpeg_header() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()[:40]  # a JPEG cut after its header


def test_bad_catalog_rows_are_recorded_per_row_and_every_good_row_is_kept(make_catalog,
                                                                          tmp_path):
    images = {1: _png_then(b"\x00garbage" * 8), 2: _jpeg_header(), 3: b"", 4: "missing"}
    texts = {5: "", 6: "<p><br/></p>&nbsp;<div></div>", 7: "word " * 20000,
             8: "caf\udce9 cr\udce8me \udcff"}  # raw bytes 0xe9 0xe8 0xff: not UTF-8
    cat = make_catalog(40, images=images, texts=texts)
    url = tmp_path / "bad.zarr"
    res = runner.invoke(app, ["extract", str(cat), "--store", str(url), "--text", minilm_spec(),
                              "--text-name", NAME, "--image", "timm:vit_tiny_patch16_224@random",
                              "--image-size", "32", "--image-name", "vit", "--block-rows", "8",
                              "--device", "cpu", "-q"])
    # 4/40 image rows failed: above the default --max-error-rate 1%: exit 1; the 2 empty
    # texts are absent in the catalog (presence 0), not failures
    assert res.exit_code == 1, res.output
    line = one_error_line(res.output)
    assert "'minilm'" not in line and "'vit'" in line and "rows failed" in line
    assert "finished rows are kept" in line
    s = es.open_store(url)
    img, txt = s.features["vit"], s.features[NAME]
    assert img.status == txt.status == "complete" and img.n_done == txt.n_done == 40
    errs = img.errors()
    assert sorted(errs) == [1, 2, 3, 4]
    assert "corrupt or truncated" in errs[1] and "corrupt or truncated" in errs[2]
    assert "is empty (0 bytes)" in errs[3] and "does-not-exist.png' not found" in errs[4]
    assert sorted(txt.errors()) == [5, 6] and "empty text" in txt.errors()[5]
    lengths = txt.lengths()
    assert lengths[7] == 256  # truncated to --max-length
    # each invalid byte is one U+FFFD, in place, and the stored tokens are those of that text
    decoded = read_catalog(cat, need_image=False).texts[8]
    assert decoded == "caf\ufffd cr\ufffdme \ufffd"
    tokenizer = AutoTokenizer.from_pretrained(minilm_spec().removeprefix("hf:"))
    assert lengths[8] == len(tokenizer(decoded)["input_ids"])
    good = np.setdiff1d(np.arange(40), [1, 2, 3, 4])
    pooled = img.pooled_rows(good)
    assert np.isfinite(pooled).all() and (np.abs(pooled).sum(1) > 0).all()
    assert (np.abs(txt.pooled_rows(np.setdiff1d(np.arange(40), [5, 6]))).sum(1) > 0).all()
    res = runner.invoke(app, ["verify", str(url)])
    assert res.exit_code == 0, res.output


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("fault,message", [
    ("duplicate ids", r"duplicate ids \['p001'\]"),
    ("NaN labels", r"2 rows have no label \(first: \['p003', 'p004'\]\)"),
    ("one class", r"label column 'label' has a single class 'mug'"),
    ("mixed id types", r"id column 'id' mixes types \(int, str\)"),
])
def test_unusable_catalog_is_refused_in_one_line_and_the_store_is_untouched(
        fault, message, make_catalog, small_store, tmp_path):
    if fault == "duplicate ids":
        cat = make_catalog(6, ids={2: "p001"})
    elif fault == "NaN labels":
        cat = make_catalog(6, labels={3: "", 4: ""})
    elif fault == "one class":
        cat = make_catalog(6, labels={i: "mug" for i in range(6)})
    else:
        cat = tmp_path / "mixed.jsonl"
        rows = [{"id": 1, "title": "a", "description": "", "image": "", "label": "x"},
                {"id": "2", "title": "b", "description": "", "image": "", "label": "y"}]
        cat.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    before = _tree_digest(Path(small_store.url))
    res = runner.invoke(app, ["extract", str(cat), "--store", small_store.url, "--text",
                              minilm_spec(), "--text-name", "new", "-q"])
    assert res.exit_code == 2
    assert re.search(message, one_error_line(res.output)), res.output
    assert _tree_digest(Path(small_store.url)) == before


# -- store faults ---------------------------------------------------------------------------


def test_every_array_is_checksummed_and_a_flipped_byte_names_array_and_chunk(small_store):
    root = json.loads(Path(small_store.url, "zarr.json").read_text())
    arrays = {k: m for k, m in root["consolidated_metadata"]["metadata"].items()
              if m["node_type"] == "array"}
    assert {"ids", "labels", "folds", "features/txt/offsets", "features/img/done"} <= set(arrays)
    for path, meta in arrays.items():  # float arrays: Blosc-LZ4 by default (docs/format.md §6)
        comp = "blosc" if meta["data_type"] in ("float16", "float32") else "zstd"
        assert [c["name"] for c in meta["codecs"]][-2:] == [comp, "crc32c"], path
    f = _chunk(small_store.url, "folds", 0)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(es.StoreCorruptError, match=r"array 'folds', chunk 0 \(key 'folds/c/0', "
                       r"rows 0..49\) cannot be decoded: ValueError: Stored and computed checksum"):
        es.open_store(small_store.url).folds  # noqa: B018


def _chunk(url: str, array: str, index: int) -> Path:
    p = Path(url, *array.split("/"), "c", str(index))
    return p if p.is_file() else next(q for q in sorted(p.rglob("*")) if q.is_file())


def _damage(fault: str, url: str) -> None:
    if fault == "truncated chunk":
        f = _chunk(url, "features/img/regions", 2)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif fault == "deleted offsets":
        shutil.rmtree(Path(url, "features", "txt", "offsets"))
    elif fault == "attr of wrong type":
        f = Path(url, "features", "img", "zarr.json")
        doc = json.loads(f.read_text())
        doc["attributes"]["embedstore"]["dim"] = "6"
        f.write_text(json.dumps(doc))
        zarr.consolidate_metadata(zarr.storage.LocalStore(url), zarr_format=3)
    elif fault in ("format 3", "manifest short"):
        f = Path(url, "zarr.json")
        doc = json.loads(f.read_text())
        meta = doc["attributes"]["embedstore"]
        if fault == "format 3":
            meta["format"] = 3
        else:  # format 2 whose segments cover fewer rows than n_items
            meta.update(format=2, segments=[{"id": 0, "start": 0, "n_items": 3}])
        doc.pop("consolidated_metadata", None)
        f.write_text(json.dumps(doc))
    elif fault == "complete but data missing":
        _chunk(url, "features/img/pooled", 1).unlink()


@pytest.mark.parametrize("fault,verify_line,read_error", [
    ("truncated chunk", "features/img/regions: chunk 2 (rows 32..47) unreadable",
     r"array 'features/img/regions', chunk 2 \(key 'features/img/regions/c/2/0/0', rows "
     r"32..47\) cannot be decoded: ValueError: Stored and computed checksum do not match"),
    ("deleted offsets", "features/txt/offsets: chunk 0 (rows 0..50) missing",
     r"chunk 'features/txt/offsets/c/0' of array 'features/txt/offsets' is missing"),
    ("attr of wrong type", "feature set 'img': field 'dim' must be int, found str '6'",
     r"feature set 'img': field 'dim' must be int, found str '6'"),
    ("format 3", None, r"has format 3, newer than this embedstore understands"),
    ("manifest short", None, r"segments cover 3 rows from id 0, n_items is \d+; the store's "
                             r"manifest is damaged"),
    ("complete but data missing", "features/img/pooled: chunk 1 (rows 16..31) missing",
     r"chunk 'features/img/pooled/c/1/0' of array 'features/img/pooled' is missing"),
])
def test_damaged_store_is_reported_and_the_intact_data_still_reads(fault, verify_line,
                                                                  read_error, small_store):
    url = small_store.url
    exp = small_store.expected
    _damage(fault, url)
    res = runner.invoke(app, ["verify", url])
    if verify_line is None:  # the store cannot even be opened: one line, exit 2
        assert res.exit_code == 2 and re.search(read_error, one_error_line(res.output))
        return
    assert res.exit_code == 1 and verify_line in res.output, res.output
    if fault == "complete but data missing":  # --fast lists the chunks, reads none
        assert runner.invoke(app, ["verify", url, "--fast"]).exit_code == 1
    damaged = "txt" if fault == "deleted offsets" else "img"
    with pytest.raises(es.EmbedStoreError, match=read_error):  # what a training run gets
        kw = {"text": "txt"} if damaged == "txt" else {"image": "img"}
        list(es.open_store(url).loader(range(50), **kw))
    s = es.open_store(url)  # nothing else was lost
    if damaged == "img":
        np.testing.assert_array_equal(s.features["txt"].tokens(33), exp["tokens"][33])
        if fault != "attr of wrong type":
            ok_rows = [0, 5, 15] if fault == "complete but data missing" else [0, 17, 31]
            np.testing.assert_array_equal(s.features["img"].regions_rows(ok_rows),
                                          exp["regions"][ok_rows])
    else:
        np.testing.assert_array_equal(s.features["img"].regions(33), exp["regions"][33])
        np.testing.assert_array_equal(s.features["txt"].pooled_all(), exp["text_pooled"])


def test_training_on_a_damaged_store_stops_with_one_line_naming_the_chunk(small_store, tmp_path):
    from cli.fusion_app import app as fusion_app

    f = _chunk(small_store.url, "features/img/pooled", 1)
    f.write_bytes(f.read_bytes()[:-3])
    res = runner.invoke(fusion_app, ["train", "--store", small_store.url, "--head", "concat",
                                     "--epochs", "1", "--folds", "1", "--device", "cpu", "-q",
                                     "--out", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert re.search(r"array 'features/img/pooled', chunk 1 \(key 'features/img/pooled/c/1/0', "
                     r"rows 16..31\) cannot be decoded", one_error_line(res.output)), res.output
