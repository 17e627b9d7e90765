"""Issue 17: examples/make_catalog.py's harder mode; the default mode unchanged byte for byte."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
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
