"""Issue 17: examples/make_catalog.py's harder mode; the default mode unchanged byte for byte."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "make_catalog.py"
# sha256 over (relative path, bytes) of every file that make_catalog(n=30, seed=3, n_classes=6,
# image_size=32) wrote before the harder mode existed (commit 61948f4's examples/make_catalog.py)
DEFAULT_DIGEST = "7ca22c5421426415a9bfc988e7a248a43f54173d086b367c58af7fb1a329dc56"


@pytest.fixture(scope="module")
def mc():
    spec = importlib.util.spec_from_file_location("make_catalog", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_catalog"] = module
    spec.loader.exec_module(module)
    return module


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _labels(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        return [r["label"] for r in csv.DictReader(fh)]


def test_default_mode_is_byte_identical_to_before_the_harder_mode(mc, tmp_path):
    mc.make_catalog(tmp_path / "d", n=30, seed=3, n_classes=6, image_size=32)
    assert _digest(tmp_path / "d") == DEFAULT_DIGEST


def test_harder_mode_flips_labels_within_the_family_and_weakens_more_items(mc, tmp_path):
    n = 240
    plain = _labels(mc.make_catalog(tmp_path / "p", n=n, seed=0, n_classes=6, image_size=32))
    hard = _labels(mc.make_catalog(tmp_path / "h", n=n, seed=0, n_classes=6, image_size=32,
                                   harder=True))
    flipped = [(a, b) for a, b in zip(plain, hard, strict=True) if a != b]
    assert 0.04 * n <= len(flipped) <= 0.12 * n  # P_LABEL_NOISE_HARDER = 0.08
    assert all(a.split("/")[0] == b.split("/")[0] for a, b in flipped)  # same family
    assert mc.MODE_PROBS_HARDER["both_clear"] < mc.MODE_PROBS["both_clear"]
    assert mc.main(["--out", str(tmp_path / "cli"), "--n", "12", "--classes", "6",
                    "--image-size", "32", "--harder"]) == 0


# -- the evidence table of docs/stacking.md (examples/bench_stack_cases.py) -------------------
def _cases_module():
    spec = importlib.util.spec_from_file_location(
        "bench_stack_cases", SCRIPT.parent / "bench_stack_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(case, stacker, holdout, chosen=None):
    return {"case": case, "stacker": stacker, "chosen": chosen or stacker,
            "oof_macro_f1": 0.9, "holdout_macro_f1": holdout, "fit_seconds": 1.25,
            "best_source": "hanet", "best_source_oof_macro_f1": 0.85,
            "best_source_holdout_macro_f1": 0.86, "vs_best_source": [holdout - 0.86, -0.01, 0.02]}


def test_evidence_table_keeps_the_last_row_per_case_and_stacker_in_table_order(tmp_path):
    bsc = _cases_module()
    rows = [_row("noisy", "auto", 0.5, chosen="mlp"), _row("demo", "lightgbm", 0.7),
            _row("demo", "ensemble", 0.8), _row("demo", "lightgbm", 0.9)]  # re-measured
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = bsc.markdown(bsc.load_rows(tmp_path)).splitlines()
    assert table[2:] == [
        "| demo | best source: hanet | 0.8500 | 0.8600 | | |",
        "| demo | ensemble | 0.9000 | 0.8000 | -0.0600 [-0.0100, +0.0200] | 1.2 |",
        "| demo | lightgbm | 0.9000 | 0.9000 | +0.0400 [-0.0100, +0.0200] | 1.2 |",
        "| noisy | best source: hanet | 0.8500 | 0.8600 | | |",
        "| noisy | **auto -> mlp** | 0.9000 | 0.5000 | -0.3600 [-0.0100, +0.0200] | 1.2 |",
    ]
    # the noisy cases' sources: the near-chance run replaces the image run, never a best source
    srcs, eligible = bsc.case_sources(tmp_path, "harder-noisy")
    assert [p.name for p in srcs] == ["text", bsc.NOISE_RUN, "concat", "late", "hanet"]
    assert all(p.parent == tmp_path / "harder" / "runs" for p in srcs)
    assert bsc.NOISE_RUN not in [p.name for p in eligible]
