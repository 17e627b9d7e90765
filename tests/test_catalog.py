"""Tests for the sample catalog generator (examples/make_catalog.py); no encoders needed."""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "make_catalog.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("make_catalog", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_catalog"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


mc = _load_module()

N = 600  # the size the fusion tests and the demo's quick mode use
COLUMNS = ["id", "title", "description", "image", "label"]


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def _strip_html(s: str) -> str:
    return re.sub(r"<[^>]+>", " ", s).strip()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("catalog")
    path = mc.make_catalog(out, n=N, seed=0)
    return path, _rows(path)


@pytest.fixture(scope="module")
def labels(catalog) -> tuple[list[str], np.ndarray]:
    _, rows = catalog
    names = sorted({r["label"] for r in rows})
    return names, np.array([names.index(r["label"]) for r in rows])


def _cv_predict(x, y, c: float = 1.0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return cross_val_predict(LogisticRegression(max_iter=3000, C=c), x, y, cv=folds)


# ------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_csv_and_png_bytes(tmp_path):
    a = mc.make_catalog(tmp_path / "a", n=40, seed=7, image_size=64)
    b = mc.make_catalog(tmp_path / "b", n=40, seed=7, image_size=64)
    assert a.read_bytes() == b.read_bytes()
    pngs_a = sorted((tmp_path / "a" / "images").glob("*.png"))
    assert len(pngs_a) == 40
    for p in pngs_a:
        assert p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes(), p.name


def test_different_seed_gives_different_titles_labels_and_images(tmp_path):
    a = _rows(mc.make_catalog(tmp_path / "a", n=40, seed=1, image_size=64))
    b = _rows(mc.make_catalog(tmp_path / "b", n=40, seed=2, image_size=64))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert sum(x["title"] != y["title"] for x, y in zip(a, b, strict=True)) > 30
    assert [r["label"] for r in a] != [r["label"] for r in b]
    same_png = sum(
        (tmp_path / "a" / x["image"]).read_bytes() == (tmp_path / "b" / y["image"]).read_bytes()
        for x, y in zip(a, b, strict=True)
    )
    assert same_png == 0


# ----------------------------------------------------------------------------- content


def test_catalog_has_one_row_per_item_with_unique_sku_ids(catalog):
    path, rows = catalog
    assert path.name == "catalog.csv"
    assert len(rows) == N
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == N
    assert all(re.fullmatch(r"SKU-\d{6}", i) for i in ids)
    assert all(r["image"] == f"images/{r['id']}.png" for r in rows)
    assert all(r["title"].strip() for r in rows)


def test_every_class_is_present_balanced_and_readable(catalog):
    _, rows = catalog
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    assert sorted(counts) == sorted(mc.class_labels(24))
    assert set(counts.values()) == {N // 24}
    assert all(re.fullmatch(r"[a-z]+/[a-z-]+", label) for label in counts)


def test_class_count_follows_n_classes(tmp_path):
    rows = _rows(mc.make_catalog(tmp_path, n=60, seed=0, n_classes=20, image_size=32))
    assert {r["label"] for r in rows} == set(mc.class_labels(20))
    assert len(set(mc.class_labels(20))) == 20


def test_about_a_third_of_descriptions_are_missing_and_the_rest_are_html(catalog):
    _, rows = catalog
    missing = [not _strip_html(r["description"]) for r in rows]
    assert 0.25 <= np.mean(missing) <= 0.45
    present = [r["description"] for r, m in zip(rows, missing, strict=True) if not m]
    assert all(d.startswith("<p>") for d in present)
    assert any("<ul><li>" in d for d in present)
    assert any("<b>" in d for d in present)


def test_images_decode_as_rgb_at_the_requested_size(catalog, tmp_path):
    path, rows = catalog
    for r in rows:
        with Image.open(path.parent / r["image"]) as im:
            assert im.format == "PNG"
            assert (im.mode, im.size) == ("RGB", (128, 128)), r["image"]
    small = mc.make_catalog(tmp_path, n=24, seed=0, image_size=48)
    for r in _rows(small):
        with Image.open(tmp_path / r["image"]) as im:
            assert im.size == (48, 48)


# ------------------------------------------------------------------------ complementarity
# Cheap stand-ins for the real encoders (numbers with those are in the module docstring).
# Bounds come from measurements at n=600, seeds 0-5, with wide margins: title bag-of-words
# 0.735-0.775 (family 0.935-0.96), colour histograms 0.41-0.47; missing descriptions 0.33-0.36.


def test_titles_identify_the_family_but_not_always_the_class(catalog, labels):
    from sklearn.feature_extraction.text import CountVectorizer

    _, rows = catalog
    names, y = labels
    family = np.array([n.split("/")[0] for n in names])
    x = CountVectorizer(binary=True, ngram_range=(1, 2)).fit_transform([r["title"] for r in rows])
    pred = _cv_predict(x, y)
    accuracy = np.mean(pred == y)
    family_accuracy = np.mean(family[pred] == family[y])
    assert 0.62 <= accuracy <= 0.86  # chance is 1/24; a ceiling because nouns are ambiguous
    assert family_accuracy >= 0.88  # most errors are between variants of one family
    assert family_accuracy - accuracy >= 0.1


def test_colour_histograms_carry_some_but_not_all_class_information(catalog, labels):
    path, rows = catalog
    names, y = labels
    bins = 4
    feats = []
    for r in rows:
        with Image.open(path.parent / r["image"]) as im:
            a = np.asarray(im.convert("RGB")) // (256 // bins)
        idx = (a[..., 0].astype(int) * bins + a[..., 1]) * bins + a[..., 2]
        feats.append(np.bincount(idx.ravel(), minlength=bins**3) / idx.size)
    pred = _cv_predict(np.sqrt(np.array(feats)), y, c=10.0)
    accuracy = np.mean(pred == y)
    assert 0.28 <= accuracy <= 0.62  # chance is 1/24; shapes are invisible to a histogram


# ------------------------------------------------------------------------------ errors, CLI


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 10}, r"n must be an integer in \[24, .*got 10"),
        ({"n_classes": 99}, r"n_classes must be an integer in \[2, 36\], got 99"),
        ({"image_size": 8}, r"image_size must be an integer in \[32, 1024\], got 8"),
        ({"seed": -1}, r"seed must be an integer .*got -1"),
        ({"n": 100.0}, r"n must be an integer .*got 100\.0"),
    ],
)
def test_make_catalog_rejects_bad_arguments_with_the_value(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mc.make_catalog(tmp_path, **kwargs)
    assert not (tmp_path / "catalog.csv").exists()


def test_cli_writes_the_catalog_and_prints_one_summary_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--out",
            str(tmp_path),
            "--n",
            "30",
            "--seed",
            "3",
            "--classes",
            "6",
            "--image-size",
            "40",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "30 items" in lines[0] and "catalog.csv" in lines[0]
    rows = _rows(tmp_path / "catalog.csv")
    assert len(rows) == 30 and len({r["label"] for r in rows}) == 6
    direct = mc.make_catalog(tmp_path / "direct", n=30, seed=3, n_classes=6, image_size=40)
    assert direct.read_bytes() == (tmp_path / "catalog.csv").read_bytes()


def test_cli_reports_a_bad_argument_in_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--n", "5"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: n must be an integer in [24, 10000000], got 5; pass one in range"
    )
    assert "Traceback" not in proc.stderr


def test_long_tail_gives_a_few_classes_ten_times_the_items(tmp_path):
    rows = _rows(mc.make_catalog(tmp_path, n=204, seed=0, n_classes=24, image_size=32,
                                 long_tail=True))
    counts = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    sizes = sorted(counts.values(), reverse=True)
    assert len(rows) == 204 and len(counts) == 24  # every class present
    assert sizes[:3] == [40, 40, 40] and set(sizes[3:]) == {4}  # 3 head classes, 10x
    heads = sorted((lab for lab, c in counts.items() if c == 40),
                   key=mc.class_labels(24).index)
    assert [mc.class_labels(24).index(h) for h in heads] == [0, 8, 16]  # spread over families
    balanced = _rows(mc.make_catalog(tmp_path / "b", n=48, seed=0, image_size=32))
    assert {sum(r["label"] == lab for r in balanced) for lab in mc.class_labels(24)} == {2}
