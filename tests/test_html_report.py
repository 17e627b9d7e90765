"""`fusion report RUN... --html`: one self-contained page, checked in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.fusion_app import app
from fusion.html_report import confused_pairs, html_report
from fusion.rundir import write_run
from fusion.stack import stack
from fusion.testing import make_synthetic_runs

runner = CliRunner()
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """text, image, fusion (synthetic) and a LightGBM stack of them (with contributions.csv)."""
    root = tmp_path_factory.mktemp("runs")
    sources = make_synthetic_runs(root, n_items=300, n_classes=6, n_runs=3)
    st = stack(sources, stacker="lightgbm", out=root / "stack-lgbm",
               params={"n_estimators": 15, "num_leaves": 7})
    return [*sources, st.path]


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report.html"
    res = runner.invoke(app, ["report", *map(str, runs), "--html", str(out), "--top", "3"])
    assert res.exit_code == 0, res.output
    return out


def _leaderboard_names(dom: str) -> list[str]:
    table = dom.split('id="leaderboard"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr[^>]*>\s*<td[^>]*>\d+</td>\s*<td[^>]*>([^<]+)</td>", table)


def test_page_is_self_contained_with_every_section(page, runs):
    text = page.read_text()
    # nothing is fetched when the page is viewed: no external src/href/url()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(|@import""", text)
    assert _leaderboard_names(text) == ["stack-lgbm", "fusion", "image", "text"]
    for section in ("Leaderboard", "Text vs image: text / image", "Per-class F1 (holdout)",
                    "Most confused class pairs (holdout, top 3)", "Stack attributions",
                    "Configs"):
        assert f"<h2>{section}</h2>" in text, section
    assert "Δ vs stack-lgbm [95% CI]" in text and text.count("<svg") >= 2
    per_class = text.split('id="per-class"', 1)[1].split("</table>", 1)[0]
    assert per_class.count("<tr>") == 1 + 6  # header + one row per class
    assert text.count("<details") == 4 + 4  # confused pairs + config, per run
    assert "&lt;300 entries&gt;" in text  # labels collapsed to their length, not 300 values


def test_confused_pairs_are_the_top_mistakes_not_a_matrix(tmp_path):
    """40 classes: the section lists N pairs, most frequent first, with the class share."""
    k, n = 40, 400
    y = np.arange(n) % k
    pred = y.copy()
    pred[y == 3] = 7  # all 10 items of class 3 -> 7
    pred[np.flatnonzero(y == 5)[:4]] = 1  # 4 of class 5 -> 1
    pred[np.flatnonzero(y == 9)[:2]] = 0
    for c in range(10, 40):  # 30 more distinct mistakes, one item each
        pred[np.flatnonzero(y == c)[0]] = (c + 1) % k
    probs = np.eye(k, dtype=np.float32)[pred]
    classes = [f"k{c}" for c in range(k)]
    folds = np.full(n, -1)
    run = write_run(tmp_path / "r", config={"kind": "train", "head": "concat",
                                            "classes": classes, "labels": y.tolist()},
                    metrics={"head": "concat", "kind": "train"}, oof=probs[:0],
                    oof_rows=np.arange(0), holdout=probs, holdout_rows=np.arange(n),
                    ids=list(map(str, range(n))), labels=y, folds=folds, classes=classes)
    got = confused_pairs(run, "holdout", top=3)
    assert got == [{"true": "k3", "predicted": "k7", "count": 10, "share": 1.0},
                   {"true": "k5", "predicted": "k1", "count": 4, "share": 0.4},
                   {"true": "k9", "predicted": "k0", "count": 2, "share": 0.2}]
    assert len(confused_pairs(run, "holdout", top=100)) == 33  # only real mistakes
    text = html_report([run], tmp_path / "p.html", resamples=10, top=5).read_text()
    pairs = text.split("Most confused class pairs", 1)[1].split("</table>", 1)[0]
    assert pairs.count("<tr>") == 1 + 5  # the top 5, not 33 pairs nor a 40 x 40 matrix
    assert "<td class=\"l\">k3</td><td class=\"l\">k7</td>" in pairs


def test_several_runs_without_html_are_refused_in_one_line(runs):
    res = runner.invoke(app, ["report", str(runs[0]), str(runs[1])])
    assert res.exit_code == 2, res.output
    assert "2 runs given without --html" in res.output
    assert len(res.output.strip().splitlines()) == 1


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI") == "true":
        pytest.fail("no chromium in CI: .ci/run installs it (apt-get install -y chromium)")
    pytest.skip("no chromium binary on PATH (apt-get install -y chromium); CI=true fails here")


def _chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_browser(), "--headless", "--disable-gpu", "--no-sandbox",
                           "--enable-logging=stderr", "--v=0", *args, url],
                          capture_output=True, text=True, timeout=120)


def test_renders_in_headless_chromium_without_console_errors(page, tmp_path):
    res = _chromium(page.as_uri(), "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console  # a console.error or an uncaught exception shows here
    dom = res.stdout
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    assert _leaderboard_names(dom) == ["stack-lgbm", "fusion", "image", "text"]
    shot = tmp_path / "report.png"
    res = _chromium(page.as_uri(), f"--screenshot={shot}", "--window-size=1280,2000")
    assert res.returncode == 0 and shot.stat().st_size > 20_000, res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
