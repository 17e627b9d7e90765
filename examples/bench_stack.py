"""The stacker benchmark: one whole `fusion.stack.stack()` call per stacker, timed on synthetic runs.

    python examples/bench_stack.py                      # 10,000 items x 5 runs x 27 classes
    python examples/bench_stack.py --items 2000 --runs 3 --classes 5 --repeats 1 --stackers lightgbm

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

from fusion.rundir import load_run  # noqa: E402
from fusion.stack import list_stackers, stack  # noqa: E402
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
    ap.add_argument("--child", metavar="JOBS_JSON", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        child(json.loads(a.child))
        return
    names = a.stackers.split(",") if a.stackers else None
    for row in bench_stackers(a.items, a.runs, a.classes, a.repeats, names,
                              progress=lambda m: print(m, file=sys.stderr, flush=True)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
