"""Fallback classifiers (issue 14, docs/heads.md §6): a bimodal head with ``fallback`` keeps a
small classifier per modality, trained on every item that has it; an item lacking a modality
is scored by the classifier of the one it has. ``fallback`` is switched on automatically for a
built-in head when the training store holds an absent or failed modality (or with
``--modality-dropout``), recorded in the run, and rebuilt by `fusion predict`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embedstore as es
import fusion
from fusion.batch import Batch
from fusion.heads import create_head, list_heads
from fusion.predict import predict

from .conftest import make_complementary_store
from .test_presence import _absent_image_store

ROUTED = [h for h in list_heads() if h not in ("text", "image", "late")]
FIT = dict(epochs=2, batch_size=16, threads=1)


@pytest.mark.parametrize("name", ROUTED)
def test_rows_without_a_modality_take_the_other_modalitys_classifier(tmp_path_factory, name):
    path = tmp_path_factory.getbasetemp() / "fb.zarr"
    store = es.open_store(path) if path.exists() else _absent_image_store(path)
    torch.manual_seed(0)
    head = create_head(name, text_dim=8, image_dim=6, num_classes=3, text_layers=2,
                       fallback=True).eval()
    assert {"text_pooled", "image_pooled"} <= head.needs
    d = next(iter(store.loader(np.arange(24), text="txt", image="img", batch_size=24)))
    b = Batch(**d)
    with torch.no_grad():
        out = head(b)
        fused = head.forward_head(head.forward_features(b))
        text, image = head.fallback_text(b.text_pooled), head.fallback_image(b.image_pooled)
    no_img, no_txt = ~b.image_present, ~b.text_present  # rows 3, 7, 8, 20 (+ failed 11); 5, 9
    assert no_img.sum() == 5 and no_txt.sum() == 2
    torch.testing.assert_close(out[no_img], text[no_img])
    torch.testing.assert_close(out[no_txt], image[no_txt])
    both = ~no_img & ~no_txt
    torch.testing.assert_close(out[both], fused[both])


def test_auto_on_with_absent_rows_off_without_recorded_and_predicted(tmp_path):
    holey = _absent_image_store(tmp_path / "holey.zarr", n=60, absent=tuple(range(0, 60, 6)))
    run = fusion.train(holey, "concat", out=tmp_path / "on", **FIT)
    assert run.config["head_config"]["options"]["fallback"] is True
    np.testing.assert_allclose(predict(run, holey, rows="holdout").probs, run.holdout, atol=2e-5)
    full = make_complementary_store(tmp_path / "full.zarr", n=120)
    off = fusion.train(full, "concat", out=tmp_path / "off", **FIT)
    assert not off.config["head_config"]["options"].get("fallback")
    dropped = fusion.train(full, "concat", out=tmp_path / "drop", modality_dropout=0.2, **FIT)
    assert dropped.config["head_config"]["options"]["fallback"] is True
    forced_off = fusion.train(holey, "hanet", out=tmp_path / "forced", fallback=False, **FIT)
    assert forced_off.config["head_config"]["options"]["fallback"] is False
    late = fusion.train(holey, "late", out=tmp_path / "late", **FIT)  # scores halves already
    assert "fallback" not in late.config["head_config"]["options"]
