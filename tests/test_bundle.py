"""Bundles (issue 13 part 3): `fusion export` + `fusion.Predictor` on raw items with the real
MiniLM-L6 and EfficientNet-Lite0 give the probabilities `fusion predict` gives on the same items
extracted into a store; user-code heads need trust; nothing is unpickled."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import embedstore as es
import fusion
from cli.fusion_app import app
from embedstore.extract import ExtractConfig, extract
from embedstore.weights import convert_efficientnet_lite0
from fusion.bundle import export_bundle
from fusion.predict import PredictError, predict
from fusion.predictor import Predictor

from .conftest import minilm_spec, write_tiny_catalog

runner = CliRunner()
ROOT_EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    cat = write_tiny_catalog(root, n=24, n_classes=3)
    rows = list(csv.DictReader(cat.open()))
    rows[3]["image"] = ""  # no photo: absent
    rows[5]["image"] = "images/gone.jpg"  # a broken link: failed, absent for the heads
    with cat.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lite0 = convert_efficientnet_lite0(root / "lite0.safetensors")
    extract(cat, root / "s.zarr", ExtractConfig(
        text=minilm_spec(), image=f"timm:tf_efficientnet_lite0@{lite0}", image_size=64,
        layers="-2,-1", folds=2, holdout=0.25, block_rows=8, device="cpu", max_error_rate=0.1))
    store = es.open_store(root / "s.zarr")
    run = fusion.train(store, "hanet", out=root / "runs" / "hanet", epochs=2, batch_size=8,
                       layers="-1", threads=1)
    items = list(csv.DictReader(cat.open()))
    for it in items:  # the catalog's image paths are relative to its folder
        it["image"] = str(root / it["image"]) if it["image"] else None
    return {"root": root, "store": store, "run": run, "items": items, "catalog": cat}


def test_bundle_predictions_equal_store_predictions_on_the_same_items(served, tmp_path):
    run, store, items = served["run"], served["store"], served["items"]
    out = export_bundle(run.path, tmp_path / "model")
    doc = json.loads((out / "bundle.json").read_text())
    assert doc["code"]["builtin"] and doc["features"]["text"]["meta"]["encoder"]["weights_sha256"]
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))
    p = Predictor.load(out, device="cpu")
    live = p.predict(items, batch_size=5)  # batches unlike extraction's
    cached = predict(run, store, ids=[it["id"] for it in items]).probs
    np.testing.assert_allclose(live, cached, atol=1e-4)  # measured: 3e-8
    assert (live.argmax(1) == cached.argmax(1)).mean() >= 0.95
    # items 3 (no photo) and 5 (broken link) are absent for the head, live as in the store
    assert served["store"].features["tf-efficientnet-lite0"].presence()[[3, 5]].tolist() == [0, 2]
    # bytes work as well as paths
    one = dict(items[0], image=open(items[0]["image"], "rb").read())
    np.testing.assert_allclose(p.predict([one]), live[:1], atol=2e-3)


def test_cli_export_then_predict_from_a_bundle_and_a_catalog(served, tmp_path):
    res = runner.invoke(app, ["export", str(served["run"].path), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["predict", "--bundle", str(tmp_path / "m"), "--catalog",
                              str(served["catalog"]), "--top-k", "2", "--out",
                              str(tmp_path / "p.csv"), "-q"])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0] == ["id", "class_1", "prob_1", "class_2", "prob_2"]
    assert [r[0] for r in rows[1:]] == [it["id"] for it in served["items"]]


def test_a_user_code_bundle_needs_trust_and_an_unchanged_source(served, tmp_path):
    store = served["store"]
    run = fusion.train(store, f"{ROOT_EXAMPLES}/custom_head.py:GMUHead", out=tmp_path / "gmu",
                       epochs=1, batch_size=8, layers="-1", threads=1, dim=16)
    out = export_bundle(run.path, tmp_path / "gmu-model")
    assert (out / "code" / "custom_head.py").is_file()
    with pytest.raises(PredictError, match="--trust-code"):
        Predictor.load(out)
    p = Predictor.load(out, trust_code=True)
    assert p.predict(served["items"][:3]).shape == (3, len(store.classes))
    src = out / "code" / "custom_head.py"
    src.write_text(src.read_text() + "\n# changed\n")
    with pytest.raises(PredictError, match="differs from the code"):
        Predictor.load(out, trust_code=True)


def test_a_stack_bundle_equals_stack_predict_on_the_store(served, tmp_path):
    """A stack (LightGBM-free logreg over a text run and the hanet run, plus PCA-reduced pooled
    image vectors) exported with its sources: the live prediction equals `fusion predict` of
    the stack run on the store, and the two sources share one MiniLM encoder."""
    from fusion.stack import stack

    store, items, root = served["store"], served["items"], served["root"]
    text = fusion.train(store, "text", out=root / "runs" / "text", epochs=2, batch_size=8,
                        layers="-1", threads=1)
    st = stack([text.path, served["run"].path], stacker="logreg", features="probs+pooled",
               pooled=store.features["tf-efficientnet-lite0"].pooled_all(),
               pooled_sets=["tf-efficientnet-lite0"],
               pooled_dims=2, threads=1, out=tmp_path / "stack")
    out = export_bundle(st.path, tmp_path / "stack-model")
    assert json.loads((out / "bundle.json").read_text())["kind"] == "stack"
    assert (out / "sources" / "0" / "bundle.json").is_file()
    p = Predictor.load(out, device="cpu")
    assert p.sources[0].encoders["text"] is p.sources[1].encoders["text"]  # loaded once
    live = p.predict(items, batch_size=7)
    cached = predict(st, store, ids=[it["id"] for it in items]).probs
    np.testing.assert_allclose(live, cached, atol=1e-4)
    assert (live.argmax(1) == cached.argmax(1)).all()


def test_train_append_predict_equals_the_bundle_on_the_raw_new_items(served, tmp_path):
    """Issue 13's end-to-end check: a head trained on a store; tomorrow's unlabelled items are
    appended (a new segment, encoders from provenance); `fusion predict --rows unlabelled`
    on the store equals the exported bundle's live prediction on the same raw items."""
    import shutil

    from embedstore.extract.append import append

    root = served["root"]
    store = tmp_path / "grown.zarr"
    shutil.copytree(served["store"].url, store)
    new = []
    for it in served["items"][:5] + served["items"][6:8]:  # not the broken link (row 5)
        new.append({"id": "new-" + it["id"], "title": it["title"] + " v2",
                    "description": it["description"], "image": it["image"] or ""})
    new[1]["image"] = ""  # tomorrow's listings include one without a photo
    cat = tmp_path / "new.csv"
    with cat.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(new[0]))
        w.writeheader()
        w.writerows(new)
    append(cat, store)
    s = es.open_store(store)
    assert s.n_items == served["store"].n_items + 7 and len(s.segments) == 2
    pred = predict(served["run"], s, rows="unlabelled")
    assert pred.ids.tolist() == [r["id"] for r in new]
    p = Predictor.load(export_bundle(served["run"].path, tmp_path / "model",
                                     store=root / "s.zarr"), device="cpu")
    live = p.predict([{**r, "image": r["image"] or None} for r in new], batch_size=3)
    np.testing.assert_allclose(live, pred.probs, atol=1e-4)
