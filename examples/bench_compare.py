"""The paired-bootstrap benchmark behind `fusion compare`: resamples x items x classes, timed.

    python examples/bench_compare.py                       # 1,000 resamples, 100k items, 1,000 classes
    python examples/bench_compare.py --items 20000 --classes 200 --resamples 500 --repeats 1

Two synthetic runs (80% and 79% right) over the same items; prints one JSON line per mode
(plain and ``--stratified`` resampling) with the median seconds of ``--repeats`` calls to
:func:`fusion.bootstrap.paired_bootstrap`, and the interval it found.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fusion.bootstrap import paired_bootstrap  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    n, k = a.items, a.classes
    y = rng.integers(0, k, n)

    def noisy(right: float) -> np.ndarray:
        return np.where(rng.random(n) < right, y, (y + rng.integers(1, k, n)) % k)

    pred_a, pred_b = noisy(0.80), noisy(0.79)
    for stratified in (False, True):
        times, res = [], None
        for _ in range(a.repeats):
            t = time.perf_counter()
            res = paired_bootstrap(y, pred_a, pred_b, k, resamples=a.resamples, seed=a.seed,
                                   stratified=stratified)
            times.append(time.perf_counter() - t)
        print(json.dumps({"items": n, "classes": k, "resamples": a.resamples,
                          "stratified": stratified, "seconds": round(statistics.median(times), 3),
                          "all_seconds": [round(x, 3) for x in times],
                          "macro_f1": res["macro_f1"].as_dict() if res else None}), flush=True)


if __name__ == "__main__":
    main()
