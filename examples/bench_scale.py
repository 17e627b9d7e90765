"""The scale benchmark (issue 15, `make bench-scale`): time and peak RSS of `fusion train`,
`fusion stack` and `fusion predict` on synthetic stores and runs at N items x K classes.

    python examples/bench_scale.py                                   # the default grid
    python examples/bench_scale.py --items 10000 --classes 27,5600 --stages stack
    python examples/bench_scale.py --json results.json --plot docs/bench_scale.png

Stores: random fp16 features (a text set of one 384-d token per item plus its pooled vector,
an image set of 1280-d pooled vectors), Zipf class sizes (exponent 1), 5 folds + 20% holdout.
Source runs for `fusion stack`: 5 runs of :func:`fusion.testing.make_synthetic_runs` (dense,
as examples/bench_stack.py) up to 256 classes, of :func:`fusion.testing.make_many_class_runs`
(top-20) above. Every measurement runs in its own child process (``--child``), so
its peak RSS (``ru_maxrss``) is its own, with a wall-clock limit (``--limit``; a cell past it is
reported as not finished). Threads are pinned (OMP/MKL/OpenBLAS/torch) to 1; the stack runs with
each of ``--gbdt-threads`` (default 1 and 2) GBDT threads. Each row has the wall ``seconds``, the
child's ``cpu_seconds`` and the 1-minute load average before and after (the machine is shared). Writes a JSON list of rows and, with ``--plot``, a
log-log PNG of time against N and against K. Not part of `make test` or `make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TEXT_DIM, IMAGE_DIM, BLOCK = 384, 1280, 4096


def _zipf_labels(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, k + 1)
    return rng.permutation(rng.choice(k, n, p=w / w.sum()))


def make_store(path: Path, n: int, k: int, seed: int = 0) -> None:
    """A store of ``n`` items in ``k`` Zipf-sized classes with random fp16 features."""
    from embedstore import create_store

    labels = _zipf_labels(n, k, seed)
    store = create_store(path, [f"item-{i:07d}" for i in range(n)],
                         [f"c{c:05d}" for c in labels], classes=[f"c{c:05d}" for c in range(k)],
                         folds=5, seed=seed, holdout=0.2)
    rng = np.random.default_rng(seed + 1)
    w = store.create_feature("txt", modality="text", dim=TEXT_DIM, lengths=np.ones(n, int),
                             layers=[6], block_rows=BLOCK,
                             attrs={"encoder": {"spec": "bench:random"}})
    with w:
        for b in w.pending_blocks():
            s, e = w.block_range(b)
            tok = rng.standard_normal((e - s, 1, 1, TEXT_DIM)).astype(np.float16)
            w.write_block(b, tokens=list(tok), pooled=tok[:, 0, 0].astype(np.float32))
    w = store.create_feature("img", modality="image", dim=IMAGE_DIM, n_regions=2,
                             prefix_tokens=1, grid=[1, 1], block_rows=BLOCK,
                             attrs={"encoder": {"spec": "bench:random"}})
    with w:
        for b in w.pending_blocks():
            s, e = w.block_range(b)
            reg = rng.standard_normal((e - s, 2, IMAGE_DIM)).astype(np.float16)
            w.write_block(b, regions=reg, pooled=reg[:, 0].astype(np.float32))


def _dir_mb(path: Path, pattern: str = "*") -> float:
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file()) / 2**20


def child(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process: returns seconds, peak RSS and what the stage reports."""
    stage, work = job["stage"], Path(job["work"])
    out: dict[str, Any] = {"load_before": round(os.getloadavg()[0], 2)}
    # the libraries every stage imports, and torch's first optimiser (it imports torch._dynamo:
    # +144 MiB), before the clock and the RSS baseline: time and peak-above-baseline are the
    # stage's own
    import torch

    import fusion.predict
    import fusion.stack
    import fusion.train  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with open("/proc/self/statm") as fh:
        out["baseline_rss_mb"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    t0, cpu0 = time.perf_counter(), time.process_time()
    if stage.startswith("stack"):  # "stack" (the default, auto) or "stack-<stacker>"
        from fusion.stack import stack

        srcs = sorted(p for p in (work / "runs").iterdir() if p.is_dir())
        kw = {"stacker": stage.split("-", 1)[1]} if "-" in stage else {}
        run = stack(srcs, out=work / f"{stage}-t{job['gbdt_threads']}",
                    threads=job["gbdt_threads"], **kw)
        out.update(stacker=run.config["stacker"], accuracy=run.metrics["accuracy"],
                   macro_f1=run.metrics["macro_f1"],
                   rounds=[f["best_iteration"] for f in run.metrics["folds"]],
                   best_source_accuracy=max(json.loads((p / "metrics.json").read_text())
                                            ["accuracy"] for p in srcs),
                   run_mb=_dir_mb(run.path))
    elif stage.startswith("train-"):
        from embedstore import open_store
        from fusion.train import train

        head = stage.split("-", 1)[1]
        run = train(open_store(work / "store.zarr"), head, out=work / f"run-{head}",
                    epochs=1, folds=1, patience=1, threads=job["threads"], device="cpu",
                    max_ram_gb=job.get("max_ram_gb", 8.0))
        out.update(epoch_seconds=run.metrics["epoch_seconds"], layout=run.layout,
                   run_mb=_dir_mb(run.path), probs_mb=_dir_mb(run.path, "*.np*"),
                   n_parameters=run.metrics["n_parameters"])
    elif stage == "predict":
        from fusion.predict import predict

        pred = predict(work / "run-concat", work / "store.zarr", rows="holdout", threads=1,
                       device="cpu")
        out.update(rows=len(pred.probs))
    out["seconds"] = time.perf_counter() - t0
    # CPU seconds of this process (every thread): on the shared machine the wall time above
    # grows with the other jobs' load, the CPU time much less
    out["cpu_seconds"] = time.process_time() - cpu0
    out["load_after"] = round(os.getloadavg()[0], 2)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_above_baseline_mb"] = out["peak_rss_mb"] - out["baseline_rss_mb"]
    return out


def measure(job: dict[str, Any], limit: float) -> dict[str, Any]:
    threads = str(job.get("threads", 1))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE"}
    try:
        res = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env,
                             capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {**job, "finished": False, "seconds": None, "note": f"not finished in {limit:.0f} s"}
    if res.returncode != 0:
        return {**job, "finished": False, "note": res.stderr.strip().splitlines()[-1][:300]}
    return {**job, "finished": True, **json.loads(res.stdout.strip().splitlines()[-1])}


def run_grid(items: list[int], classes: list[int], stages: list[str], limit: float,
             work_root: Path, gbdt_threads: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    from fusion.config import DENSE_MAX_CLASSES
    from fusion.testing import make_many_class_runs, make_synthetic_runs

    rows = []
    for n in items:
        for k in classes:
            work = work_root / f"n{n}-k{k}"
            work.mkdir(parents=True, exist_ok=True)
            base = {"items": n, "classes": k, "work": str(work), "threads": 1}
            stack_stages = [s for s in stages if s.startswith("stack")]
            if stack_stages:
                t = time.perf_counter()
                if k <= DENSE_MAX_CLASSES:  # dense runs, as bench_stack.py makes them
                    make_synthetic_runs(work / "runs", n_items=n, n_classes=k, n_runs=5,
                                        seed=0, holdout_folds=True)
                else:
                    make_many_class_runs(work / "runs", n_items=n, n_classes=k, n_runs=5,
                                         seed=0)
                print(f"# runs n={n} k={k}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
                for s in stack_stages:
                    for g in gbdt_threads:
                        rows.append(measure({**base, "stage": s, "gbdt_threads": g}, limit))
                        print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(work / "runs", ignore_errors=True)
            train_stages = [s for s in stages if s.startswith("train-")]
            if train_stages or "predict" in stages:
                t = time.perf_counter()
                make_store(work / "store.zarr", n, k)
                print(f"# store n={n} k={k}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
                for s in train_stages + (["predict"] if "predict" in stages else []):
                    job = {**base, "stage": s}
                    if s == "train-coattention":  # token-level, streamed from the store
                        job["max_ram_gb"] = 0.0
                    rows.append(measure(job, limit))
                    print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(work, ignore_errors=True)
    return rows


def plot(rows: list[dict[str, Any]], png: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    latest = {(r["stage"], r.get("gbdt_threads"), r["items"], r["classes"]): r for r in rows
              if r.get("finished") and r.get("seconds")}  # a re-measured cell: its last row
    keyed = list(latest.values())
    series = sorted({(r["stage"], r.get("gbdt_threads")) for r in keyed}, key=str)
    for ax, (x, other) in zip(axes, (("items", "classes"), ("classes", "items")), strict=True):
        for stage, g in series:
            for o in sorted({r[other] for r in keyed}):
                pts = sorted((r[x], r["seconds"]) for r in keyed if r["stage"] == stage
                             and r.get("gbdt_threads") == g and r[other] == o)
                if len(pts) >= 2:
                    label = f"{stage}{f' t{g}' if g else ''} {'K' if other == 'classes' else 'N'}={o}"
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N items" if x == "items" else "K classes")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=6)
    fig.suptitle("bench-scale: time against N and against K (log-log)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="10000,50000,150000")
    ap.add_argument("--classes", default="27,1000,5600")
    ap.add_argument("--stages", default="stack,train-concat,train-hanet,predict")
    ap.add_argument("--limit", type=float, default=300.0, help="seconds per measurement")
    ap.add_argument("--gbdt-threads", default="1,2", help="GBDT threads of the stack stages")
    ap.add_argument("--json", type=Path, default=None, help="append the rows to this file")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = run_grid([int(x) for x in a.items.split(",")], [int(x) for x in a.classes.split(",")],
                    a.stages.split(","), a.limit, work,
                    tuple(int(g) for g in a.gbdt_threads.split(",")))
    if a.json is not None:
        old = json.loads(a.json.read_text()) if a.json.exists() else []
        a.json.write_text(json.dumps(old + rows, indent=1) + "\n")
    if a.plot is not None:
        allrows = json.loads(a.json.read_text()) if a.json is not None else rows
        print(f"# plot: {plot(allrows, a.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
