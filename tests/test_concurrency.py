"""Several processes on one store: disjoint block writers, racing creators, readers of a set that
is being replaced, writers consolidating metadata at the same time. Local disk and S3 (moto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

import embedstore as es
from embedstore.verify import verify_store

N_ITEMS = 52  # 7 blocks of 8, the last one partial

# One script for every role; rows' data depend only on (seed, row), never on who writes them.
_WORKER = textwrap.dedent("""
    import json, sys, numpy as np, embedstore as es
    args = json.loads(sys.argv[1])
    so = args.get("so")
    s = es.open_store(args["url"], mode="r+", storage_options=so)
    n, seed, name = s.n_items, args.get("seed", 0), args["name"]
    lengths = (np.arange(n) * 7) % 13
    def rows(a, e):
        toks, pooled = [], np.zeros((e - a, 8), np.float32)
        for r in range(a, e):
            rng = np.random.default_rng([seed, r])
            toks.append(rng.standard_normal((int(lengths[r]), 2, 8)).astype(np.float16))
            pooled[r - a] = rng.standard_normal(8)
        return toks, pooled
    if args["role"] == "create":
        try:
            w = s.create_feature(name, modality="text", dim=8, lengths=lengths, layers=[1, 2],
                                 block_rows=8, overwrite=args.get("overwrite", False),
                                 attrs={"encoder": {"spec": f"test:{seed}"}})
        except es.EmbedStoreError as e:
            print("LOST", type(e).__name__, e, flush=True)
            sys.exit(3)
        print("WON", flush=True)
    else:
        w = s.feature_writer(name)
    rank, world = args.get("rank", 0), args.get("world", 1)
    for b in w.pending_blocks():
        if b % world == rank:
            a, e = w.block_range(b)
            toks, pooled = rows(a, e)
            w.write_block(b, tokens=toks, pooled=pooled)
    print("COMPLETE" if w.finalize() else "PARTIAL", flush=True)
""")


@pytest.fixture
def worker(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs: list[subprocess.Popen] = []

    def start(env_extra: dict | None = None, **args) -> subprocess.Popen:
        env = {**os.environ, **(env_extra or {})}
        p = subprocess.Popen([sys.executable, str(script), json.dumps(args)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _inline(**args) -> None:
    """Run the worker script in this process (a reference run; no interpreter start-up)."""
    saved = sys.argv
    sys.argv = ["worker", json.dumps(args)]
    try:
        exec(compile(_WORKER, "worker", "exec"), {"__name__": "worker"})
    finally:
        sys.argv = saved


def _wait_paused(procs, point: str, timeout: float = 90) -> None:
    """Block until every process printed its test-pause marker for ``point``."""
    deadline = time.time() + timeout
    for p in procs:
        while True:
            line = p.stderr.readline()
            if f"EMBEDSTORE_TEST_PAUSE {point}" in line:
                break
            if not line and p.poll() is not None:
                raise AssertionError(f"worker exited early: {p.stderr.read()}")
            if time.time() > deadline:
                raise AssertionError(f"worker did not reach {point}")


def _arrays(url: str, name: str, so=None) -> dict[str, bytes]:
    s = es.open_store(url, storage_options=so)
    g = s.features[name].group
    return {k: np.asarray(g[k][:]).tobytes() for k in ("tokens", "offsets", "lengths", "pooled",
                                                         "done", "errors")}


def _location(kind: str, tmp_path, request, leaf: str) -> tuple[str, dict | None]:
    if kind == "local":
        return str(tmp_path / leaf), None
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.new_bucket()}/{leaf}", server.options


KINDS = ["local", pytest.param("s3", marks=pytest.mark.remote)]


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_filling_disjoint_blocks_equal_the_single_writer_result(
        kind, tmp_path, request, worker):
    ids = [f"id{i}" for i in range(N_ITEMS)]
    url, so = _location(kind, tmp_path, request, "two.zarr")
    ref, _ = _location(kind, tmp_path, request, "one.zarr")
    for u in (url, ref):
        es.create_store(u, ids, folds=2, holdout=0, storage_options=so)
    _inline(url=ref, so=so, name="t", role="create")  # the single writer
    # rank 0's job under torchrun: create the set, then every rank fills its own blocks
    first = worker(url=url, so=so, name="t", role="create", world=2, rank=0)
    assert first.stdout.readline().strip() == "WON"
    second = worker(url=url, so=so, name="t", role="join", world=2, rank=1)
    outs = [first.communicate(timeout=60), second.communicate(timeout=60)]
    assert first.returncode == 0 and second.returncode == 0, outs
    assert "COMPLETE" in outs[0][0] + outs[1][0]
    assert _arrays(url, "t", so) == _arrays(ref, "t", so)
    s = es.open_store(url, storage_options=so)
    assert s.features["t"].status == "complete"
    assert verify_store(s).ok


@pytest.mark.parametrize("kind", KINDS)
def test_two_writers_creating_the_same_feature_set_one_wins_the_other_gets_a_clear_error(
        kind, tmp_path, request, worker):
    url, so = _location(kind, tmp_path, request, "race.zarr")
    es.create_store(url, [f"id{i}" for i in range(N_ITEMS)], folds=2, holdout=0,
                    storage_options=so)
    release = tmp_path / "go"
    env = {"EMBEDSTORE_TEST_PAUSE": "claim", "EMBEDSTORE_TEST_RELEASE": str(release)}
    # both have checked that the name is free and stand right before the exclusive create
    procs = [worker(env, url=url, so=so, name="t", role="create", seed=s) for s in (1, 2)]
    _wait_paused(procs, "claim")
    release.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], outs
    loser_out = next(o for p, o in zip(procs, outs, strict=True) if p.returncode == 3)[0]
    assert loser_out.startswith("LOST FeatureExistsError")
    assert "is being created by another writer" in loser_out
    winner_seed = next(s for p, s in zip(procs, (1, 2), strict=True) if p.returncode == 0)
    s = es.open_store(url, storage_options=so)
    fs = s.features["t"]
    assert fs.status == "complete" and fs.encoder["spec"] == f"test:{winner_seed}"
    rng = np.random.default_rng([winner_seed, 9])
    np.testing.assert_array_equal(fs.tokens(9), rng.standard_normal((63 % 13, 2, 8))
                                  .astype(np.float16))
    assert verify_store(s).ok


def test_reader_of_a_replaced_set_gets_a_clear_error_never_mixed_data(small_store):
    url = small_store.url
    old = small_store.expected["tokens"]
    streaming = es.open_store(url).features["txt"]  # reads block by block from storage
    np.testing.assert_array_equal(streaming.tokens(3), old[3])
    in_ram = es.open_store(url).features["txt"]
    assert in_ram.load()
    w = es.open_store(url, mode="r+").create_feature(
        "txt", modality="text", dim=8, lengths=np.full(50, 2), layers=[5, 6], block_rows=16,
        overwrite=True, attrs={"encoder": {"spec": "v2"}})
    with w:
        for b in w.pending_blocks():
            a, e = w.block_range(b)
            w.write_block(b, tokens=np.ones((2 * (e - a), 2, 8)), pooled=np.ones((e - a, 8)))
    with pytest.raises(es.FeatureChangedError, match=r"'txt' .* was replaced \(--overwrite\)"):
        streaming.tokens(4)
    np.testing.assert_array_equal(in_ram.tokens(4), old[4])  # RAM copy: old, consistent
    fresh = es.open_store(url).features["txt"]
    assert fresh.encoder["spec"] == "v2" and fresh.tokens(4).shape == (2, 2, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_overwrite_killed_mid_swap_never_shows_half_a_set_and_the_next_writer_finishes_it(
        kind, tmp_path, request, worker):
    url, so = _location(kind, tmp_path, request, "swap.zarr")
    es.create_store(url, [f"id{i}" for i in range(N_ITEMS)], folds=2, holdout=0,
                    storage_options=so)
    _inline(url=url, so=so, name="t", role="create", seed=1)
    before = es.open_store(url, storage_options=so).features["t"]
    old_tokens = before.tokens(9)
    env = {"EMBEDSTORE_TEST_PAUSE": "swap", "EMBEDSTORE_TEST_RELEASE": str(tmp_path / "never")}
    p = worker(env, url=url, so=so, name="t", role="create", seed=2, overwrite=True)
    _wait_paused([p], "swap")  # the old set is gone from its place, the new one not yet there
    changed = r"feature set 't' in .* was (removed|replaced \(--overwrite\)) after this reader"
    with pytest.raises(es.FeatureChangedError, match=changed):
        before.tokens(10)
    with pytest.raises(es.FeatureChangedError, match=changed):  # a fresh reader: never zeros
        es.open_store(url, storage_options=so).features["t"].tokens(10)
    p.send_signal(signal.SIGKILL)
    p.wait()
    es.open_store(url, mode="r+", storage_options=so)  # any writer finishes the swap
    after = es.open_store(url, storage_options=so).features["t"]
    assert after.status == "complete" and after.encoder["spec"] == "test:2"
    new_tokens = np.random.default_rng([2, 9]).standard_normal((63 % 13, 2, 8)).astype(np.float16)
    np.testing.assert_array_equal(after.tokens(9), new_tokens)
    assert not np.array_equal(old_tokens, new_tokens)
    assert verify_store(es.open_store(url, storage_options=so)).ok


def test_concurrent_writers_leave_consolidated_metadata_current(tmp_path, worker):
    url = str(tmp_path / "cons.zarr")
    es.create_store(url, [f"id{i}" for i in range(N_ITEMS)], folds=2, holdout=0)
    release = tmp_path / "go"
    env = {"EMBEDSTORE_TEST_PAUSE": "finalize", "EMBEDSTORE_TEST_RELEASE": str(release)}
    procs = [worker(env, url=url, name=name, role="create", seed=i)
             for i, name in enumerate(("a", "b"))]
    _wait_paused(procs, "finalize")  # both completed; both consolidate from here, together
    release.touch()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "COMPLETE" in out, err
    s = es.open_store(url)
    assert {n: s.features[n].status for n in s.features} == {"a": "complete", "b": "complete"}
    assert s.location.consolidated_is_current()


def test_stale_consolidated_metadata_is_reported_and_rewritten_by_the_next_writer(small_store):
    url = small_store.url
    g = zarr.open_group(url, mode="r+", path="features/img", use_consolidated=False)
    meta = dict(g.attrs["embedstore"])
    g.attrs["embedstore"] = {**meta, "note": "changed by a writer that died before consolidating"}
    rep = verify_store(es.open_store(url))
    assert not rep.ok and "consolidated metadata (root zarr.json) is out of date" in rep.problems[0]
    es.open_store(url, mode="r+")
    assert es.open_store(url).features["img"].meta["note"].startswith("changed")
    assert verify_store(es.open_store(url)).ok
