"""Galleries (#14): several images per item, from the catalog to the heads.

The catalog's image cell may list several paths (a list in JSONL/Parquet, ``|`` in CSV); such
a catalog is extracted into a gallery set (docs/format.md §2.6: images ragged per item, the
item's pooled vector the mean of its readable images); a one-image catalog writes exactly the
format-1 layout. The loader pads and masks an item's images; every built-in head is
invariant to the order of an item's images and to padding images.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import embedstore as es
import fusion
from cli.embedstore_app import app as es_app
from embedstore.catalog import IMAGE_SEP, read_catalog
from embedstore.errors import InvalidInputError
from embedstore.export import export_hdf5
from embedstore.extract import ExtractConfig, extract
from embedstore.extract.append import append
from embedstore.format import ABSENT, FAILED, IMAGE_ARRAYS, PRESENT
from embedstore.gallery import gallery_batch
from embedstore.info import store_info
from embedstore.provenance import catalog_from_feature
from embedstore.verify import verify_store
from fusion.batch import Batch
from fusion.bundle import export_bundle
from fusion.checks import check_head
from fusion.config import FinetuneConfig
from fusion.data import prepare
from fusion.finetune import finetune
from fusion.heads import create_head, list_heads, resolve_head
from fusion.heads.base import options_of
from fusion.live import Collate, RawRows, build_live_model
from fusion.metrics import by_availability
from fusion.predict import predict
from fusion.predictor import Predictor

from .conftest import fill_text

IMAGE = "timm:test_vit@random"
COUNTS = [1, 2, 3, 4, 0]  # images of item i: COUNTS[i % 5]


def _png(path, rng) -> None:
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(path)


def _gallery_catalog(root, n: int = 30, *, counts=COUNTS, fmt: str = "csv", bad=None,
                     order=None):
    """Item i lists ``counts[i % len(counts)]`` images; ``bad``: {item: [positions]} of paths
    that do not exist; ``order``: {item: permutation} of the listed paths. Returns the catalog
    path."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        paths = []
        for g in range(counts[i % len(counts)]):
            p = f"img/{i}_{g}.png"
            if g in (bad or {}).get(i, ()):
                p = f"img/missing_{i}_{g}.png"
            else:
                _png(root / p, rng)
            paths.append(p)
        if i in (order or {}):
            paths = [paths[j] for j in order[i]]
        rows.append({"id": f"p{i:03d}", "title": f"item {i} {['mug', 'kettle'][i % 2]}",
                     "description": "", "label": ["mug", "kettle"][i % 2],
                     "image": paths if fmt == "jsonl" else IMAGE_SEP.join(paths)})
    path = root / f"catalog.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


def _extract(cat, store, **kw):
    cfg = ExtractConfig(image=IMAGE, block_rows=8, batch_size=4, max_error_rate=0.5, **kw)
    return extract(cat, store, cfg)[0]


# --------------------------------------------------------------------------- the catalog


def test_catalog_reads_several_images_from_csv_and_jsonl_alike(tmp_path):
    a = read_catalog(_gallery_catalog(tmp_path / "c", fmt="csv"), need_text=False)
    b = read_catalog(_gallery_catalog(tmp_path / "j", fmt="jsonl"), need_text=False)
    assert a.gallery and b.gallery
    for cat, root in ((a, tmp_path / "c"), (b, tmp_path / "j")):
        assert [len(cat.image_paths(i)) for i in range(10)] == COUNTS * 2
        assert cat.images[0] == str((root / "img/0_0.png").resolve())  # one path: a string
        assert cat.images[3] == [str((root / f"img/3_{g}.png").resolve()) for g in range(4)]
        assert cat.images[4] is None


def test_catalog_with_one_image_per_item_reads_exactly_as_before(tmp_path):
    cat = read_catalog(_gallery_catalog(tmp_path, n=6, counts=[1], fmt="jsonl"), need_text=False)
    assert not cat.gallery
    assert all(isinstance(v, str) for v in cat.images)
    p = tmp_path / "e.csv"
    p.write_text("id,label,image\na,x,img/1.png| |img/2.png\nb,y, | \nc,x,img/3.png\n")
    cat = read_catalog(p, text_cols=None, need_text=False)
    assert cat.images[0] == [str(tmp_path / "img/1.png"), str(tmp_path / "img/2.png")]
    assert cat.images[1] is None and cat.images[2] == str(tmp_path / "img/3.png")


# --------------------------------------------------------------------------- the store


def test_gallery_set_stores_every_image_ragged_with_item_presence_and_mean_pooled(tmp_path):
    cat = _gallery_catalog(tmp_path, bad={7: [1], 13: [0, 1, 2, 3], 22: [0, 1, 2]})
    r = _extract(cat, tmp_path / "s.zarr")
    assert r.n_errors == 2 and r.n_absent == 6  # items 13, 22: every image failed
    store = es.open_store(tmp_path / "s.zarr")
    fs = store.features[r.name]
    assert fs.gallery and fs.meta["gallery"] is True
    n = fs.n_images()
    assert n.tolist() == [COUNTS[i % 5] for i in range(30)]
    pres = fs.presence()
    assert pres[4] == ABSENT and pres[13] == FAILED and pres[22] == FAILED and pres[7] == PRESENT
    assert fs.errors()[13].startswith("all 4 images failed")
    off, ok = fs.offsets(), fs.image_ok()
    assert not ok[off[7] + 1] and ok[off[7]] and ok[off[7] + 2]
    images = fs.regions_rows(np.arange(30))
    pooled_img = fs.read_array("image_pooled")
    for i in range(30):
        assert images[i].shape == (n[i], fs.n_regions, fs.dim)
        good = ok[off[i] : off[i] + n[i]]
        want = pooled_img[off[i] : off[i] + n[i]][good].mean(0) if good.any() else 0
        np.testing.assert_allclose(fs.pooled(i), want, rtol=1e-6, atol=1e-7)
    assert not images[7][1].any()  # a failed image keeps its slot, zeros
    # block alignment (§5 rules with the regions chunk): every block starts on a chunk
    rc = fs.group["regions"].chunks[0]
    assert all(off[b * 8] % rc == 0 for b in range(fs.n_blocks))
    assert verify_store(store).ok
    assert store_info(store)["features"][r.name]["gallery"] == {
        "images": int(n.sum()), "failed_images": 1 + 4 + 3, "max_per_item": 4}


def test_one_image_catalog_writes_the_format_1_layout_byte_for_byte(tmp_path):
    csv_cat = _gallery_catalog(tmp_path / "c", n=12, counts=[1])
    list_cat = _gallery_catalog(tmp_path / "j", n=12, counts=[1], fmt="jsonl")
    a = _extract(csv_cat, tmp_path / "a.zarr")
    b = _extract(list_cat, tmp_path / "b.zarr")
    fa = es.open_store(tmp_path / "a.zarr").features[a.name]
    fb = es.open_store(tmp_path / "b.zarr").features[b.name]
    assert "gallery" not in fa.meta and not fa.gallery
    assert set(fa.group.array_keys()) == set(IMAGE_ARRAYS) | {"presence"}
    for key in ("regions", "pooled", "errors", "presence", "done"):
        x, y = fa.read_array(key), fb.read_array(key)
        assert x.shape == y.shape and x.tobytes() == y.tobytes(), key
    # the gallery layout, forced, stores the same numbers per image
    g = _extract(csv_cat, tmp_path / "g.zarr", gallery=True)
    fg = es.open_store(tmp_path / "g.zarr").features[g.name]
    assert fg.gallery
    np.testing.assert_array_equal(np.stack(fg.regions_rows(np.arange(12)))[:, 0],
                                  fa.read_array("regions"))
    np.testing.assert_array_equal(fg.pooled_all(), fa.pooled_all())


def test_gallery_resume_rewrites_only_unfinished_blocks(tmp_path):
    cat = _gallery_catalog(tmp_path)
    r = _extract(cat, tmp_path / "s.zarr")
    store = es.open_store(tmp_path / "s.zarr", mode="r+")
    before = store.features[r.name].regions_rows(np.arange(30))
    w = store.feature_writer(r.name)  # un-finish block 1 as a crash after its data would
    w._warr("done")[8:16] = np.zeros(8, bool)
    w.group.attrs["embedstore"] = {**w.meta, "status": "writing"}
    store.consolidate()
    again = _extract(cat, tmp_path / "s.zarr", resume=True)
    assert again.n_encoded == 8
    fs = es.open_store(tmp_path / "s.zarr").features[r.name]
    assert fs.status == "complete"
    for x, y in zip(before, fs.regions_rows(np.arange(30)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_appending_to_a_store_with_a_gallery_is_refused_in_one_line(tmp_path):
    cat = _gallery_catalog(tmp_path / "a")
    r = _extract(cat, tmp_path / "s.zarr")
    new = _gallery_catalog(tmp_path / "b", n=5)
    text = new.read_text().replace("p00", "q00")
    new.write_text(text)
    with pytest.raises(InvalidInputError, match=f"{r.name!r}.*gallery.*cannot be appended"):
        append(new, tmp_path / "s.zarr")


def test_export_hdf5_keeps_the_gallery_arrays(tmp_path):
    h5py = pytest.importorskip("h5py")
    r = _extract(_gallery_catalog(tmp_path, n=10), tmp_path / "s.zarr")
    out = export_hdf5(es.open_store(tmp_path / "s.zarr"), tmp_path / "s.h5")
    with h5py.File(out) as h5:
        g = h5[f"features/{r.name}"]
        assert json.loads(g.attrs["embedstore"])["gallery"] is True
        assert g["n_images"][:].tolist() == [COUNTS[i % 5] for i in range(10)]


# --------------------------------------------------------------------------- the loader


def test_gallery_batch_puts_every_prefix_first_and_masks_padding_and_failed_images():
    r, d, p = 5, 3, 1
    a = np.arange(2 * r * d, dtype=np.float32).reshape(2, r, d) + 1
    out = gallery_batch([(a, np.array([True, False])), (a[:1], np.array([True]))], r, d, p)
    reg, mask = out["image_regions"], out["image_mask"]
    assert reg.shape == (2, 2 * r, d) and out["image_prefix"] == 2
    np.testing.assert_array_equal(reg[0, 0], a[0, 0])  # image 0's CLS, then image 1's
    np.testing.assert_array_equal(reg[0, 1], a[1, 0])
    np.testing.assert_array_equal(reg[0, 2 : 2 + r - p], a[0, p:])  # then the grids
    assert mask[0].tolist() == [True, False] + [True] * 4 + [False] * 4
    assert mask[1].tolist() == [True, False] + [True] * 4 + [False] * 4
    assert not reg[1, 1].any() and not reg[1, 6:].any()


def test_loader_gives_the_same_gallery_batches_from_ram_and_streaming(tmp_path):
    r = _extract(_gallery_catalog(tmp_path, bad={7: [1]}), tmp_path / "s.zarr")
    store = es.open_store(tmp_path / "s.zarr")
    rows = np.arange(30)
    ram = list(es.open_store(tmp_path / "s.zarr").loader(rows, image=r.name, batch_size=10))
    stream = list(store.loader(rows, image=r.name, batch_size=10, max_ram=0))
    assert not store.features[r.name].in_ram
    for x, y in zip(ram, stream, strict=True):
        for key in ("image_regions", "image_mask", "image_pooled", "image_present"):
            torch.testing.assert_close(x[key], y[key])
        assert x["image_prefix"] == y["image_prefix"]
    b = ram[0]
    assert b["image_regions"].shape[1] == 4 * store.features[r.name].n_regions  # G = 4
    assert b["image_prefix"] == 4 * store.features[r.name].prefix_tokens
    assert not b["image_mask"][4].any() and not b["image_present"][4]  # no image listed
    assert b["image_mask"][7].sum() == 2 * store.features[r.name].n_regions  # 3, one failed


def test_one_image_store_batches_have_no_image_mask(tmp_path):
    r = _extract(_gallery_catalog(tmp_path, n=8, counts=[1]), tmp_path / "s.zarr")
    b = next(iter(es.open_store(tmp_path / "s.zarr").loader(np.arange(8), image=r.name)))
    assert "image_mask" not in b and b["image_regions"].shape[0] == 8


# --------------------------------------------------------------------------- the heads


def _variants() -> list[tuple[str, dict]]:
    """Every built-in head, and those with a ``pool`` option again with attention pooling
    (so pooled-vector heads are checked where they read the regions too)."""
    out = []
    for name in list_heads():
        out.append((name, {}))
        if "pool" in options_of(resolve_head(name)):
            out.append((name, {"pool": "attention"}))
    return out


@pytest.mark.parametrize(("name", "opts"), _variants(), ids=lambda v: str(v))
def test_every_head_ignores_image_order_and_padding_images(name, opts):
    res = {r.name: r for r in check_head(name, options=opts)}
    assert res["image_order"].passed, res["image_order"].detail
    assert all(r.passed for r in res.values()), [r.detail for r in res.values() if not r.passed]


def test_a_gallery_items_prediction_does_not_depend_on_the_order_of_its_images(tmp_path):
    """Extracted twice, the second catalog listing item 3's four images (and item 8's four,
    one unreadable) in another order: every head predicts the same for every item."""
    stores = []
    for k, order in enumerate(({}, {3: [2, 0, 3, 1], 8: [3, 1, 0, 2]})):
        cat = _gallery_catalog(tmp_path / f"c{k}", n=10, bad={8: [1]}, order=order)
        r = _extract(cat, tmp_path / f"s{k}.zarr")
        store = es.open_store(tmp_path / f"s{k}.zarr", mode="r+")
        fill_text(store, "txt", 2 + np.arange(10) % 4)
        stores.append((store, r.name))
    fs = stores[0][0].features[stores[0][1]]
    assert fs.n_images()[3] == 4 and not fs.image_ok().all()
    batches = [Batch(**next(iter(s.loader(np.arange(10), text="txt", image=name,
                                          batch_size=10))))
               for s, name in stores]
    assert not torch.equal(batches[0].image_regions, batches[1].image_regions)  # reordered
    for head, opts in _variants():
        torch.manual_seed(0)
        model = create_head(head, text_dim=8, image_dim=fs.dim, num_classes=2, text_layers=2,
                            **opts).eval()
        with torch.no_grad():
            a, b = model(batches[0]), model(batches[1])
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"{head} {opts}")


# --------------------------------------------------------------------------- fine-tuning


def test_live_gallery_batches_equal_the_cached_ones_and_fine_tune(tmp_path):
    """The live path (fine-tuning) builds the cache's padded, masked gallery batch from the
    raw catalog: same regions (within fp16 storage), mask, prefix and pooled mean; an image
    that failed at extraction stays masked even when it can be read now. Then a 1-4-image store fine-tunes end to end."""
    cat = _gallery_catalog(tmp_path, n=20, bad={7: [1]})
    _extract(cat, tmp_path / "s.zarr", folds=2, holdout=0.25)
    _png(tmp_path / "img/missing_7_1.png", np.random.default_rng(5))  # readable now, not then
    store = es.open_store(tmp_path / "s.zarr")
    cfg = FinetuneConfig(batch_size=8, epochs=1, options={"pool": "attention"})
    s = prepare(store, "image", None, None, cfg)
    model = build_live_model(s, cfg, fusion.create_head("image", **s.dims, pool="attention"))
    model.eval()
    ie = model.encoders["image"]
    icat = catalog_from_feature(s.ifs, store)
    rows = np.array([2, 3, 4, 7, 8])  # 3, 4, 0 images; 3 with one failed; 4
    ds = RawRows(None, icat.images, ie.load_image, ie.input_shape, gallery=True)
    raw = Collate(None, s.labels, model.present, model.gallery)([ds[int(r)] for r in rows])
    with torch.no_grad():
        live = model.features(raw)
    cached = Batch(**next(iter(store.loader(rows, image=s.ifs.name, batch_size=5))))
    assert torch.equal(live.image_mask, cached.image_mask)
    assert live.image_prefix == cached.image_prefix
    assert torch.equal(live.image_present, cached.image_present)
    valid = cached.image_mask[..., None]  # a failed image's slot is never read (masked)
    torch.testing.assert_close(live.image_regions * valid, cached.image_regions * valid,
                               atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(live.image_pooled, cached.image_pooled, atol=1e-4, rtol=1e-4)
    run = finetune(store, "image", out=tmp_path / "ft", epochs=1, batch_size=8,
                   pool="attention", max_items=8)
    assert run.config["kind"] == "finetune" and len(run.metrics["folds"]) == 2


@pytest.mark.parametrize("pool", ["pooled", "attention"])
def test_a_gallery_bundle_predicts_lists_of_images_as_the_store_does(tmp_path, pool):
    """pooled: the mean of the readable images' vectors; attention: the masked regions."""
    cat = _gallery_catalog(tmp_path, n=20, bad={7: [1]})
    _extract(cat, tmp_path / "s.zarr", folds=2, holdout=0.25)
    store = es.open_store(tmp_path / "s.zarr")
    run = fusion.train(store, "image", out=tmp_path / "run", epochs=1, batch_size=8,
                       pool=pool, threads=1)
    p = Predictor.load(export_bundle(run.path, tmp_path / "model"), device="cpu")
    ids, live = p.predict_catalog(cat, batch_size=6)  # batches unlike the loader's
    cached = predict(run, store, ids=ids).probs
    np.testing.assert_allclose(live, cached, atol=1e-4)
    items = [{"image": catalog_from_feature(store.features[run.config["features"]["image"]
                                                           ["name"]], store).images[3]}]
    assert len(items[0]["image"]) == 4
    shuffled = [{"image": items[0]["image"][::-1]}]
    np.testing.assert_allclose(p.predict(shuffled), p.predict(items), atol=1e-6)
    np.testing.assert_allclose(p.predict(items), cached[3:4], atol=1e-4)


# --------------------------------------------------------------------------- metrics


def test_metrics_break_results_down_by_number_of_readable_images(tmp_path):
    y = np.array([0, 1, 0, 1, 0, 1])
    probs = np.eye(2)[[0, 1, 1, 1, 0, 0]]
    out = by_availability(y, probs, np.ones(6, bool), np.array([1, 2, 2, 0, 4, 5]))
    assert out["text_only"]["n"] == 1 and out["both"]["n"] == 5
    assert {k: v["n"] for k, v in out["by_images"].items()} == {"1": 1, "2": 2, "3": 0, "4+": 2}
    assert out["by_images"]["2"]["accuracy"] == 0.5
    assert "by_images" not in by_availability(y, probs, np.ones(6, bool), np.ones(6, bool))
    cat = _gallery_catalog(tmp_path, n=20, bad={7: [1], 13: [0, 1, 2, 3]})
    _extract(cat, tmp_path / "s.zarr", folds=2, holdout=0.25)
    run = fusion.train(es.open_store(tmp_path / "s.zarr"), "image", out=tmp_path / "run",
                       epochs=1, batch_size=8, threads=1)
    av = run.metrics["by_availability"]
    n_oof = sum(v["n"] for v in av["by_images"].values())
    assert n_oof == av["both"]["n"] + av["image_only"]["n"]
    assert av["holdout"]["by_images"]["4+"]["n"] + av["by_images"]["4+"]["n"] == 3  # 3, 8, 18


def test_sample_catalog_draws_one_to_four_images_per_item_seeded(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "make_catalog.py"
    spec = importlib.util.spec_from_file_location("make_catalog", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_catalog"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    make_catalog = mod.make_catalog
    one = make_catalog(tmp_path / "one", n=24, image_size=32)
    many = make_catalog(tmp_path / "many", n=24, image_size=32, images_per_item=(1, 4))
    again = make_catalog(tmp_path / "again", n=24, image_size=32, images_per_item=(1, 4))
    a, b = read_catalog(one), read_catalog(many)
    assert again.read_text() == many.read_text()  # seeded
    assert a.texts == b.texts and a.labels == b.labels
    counts = [len(b.image_paths(i)) for i in range(24)]
    assert set(counts) == {1, 2, 3, 4}
    for i in range(24):  # the first photo is the one-image catalog's
        assert open(b.image_paths(i)[0], "rb").read() == open(a.images[i], "rb").read()
    with pytest.raises(ValueError, match="A-B"):
        make_catalog(tmp_path / "bad", n=24, images_per_item=(3, 2))


def test_cli_gallery_flag_forces_the_gallery_layout(tmp_path):
    cat = _gallery_catalog(tmp_path, n=6, counts=[1])
    res = CliRunner().invoke(es_app, ["extract", str(cat), "--store", str(tmp_path / "s.zarr"),
                                   "--image", IMAGE, "--gallery", "--label-col", ""])
    assert res.exit_code == 0, res.output
    fs = es.open_store(tmp_path / "s.zarr").features["test-vit"]
    assert fs.gallery and fs.n_images().tolist() == [1] * 6
