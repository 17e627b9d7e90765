"""The stacker benchmark: one whole `fusion.stack.stack()` call per stacker, timed on synthetic runs.

    python examples/bench_stack.py                      # 10,000 items x 5 runs x 27 classes
    python examples/bench_stack.py --items 2000 --runs 3 --classes 5 --repeats 1 --stackers lightgbm
    python examples/bench_stack.py --table --demo /tmp/demo3/out/runs   # docs/stacking.md table

Prints one JSON line per stacker. `make bench` (examples/bench.py, section 6 "stackers") runs
:func:`bench_stackers` in a child process through ``--child`` so that a stacker too slow for the
run's budget can be stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from embedstore import open_store  # noqa: E402
from fusion.bootstrap import paired_bootstrap  # noqa: E402
from fusion.rundir import load_run  # noqa: E402
from fusion.stack import AUTO, list_stackers, stack  # noqa: E402
from fusion.testing import make_synthetic_runs  # noqa: E402


def bench_stackers(
    n_items: int = 10_000,
    n_runs: int = 5,
    n_classes: int = 27,
    repeats: int = 3,
    stackers: Sequence[str] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every stacker on a synthetic problem (5 folds + refit, default params).

    One dict per stacker: ``median_seconds`` is the wall time of one whole ``stack()`` call
    (5 fold fits + refit + prediction + attribution + writing), ``median_fit_seconds`` its
    model-fitting part, both medians over ``repeats`` runs.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least 1")
    say = progress or (lambda _msg: None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        srcs = make_synthetic_runs(
            Path(tmp) / "runs", n_items=n_items, n_classes=n_classes, n_runs=n_runs, seed=0
        )
        best_src = max(load_run(p).metrics["accuracy"] for p in srcs)
        for name in stackers or list_stackers():
            walls, fits, run = [], [], None
            for i in range(repeats):
                t0 = time.perf_counter()
                run = stack(srcs, stacker=name, seed=0, out=Path(tmp) / f"{name}-{i}",
                            params=(params or {}).get(name))
                walls.append(time.perf_counter() - t0)
                fits.append(run.metrics["train_seconds"])
                say(f"{name} #{i + 1}: {walls[-1]:.1f} s (fit {fits[-1]:.1f} s), holdout "
                    f"macro-F1 {run.metrics['holdout']['macro_f1']:.4f}")
            assert run is not None  # repeats >= 1
            rows.append({
                "stacker": name,
                "n_items": n_items,
                "n_runs": n_runs,
                "n_classes": n_classes,
                "n_folds": len(run.metrics["folds"]),
                "repeats": repeats,
                "median_seconds": round(statistics.median(walls), 3),
                "median_fit_seconds": round(statistics.median(fits), 3),
                "all_seconds": [round(s, 3) for s in walls],
                "rounds": [m["best_iteration"] for m in run.metrics["folds"]],
                "oof_macro_f1": run.metrics["macro_f1"],
                "holdout_macro_f1": run.metrics["holdout"]["macro_f1"],
                "best_source_oof_accuracy": best_src,
                "best_source_holdout_macro_f1": max(
                    s["holdout"]["macro_f1"] for s in run.metrics["sources"]
                ),
            })
    return rows


DEMO_SOURCES = ("text", "image", "concat", "hanet", "coattention", "gated-xattn")
TABLE_STACKERS = ("ensemble", "logreg", "lightgbm", "lightgbm-monotone", "xgboost", "mlp", AUTO)


def evidence_cases(tmp: Path, demo: Path | None, n_items: int, n_classes: int
                   ) -> dict[str, list[Path]]:
    """The three source sets of the docs/stacking.md table: the demo's runs (``demo``, those
    of ``DEMO_SOURCES`` that exist), "harder" (synthetic, every run's skill halved: weaker
    sources that disagree more) and "noisy" (synthetic, the image run nearly noise); the
    synthetic runs have per-fold holdouts (``holdout_folds``)."""
    cases: dict[str, list[Path]] = {}
    if demo is not None:
        cases["demo"] = [demo / s for s in DEMO_SOURCES if (demo / s / "DONE").exists()]
    common = {"n_items": n_items, "n_classes": n_classes, "n_runs": 3, "holdout_folds": True}
    cases["harder"] = make_synthetic_runs(tmp / "harder", seed=3, skill_scale=0.5, **common)
    cases["noisy"] = make_synthetic_runs(tmp / "noisy", seed=4, near_chance=("image",), **common)
    return cases


def evidence_table(demo: Path | None = None, n_items: int = 3000, n_classes: int = 24,
                   stackers: Sequence[str] = TABLE_STACKERS, threads: int = 1,
                   progress: Callable[[str], None] | None = None,
                   cases: Sequence[str] | None = None, pooled_sets: Sequence[str] = (),
                   pooled_dims: int = 16) -> list[dict[str, Any]]:
    """One row per (case, stacker): OOF and holdout macro-F1, fit and wall seconds, the best
    source's holdout macro-F1 and the paired 95% bootstrap interval of stack minus best source
    on the holdout (:func:`fusion.bootstrap.paired_bootstrap`, 1,000 resamples). With
    ``pooled_sets`` the demo case adds multi-level rows ``<stacker>+pca<pooled_dims>``: the
    pooled vectors of those feature sets of the demo's store, PCA-reduced inside each fold."""
    say = progress or (lambda _msg: None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stack-table-") as tmp:
        for case, srcs in evidence_cases(Path(tmp), demo, n_items, n_classes).items():
            if cases is not None and case not in cases:
                continue
            runs = [load_run(p) for p in srcs]
            labels = np.asarray(runs[0].config["labels"])
            jobs: list[tuple[str, str, dict[str, Any]]] = [(n, n, {}) for n in stackers]
            if pooled_sets and case == "demo":
                store = open_store(runs[0].config["store"]["url"])
                pooled = np.concatenate([store.features[n].pooled_all() for n in pooled_sets], 1)
                jobs += [(f"{n}+pca{pooled_dims}", n, {"features": "probs+pooled",
                          "pooled": pooled, "pooled_dims": pooled_dims})
                         for n in stackers if n != "ensemble"]
            for label, name, extra in jobs:
                t0 = time.perf_counter()
                run = stack(srcs, stacker=name, threads=threads, out=Path(tmp) / case / label,
                            params=None if name == AUTO else _thread_params(name, threads),
                            **extra)
                wall = time.perf_counter() - t0
                y = labels[run.holdout_rows]
                best = max(runs, key=lambda r: r.metrics["holdout"]["macro_f1"])
                ci = paired_bootstrap(y, run.holdout.argmax(1), best.holdout.argmax(1),
                                      len(run.classes))["macro_f1"]
                m = run.metrics
                rows.append({
                    "case": case, "stacker": label, "chosen": run.config["stacker"],
                    "holdout_scheme": m["holdout_scheme"], "n_sources": len(srcs),
                    "oof_macro_f1": round(m["macro_f1"], 4),
                    "holdout_macro_f1": round(m["holdout"]["macro_f1"], 4),
                    "fit_seconds": round(m["train_seconds"], 2), "wall_seconds": round(wall, 2),
                    "best_source": best.name,
                    "best_source_holdout_macro_f1": round(best.metrics["holdout"]["macro_f1"], 4),
                    "vs_best_source": [round(ci.diff, 4), round(ci.lo, 4), round(ci.hi, 4)],
                })
                say(json.dumps(rows[-1]))
    return rows


def _thread_params(name: str, threads: int) -> dict[str, Any] | None:
    return {"n_jobs": threads} if name in ("lightgbm", "lightgbm-monotone", "xgboost") else None


def markdown(rows: list[dict[str, Any]]) -> str:
    """The docs/stacking.md table."""
    out = ["| case | stacker | OOF macro-F1 | holdout macro-F1 | stack - best source [95% CI] "
           "| fit (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        d, lo, hi = r["vs_best_source"]
        name = r["stacker"] + (f" -> {r['chosen']}" if r["stacker"].startswith(AUTO) else "")
        out.append(f"| {r['case']} | {name} | {r['oof_macro_f1']:.4f} | "
                   f"{r['holdout_macro_f1']:.4f} | {d:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
                   f"{r['fit_seconds']:.1f} |")
    return "\n".join(out)


def child(jobs: list[dict[str, Any]]) -> None:
    """The protocol examples/bench.py reads: ``ready``, then one JSON line per job (each job
    is ``bench_stackers(**job)`` for one stacker), flushed as soon as it is measured."""
    print("ready", flush=True)
    for job in jobs:
        print(json.dumps(bench_stackers(**job)[0]), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--classes", type=int, default=27)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stackers", default=None,
                    help=f"comma-separated, default all ({','.join(list_stackers())})")
    ap.add_argument("--table", action="store_true",
                    help="the docs/stacking.md table: stackers x (demo, harder, noisy)")
    ap.add_argument("--demo", type=Path, default=None,
                    help="with --table: the demo's runs directory (examples/demo.py --out X: X/runs)")
    ap.add_argument("--pooled", default=None, help="with --table --demo: comma-separated "
                    "feature sets of the demo store for multi-level rows (e.g. minilm,lite0)")
    ap.add_argument("--cases", default=None, help="with --table: comma-separated subset of "
                    "demo,harder,noisy (default all)")
    ap.add_argument("--child", metavar="JOBS_JSON", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        child(json.loads(a.child))
        return
    if a.table:
        rows = evidence_table(a.demo, progress=lambda m: print(m, file=sys.stderr, flush=True),
                              stackers=a.stackers.split(",") if a.stackers else TABLE_STACKERS,
                              cases=a.cases.split(",") if a.cases else None,
                              pooled_sets=a.pooled.split(",") if a.pooled else ())
        print(markdown(rows))
        return
    names = a.stackers.split(",") if a.stackers else None
    for row in bench_stackers(a.items, a.runs, a.classes, a.repeats, names,
                              progress=lambda m: print(m, file=sys.stderr, flush=True)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
