"""The demo pipeline end to end on a smaller catalog (960 items, 12 classes, 3 folds) with the
real encoders (MiniLM-L6 top layer and EfficientNet-Lite0 from their PyPI packages).

Asserted: every fusion head beats both unimodal heads (out-of-fold and holdout), and so do the
GBDT stacks. Not asserted, because it is not true on this catalog (measured, see
docs/progress.md): "hanet >= its keyless ablation >= concat" (the three land within 0.003
macro-F1 of each other, keyless first) and "the GBDT stack is the best row" (the heads already
reach the information ceiling of the two modalities; the stack ties them). The stacker's gain
over its sources is tested where it exists, in tests/test_stack.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADS = ("text", "image", "concat", "late", "hanet", "gated-xattn")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["demo"] = mod
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("demo")
    # a representative subset of the heads (one per family; every head is trained in
    # tests/test_heads.py) and one cached text layer keep this module at a few minutes
    heads = {name: mod.HEADS[name] for name in HEADS}
    res = mod.run_demo(out, n=960, n_classes=12, folds=3, epochs=20, quiet=True, heads=heads,
                       layers="-1", new_items=24, say=lambda *_: None)
    return out, {r["name"]: r for r in res["leaderboard"]}, res


@pytest.mark.slow
def test_demo_writes_leaderboard_runs_and_plots(demo):
    out, rows, res = demo
    assert (out / "leaderboard.md").read_text().count("\n| ") >= len(rows)
    assert set(res["stages"]) >= {"catalog", "weights", "extract", "train hanet", "stack lightgbm"}
    assert (out / "plots" / "stack-lightgbm" / "contributions.png").exists()
    assert (out / "complementarity.json").exists()


FUSION = ("concat", "late", "hanet", "gated-xattn", "stack-lightgbm", "stack-xgboost")


@pytest.mark.slow
@pytest.mark.parametrize("split", ["macro_f1", "holdout_macro_f1"])
def test_every_fusion_head_and_stack_beats_both_unimodal_heads(demo, split):
    _, rows, _ = demo
    uni = max(rows["text"][split], rows["image"][split])
    for name in FUSION:
        # the modalities are complementary by construction: fusion must gain a lot, not a hair
        assert rows[name][split] > uni + 0.05, (name, rows[name][split], uni)


@pytest.mark.slow
def test_demo_appends_new_items_and_the_winner_predicts_them_well(demo):
    import csv

    out, rows, res = demo
    assert "append + predict" in res["stages"] and len(res["predictions"]) == 5
    # the same 24 new items with their labels (make_catalog is deterministic per seed and id)
    mc = sys.modules["make_catalog"]
    truth_csv = mc.make_catalog(out / "truth", n=24, seed=1, n_classes=12, first_id=960)
    truth = {r["id"]: r["label"] for r in csv.DictReader(truth_csv.open())}
    best = max(r["holdout_accuracy"] for r in rows.values())
    for name in ("predictions.csv", "predictions-stack.csv"):  # winning head, winning stack
        got = {r["id"]: r["class_1"] for r in csv.DictReader((out / name).open())}
        assert sorted(got) == sorted(truth)
        acc = sum(got[i] == truth[i] for i in truth) / len(truth)
        assert acc >= best - 0.25, (name, acc, best)  # 24 items: one is 0.04
    assert all("stack_top3" in item for item in res["predictions"])
