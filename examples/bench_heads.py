"""Heads and head options measured on one store: k-fold runs, then holdout and out-of-fold
macro-F1 with the paired bootstrap interval against a baseline run.

    python examples/bench_heads.py STORE --out /tmp/bench-heads \\
        --run hanet=hanet --run hanet-paper=hanet:hybrid=paper --baseline hanet
    python examples/bench_heads.py demo-output/catalog.zarr --out /tmp/bh --epochs 8 --folds 2 \\
        --run concat=concat --run tensor=tensor --run lmf=lmf --extra demo-output/runs/hanet

Each ``--run NAME=HEAD[:KEY=VALUE,KEY=VALUE]`` trains ``fusion.train(store, HEAD, **options)``
into ``OUT/NAME`` (skipped when that run directory is already complete, so a stopped bench
resumes), one run at a time, on ``--threads`` torch threads (1 by default: comparable timings
on a shared machine). ``--extra`` adds finished run directories of the same store and folds to
the comparison. Prints one JSON line per trained run, then the leaderboard of
:func:`fusion.leaderboard.compare` as Markdown (``--baseline``: the run every interval is
against; default the leader) and writes it to ``OUT/leaderboard.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from embedstore import open_store  # noqa: E402
from fusion import train  # noqa: E402
from fusion.errors import FusionError  # noqa: E402
from fusion.keyvalue import parse_key_values  # noqa: E402
from fusion.leaderboard import compare, leaderboard_markdown  # noqa: E402
from fusion.rundir import load_run  # noqa: E402


def parse_run(text: str) -> tuple[str, str, dict[str, Any]]:
    """``"hanet-paper=hanet:hybrid=paper,dim=64"`` -> ("hanet-paper", "hanet", {...})."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise FusionError(f"--run {text!r} is not NAME=HEAD[:KEY=VALUE,...]; write e.g. "
                          "--run hanet-paper=hanet:hybrid=paper")
    head, _, opts = spec.partition(":")
    items = [o for o in opts.split(",") if o]
    return name, head, parse_key_values(items, flag="--run", example="hanet:hybrid=paper")


def finished(path: Path) -> bool:
    try:
        load_run(path)
    except (FusionError, OSError):
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--run", action="append", default=[], help="NAME=HEAD[:KEY=VALUE,...]")
    ap.add_argument("--extra", action="append", default=[], help="a finished run directory")
    ap.add_argument("--baseline", default=None, help="run name every interval is against")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--folds", type=int, default=None, help="train the first N store folds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resamples", type=int, default=1000)
    a = ap.parse_args(argv)
    store = open_store(a.store)
    a.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for text in a.run:
        name, head, options = parse_run(text)
        path = a.out / name
        if not finished(path):
            t = time.perf_counter()
            run = train(store, head, out=path, name=name, epochs=a.epochs, patience=a.patience,
                        batch_size=a.batch_size, folds=a.folds, seed=a.seed, threads=a.threads,
                        **options)
            print(json.dumps({"run": name, "head": head, "options": options,
                              "seconds": round(time.perf_counter() - t, 1),
                              "oof_macro_f1": round(run.metrics["macro_f1"], 4),
                              "holdout_macro_f1": round(run.metrics["holdout"]["macro_f1"], 4)}),
                  flush=True)
        paths.append(path)
    paths += [Path(p) for p in a.extra]
    rows = compare(paths, baseline=a.baseline, resamples=a.resamples, seed=a.seed)
    table = leaderboard_markdown(rows)
    (a.out / "leaderboard.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
