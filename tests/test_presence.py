"""Presence (#14): items with no image or no text, from the store to the heads.

The store's ``presence`` (1 present, 0 absent in the catalog, 2 failed), derived for older sets;
extraction counts only failures against --max-error-rate; the loader and the live path give
the same ``text_present`` / ``image_present``; every built-in head ignores an absent
modality's stored values; ``--modality-dropout``.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import embedstore as es
import fusion
from cli.embedstore_app import app as es_app
from embedstore.errors import ExtractionError
from embedstore.extract import ExtractConfig, extract
from embedstore.format import ABSENT, ABSENT_IMAGE, ABSENT_TEXT, FAILED, PRESENT, derive_presence
from embedstore.info import store_info
from embedstore.verify import verify_store
from fusion.batch import Batch
from fusion.checks import check_head, random_batch
from fusion.config import FinetuneConfig
from fusion.data import drop_modalities, prepare
from fusion.errors import TrainError
from fusion.heads import FusionHead, create_head, list_heads
from fusion.live import Collate, RawRows, build_live_model

from .conftest import fill_text, minilm_spec, write_tiny_catalog

runner = CliRunner()
IMAGE = "timm:test_vit@random"
BOTH = [h for h in list_heads() if h not in ("text", "image")]


# --------------------------------------------------------------------------- the store


def test_derive_presence_rule_for_sets_written_without_the_array():
    errs = np.array(["", ABSENT_TEXT, "RuntimeError: boom", ""], dtype=object)
    assert derive_presence("text", errs, np.array([3, 0, 2, 0])).tolist() == [1, 0, 2, 0]
    errs = np.array(["", ABSENT_IMAGE, "ImageLoadError: x"], dtype=object)
    assert derive_presence("image", errs).tolist() == [PRESENT, ABSENT, FAILED]


def _absent_image_store(path, n=40, absent=(3, 7, 8, 20), failed=(11,), seed=1, noise=False):
    """A store whose image rows ``absent``/``failed`` hold zeros (or, ``noise``, random values)
    and the matching reasons; text rows 5 and 9 are empty."""
    store = es.create_store(path, [f"i{i}" for i in range(n)], [f"c{i % 3}" for i in range(n)],
                            folds=2, seed=0, holdout=0.25)
    lengths = 2 + np.arange(n) % 5
    lengths[[5, 9]] = 0
    fill_text(store, "txt", lengths, block_rows=16)
    rng = np.random.default_rng(seed)
    regions = rng.standard_normal((n, 5, 6)).astype(np.float16)
    pooled = rng.standard_normal((n, 6)).astype(np.float32)
    bad = list(absent) + list(failed)
    other = np.random.default_rng(99)
    regions[bad] = other.standard_normal((len(bad), 5, 6)) if noise else 0
    pooled[bad] = other.standard_normal((len(bad), 6)) if noise else 0
    errors = [""] * n
    for r in absent:
        errors[r] = ABSENT_IMAGE
    for r in failed:
        errors[r] = "ImageLoadError: truncated"
    w = store.create_feature("img", modality="image", dim=6, n_regions=5, prefix_tokens=1,
                             grid=[2, 2], block_rows=16, attrs={"encoder": {"spec": "test"}})
    with w:
        for b in w.pending_blocks():
            s, e = w.block_range(b)
            w.write_block(b, regions=regions[s:e], pooled=pooled[s:e], errors=errors[s:e])
    return es.open_store(path, mode="r+")


def test_writer_stores_presence_and_reader_info_verify_see_it(tmp_path):
    store = _absent_image_store(tmp_path / "s.zarr")
    img, txt = store.features["img"], store.features["txt"]
    p = img.presence()
    assert np.flatnonzero(p == ABSENT).tolist() == [3, 7, 8, 20]
    assert np.flatnonzero(p == FAILED).tolist() == [11] and img.n_failed == 1
    assert np.flatnonzero(txt.presence() == ABSENT).tolist() == [5, 9]
    assert "presence" in img.group.array_keys()
    info = store_info(store)["features"]
    assert info["img"]["presence"] == {"present": 35, "absent": 4, "failed": 1}
    assert verify_store(store).ok
    res = runner.invoke(es_app, ["info", str(tmp_path / "s.zarr")])
    assert res.exit_code == 0 and "4 / 1" in res.output  # absent / failed column
    # a presence that contradicts errors is a verify problem
    img.group["presence"].with_config({"write_empty_chunks": True})[11] = PRESENT
    rep = verify_store(es.open_store(tmp_path / "s.zarr"))
    assert any("presence: row 11 is marked present (1) but errors says" in q
               for q in rep.problems), rep.problems


def test_a_set_without_the_presence_array_derives_it(tmp_path):
    store = _absent_image_store(tmp_path / "s.zarr")
    for name in ("img", "txt"):  # as written before presence existed
        del store.features[name].group["presence"]
    store.consolidate()
    store = es.open_store(tmp_path / "s.zarr")
    assert "presence" not in store.features["img"].group.array_keys()
    p = store.features["img"].presence()
    assert np.flatnonzero(p == ABSENT).tolist() == [3, 7, 8, 20] and p[11] == FAILED
    assert np.flatnonzero(store.features["txt"].presence() == ABSENT).tolist() == [5, 9]
    assert verify_store(store).ok


def test_segments_keep_their_own_presence_stored_or_derived(tmp_path):
    from embedstore.segments import SegmentedFeatureSet

    old = _absent_image_store(tmp_path / "a.zarr")  # segment 0 written before presence existed
    del old.features["img"].group["presence"]
    old.consolidate()
    old = es.open_store(tmp_path / "a.zarr")
    new = _absent_image_store(tmp_path / "b.zarr", n=20, absent=(2,), failed=(0,))
    seg = SegmentedFeatureSet(old, "img", [old.features["img"], new.features["img"]])
    p = seg.presence()
    assert len(p) == 60 and p[[3, 11, 40, 42]].tolist() == [ABSENT, FAILED, FAILED, ABSENT]
    assert int((p == PRESENT).sum()) == 60 - 7


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """24 items: row 1 has no image value, row 4 an unreadable file, row 2 an empty text."""
    root = tmp_path_factory.mktemp("presence")
    cat = write_tiny_catalog(root)
    rows = list(csv.DictReader(open(cat)))
    rows[1]["image"] = ""
    rows[4]["image"] = "img/does-not-exist.png"
    rows[2]["title"] = rows[2]["description"] = ""
    with open(cat, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = dict(text=minilm_spec(), image=IMAGE, image_size=32, text_name="t", image_name="i",
               folds=2, holdout=0.25, block_rows=8, device="cpu")
    extract(cat, root / "ok.zarr", ExtractConfig(**cfg, max_error_rate=0.05))
    return root, cat, cfg


def test_extract_counts_only_failures_against_the_error_rate(extracted):
    root, cat, cfg = extracted
    # 1 failed image of 24 (4.2%) is above 1%: refused after finishing; the absent ones never
    with pytest.raises(ExtractionError, match=r"'i': 1/24 rows failed") as ei:
        extract(cat, root / "a.zarr", ExtractConfig(**cfg))
    by_name = {r.name: r for r in ei.value.results}
    assert (by_name["i"].n_errors, by_name["i"].n_absent) == (1, 1)
    assert (by_name["t"].n_errors, by_name["t"].n_absent) == (0, 1)
    assert list(by_name["i"].errors) == [4]
    s = es.open_store(root / "a.zarr")
    assert s.features["i"].presence()[[0, 1, 4]].tolist() == [PRESENT, ABSENT, FAILED]
    assert s.features["t"].presence()[2] == ABSENT


def test_loader_and_live_path_mark_the_same_rows_absent(extracted):
    root, cat, cfg = extracted
    store = es.open_store(root / "ok.zarr")  # the failure is within --max-error-rate 0.05
    ft = FinetuneConfig(options={"dim": 16, "hidden": 16}, batch_size=8)
    s = prepare(store, "concat", None, None, ft)
    torch.manual_seed(0)
    head = create_head("concat", **s.dims, dim=16, hidden=16)
    with torch.no_grad():  # a non-zero learned "missing" vector, so absent rows are visible
        head.image_missing.value.normal_()
        head.text_missing.value.normal_()
    model = build_live_model(s, ft, head).eval()
    rows = np.array([0, 1, 2, 4, 5])
    cached = Batch(**next(iter(store.loader(rows, text="t", image="i", batch_size=8))))
    assert cached.image_present.tolist() == [True, False, True, False, True]
    assert cached.text_present.tolist() == [True, True, False, True, True]
    from embedstore.provenance import catalog_from_feature

    texts = catalog_from_feature(s.tfs, store).texts
    images = catalog_from_feature(s.ifs, store).images
    ie, te = model.encoders["image"], model.encoders["text"]
    ds = RawRows(texts, images, ie.load_image, ie.input_shape)
    raw = Collate(te.tokenize, s.labels, model.present)([ds[int(r)] for r in rows])
    with torch.no_grad():
        live = model.features(raw)
        assert torch.equal(live.image_present, cached.image_present)
        assert torch.equal(live.text_present, cached.text_present)
        # same logits from both paths (fp16 cache rounding), also on the absent rows
        torch.testing.assert_close(head(live), head(cached.to("cpu")), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- heads


@pytest.mark.parametrize("name", list_heads())
def test_noise_in_absent_rows_of_the_store_leaves_every_head_unchanged(tmp_path_factory, name):
    root = tmp_path_factory.getbasetemp()
    stores = {}
    for noise in (False, True):
        path = root / f"noise-{noise}.zarr"
        stores[noise] = (es.open_store(path) if path.exists()
                         else _absent_image_store(path, noise=noise))
    torch.manual_seed(0)
    head = create_head(name, text_dim=8, image_dim=6, num_classes=3, text_layers=2).eval()
    with torch.no_grad():  # trained-looking biases and missing vectors (not zeros)
        for p in head.parameters():
            if p.dim() == 1:
                p.normal_(std=0.3)
    out = {}
    for noise, store in stores.items():
        ld = store.loader(np.arange(40), text="txt", image="img", batch_size=16)
        with torch.no_grad():
            out[noise] = torch.cat([head(Batch(**d)) for d in ld])
    assert not np.array_equal(stores[True].features["img"].regions(3),
                              stores[False].features["img"].regions(3))
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=1e-6)


class _ReadsEverything(FusionHead):
    """A head that ignores presence: what the new properties must catch."""

    needs = frozenset({"text_pooled", "image_pooled"})

    def __init__(self, **dims):
        super().__init__(**dims)
        self.fc = torch.nn.Linear(self.text_dim + self.image_dim, self.num_classes)

    def forward_features(self, batch):
        return torch.cat([batch.text_pooled, batch.image_pooled], dim=-1)


class _DropsImageWithoutText(_ReadsEverything):
    """Masks absent values correctly, but gives up on the image when the text is absent."""

    def forward_features(self, batch):
        t_ok = batch.text_present[:, None].to(batch.text_pooled.dtype)
        i_ok = batch.image_present[:, None].to(batch.image_pooled.dtype)
        return torch.cat([batch.text_pooled * t_ok, batch.image_pooled * i_ok * t_ok], dim=-1)


def test_property_suite_catches_heads_that_read_absent_values_or_drop_a_modality():
    bad = {r.name: r for r in check_head(_ReadsEverything) if not r.passed}
    assert set(bad) == {"absent_values"} and "CHANGED" in bad["absent_values"].detail
    bad = {r.name: r for r in check_head(_DropsImageWithoutText) if not r.passed}
    assert set(bad) == {"missing_text"}, bad


def test_check_batch_marks_the_empty_text_and_one_image_absent():
    b = random_batch(absent=True)
    assert b.text_present.tolist() == [True, True, False, True]
    assert b.image_present.tolist() == [True, False, True, True]
    assert random_batch().text_present is None


@pytest.mark.parametrize("name", ["late", "text"])
def test_an_item_without_its_modality_is_scored_by_the_halves_it_has(name):
    torch.manual_seed(0)
    head = create_head(name, text_dim=16, image_dim=12, num_classes=5, text_layers=2).double()
    head.eval()
    b = random_batch(absent=True)
    with torch.no_grad():
        head.get_submodule("text" if name == "late" else "").missing_logits.normal_()
        logits = head(b)
    if name == "text":  # row 2 has no text: its learned prior, whatever its stored values
        torch.testing.assert_close(logits[2], head.missing_logits.detach())
    else:  # row 1 has no image: exactly the text half; row 2 no text: the image half
        with torch.no_grad():
            t, i = head.text(b).log_softmax(-1), head.image(b).log_softmax(-1)
        torch.testing.assert_close(logits[1], t[1])
        torch.testing.assert_close(logits[2], i[2])


# --------------------------------------------------------------------------- modality dropout


def test_modality_dropout_drops_one_of_two_modalities_at_rate_p():
    n = 4000
    b = Batch(text_pooled=torch.zeros(n, 2), image_pooled=torch.zeros(n, 2),
              image_present=torch.arange(n) % 10 != 0)  # 10% have no image already
    out = drop_modalities(b, 0.3, np.random.default_rng(0))
    t, i = out.text_present.numpy(), out.image_present.numpy()
    assert (t | i).all()  # never both: an item keeps at least one modality
    assert not i[::10].any() and t[::10].all()  # the image-less items keep their text
    dropped = (~t | ~i)[np.arange(n) % 10 != 0].mean()
    assert 0.27 < dropped < 0.33
    assert 0.4 < (~t).sum() / (~t | ~i)[np.arange(n) % 10 != 0].sum() < 0.6
    same = drop_modalities(b, 0.3, np.random.default_rng(0))
    assert torch.equal(same.text_present, out.text_present)
    assert drop_modalities(b, 0.0, np.random.default_rng(0)) is b


def test_modality_dropout_is_recorded_and_checked(tmp_path):
    store = _absent_image_store(tmp_path / "s.zarr")
    run = fusion.train(store, "concat", out=tmp_path / "run", epochs=1, batch_size=8,
                       folds=1, modality_dropout=0.2, dim=8, hidden=8)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train"]["modality_dropout"] == 0.2 and run.metrics["macro_f1"] >= 0
    with pytest.raises(TrainError, match=r"--modality-dropout must be in \[0, 1\), got 1.5"):
        fusion.train(store, "concat", epochs=1, modality_dropout=1.5)
    with pytest.raises(TrainError, match="not available with --finetune"):
        FinetuneConfig(modality_dropout=0.1).check()


# --------------------------------------------------------------------------- metrics, catalog


def test_metrics_and_report_break_results_down_by_availability(tmp_path):
    store = _absent_image_store(tmp_path / "s.zarr")
    run = fusion.train(store, "text", out=tmp_path / "run", epochs=1, batch_size=8, hidden=8)
    av = json.loads((tmp_path / "run" / "metrics.json").read_text())["by_availability"]
    rows, hold = run.oof_rows, run.holdout_rows
    image_ok = store.features["img"].presence() == PRESENT  # the text run is broken down too
    text_ok = store.features["txt"].presence() == PRESENT
    assert av["text_only"]["n"] == int((text_ok & ~image_ok)[rows].sum())
    assert av["text_only"]["n"] + av["holdout"]["text_only"]["n"] == 5  # 4 absent + 1 failed
    assert av["both"]["n"] == int((text_ok & image_ok)[rows].sum())
    assert av["holdout"]["image_only"]["n"] == int((~text_ok & image_ok)[hold].sum())
    y, p = store.labels[rows], np.asarray(run.oof)
    sel = (text_ok & ~image_ok)[rows]
    from fusion.metrics import macro_f1

    assert av["text_only"]["macro_f1"] == pytest.approx(macro_f1(y[sel], p[sel].argmax(1), 3))
    from cli.fusion_app import app as fusion_app

    res = runner.invoke(fusion_app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "oof by availability: both macro-F1" in res.output and "text only" in res.output
    res = runner.invoke(fusion_app, ["report", str(tmp_path / "run"), "--html",
                                     str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert "By availability" in (tmp_path / "r.html").read_text()


def test_sample_catalog_drops_images_and_texts_on_request(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "make_catalog.py"
    spec = importlib.util.spec_from_file_location("make_catalog", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_catalog"] = mod
    spec.loader.exec_module(mod)
    plain = mod.make_catalog(tmp_path / "a", n=60, seed=3, n_classes=4, image_size=32)
    holes = mod.make_catalog(tmp_path / "b", n=60, seed=3, n_classes=4, image_size=32,
                             missing_image=0.3, empty_text=0.2)
    a = list(csv.DictReader(open(plain)))
    b = list(csv.DictReader(open(holes)))
    no_img = [r["image"] == "" for r in b]
    no_txt = [r["title"] == "" and r["description"] == "" for r in b]
    assert 8 <= sum(no_img) <= 28 and 4 <= sum(no_txt) <= 20
    assert not any(r["image"] == "" for r in a)
    for ra, rb, ni, nt in zip(a, b, no_img, no_txt, strict=True):  # nothing else moves
        assert ra["label"] == rb["label"] and ra["id"] == rb["id"]
        assert ni or rb["image"] == ra["image"]
        assert nt or (rb["title"], rb["description"]) == (ra["title"], ra["description"])
    assert not (tmp_path / "b" / b[no_img.index(True)]["id"]).with_suffix(".png").exists()
    with pytest.raises(ValueError, match="missing_image must be a share in"):
        mod.make_catalog(tmp_path / "c", n=8, n_classes=4, image_size=32, missing_image=1.5)


def test_the_fallback_head_example_passes_the_suite():
    from pathlib import Path

    from fusion.heads import resolve_head

    example = Path(__file__).resolve().parents[1] / "examples" / "fallback_head.py"
    for name in ("ConcatFallback", "HANetFallback"):
        head = resolve_head(f"{example}:{name}")
        assert {r.name: r.detail for r in check_head(head) if not r.passed} == {}
        torch.manual_seed(0)
        h = create_head(f"{example}:{name}", text_dim=16, image_dim=12, num_classes=5,
                        text_layers=2).double().eval()
        b = random_batch(absent=True)
        with torch.no_grad():  # item 1 has no photo: scored by the text classifier alone
            torch.testing.assert_close(h(b)[1], h.fallback_text(b.text_pooled)[1])
