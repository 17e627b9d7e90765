"""Smoke tests of `make bench` (examples/bench.py): the report's structure and that every ratio
is a finite number. Speed is not asserted: these run in `--quick` mode on tiny sizes."""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "bench.py"
RATIO_CELL = re.compile(r"^(\d+(?:\.\d+)?(?:e[+-]?\d+)?)x$")


def _load_bench():
    spec = importlib.util.spec_from_file_location("embedstore_bench_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path / "report" / "benchmarks.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out),
                           "--work", str(tmp_path / "work"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, out.read_text(encoding="utf-8")


def _section(md: str, num: int) -> str:
    start = md.index(f"\n## {num}. ")
    nxt = md.find("\n## ", start + 1)
    return md[start : nxt if nxt != -1 else len(md)]


def _summary_rows(md: str) -> list[list[str]]:
    body = md[md.index("## Summary") : md.index("\n## 1. ")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| ") and not line.startswith("| § ")]
    return rows


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_run_reports_every_section_with_finite_ratios(tmp_path):
    _, md = _run(tmp_path)
    for num, (_, title) in bench.SECTIONS.items():
        assert f"\n## {num}. {title}\n" in md
    for key in ("| CPU |", "| cores |", "| RAM |", "| GPU |", "load average", "torch 2",
                "lightgbm", "xgboost", "sentence-transformers", "zarr"):
        assert key in md, key
    assert "examples/bench.py --quick" in md  # the exact command is recorded
    assert "This section failed" not in md and "**error**" not in md
    rows = _summary_rows(md)
    sections_with_ratios = set()
    for num, label, ratio, goal, status in rows:
        m = RATIO_CELL.match(ratio)
        assert m, f"ratio cell {ratio!r} of {label!r} is not a number"
        value = float(m.group(1))
        assert math.isfinite(value) and value > 0, (label, value)
        assert status in ("pass", "**miss**", "info", "inconclusive"), status
        assert (goal == "—") == (status == "info"), (label, goal, status)
        sections_with_ratios.add(int(num))
    measured = set(range(1, 8)) | {9} | ({8} if torch.cuda.is_available() else set())
    assert sections_with_ratios == measured
    labels = {r[1] for r in rows}
    for head in ("hanet", "concat", "coattention", "gated-xattn"):
        assert f"{head}: live-encoder epoch / cached epoch" in labels
        assert f"| `{head}` |" in _section(md, 3)
    for label in ("text extraction / bare forward", "image extraction / bare forward",
                  "text: bytes on disk / raw fp16 payload"):
        assert label in labels
    if not torch.cuda.is_available():
        assert "no GPU on this machine" in _section(md, 8)
    png = (tmp_path / "report" / "benchmarks.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.timeout(600)
def test_sections_option_runs_only_the_chosen_sections(tmp_path):
    _, md = _run(tmp_path, "--sections", "feed")
    rows = _summary_rows(md)
    assert rows and {int(r[0]) for r in rows} == {4}
    assert "| text | store loader, in RAM |" in _section(md, 4)
    for num, (key, _) in bench.SECTIONS.items():
        if num != 4:
            assert f"Not run (select it with `--sections {key}`)" in _section(md, num)


def test_parse_sections_accepts_names_and_numbers_and_refuses_unknown_ones():
    assert bench.parse_sections("feed,1") == [1, 4]
    assert bench.parse_sections(" storage , 5 ") == [5]
    assert bench.parse_sections("all") == list(range(1, 10))
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown section 'bogus'; choose"):
        bench.parse_sections("feed,bogus")
    with pytest.raises(argparse.ArgumentTypeError, match="--sections is empty"):
        bench.parse_sections(" , ")


def test_bad_sections_option_exits_with_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--out", str(tmp_path / "b.md"), "--sections", "gpux"])
    assert exc.value.code == 2
    assert "unknown section 'gpux'" in capsys.readouterr().err
    assert not (tmp_path / "b.md").exists()


def test_ratio_status_checks_the_goal_in_its_direction():
    R = bench.Ratio
    assert R(1, "overhead", 1.10, ("<=", 1.10)).status == "pass"
    assert R(1, "overhead", 1.1001, ("<=", 1.10)).status == "**miss**"
    assert R(2, "throughput", 0.9, (">=", 0.9)).status == "pass"
    assert R(2, "throughput", 0.89, (">=", 0.9)).status == "**miss**"
    assert R(3, "no goal", 5.0).status == "info"
    assert R(3, "broken", float("nan"), (">=", 1.0)).status == "**miss**"
    assert R(2, "t", 0.9, (">=", 0.9)).goal_text == "≥ 0.9x"
    assert bench.fmt_ratio(1.0996) == "1.100x" and bench.fmt_ratio(153.4) == "153x"
    assert bench.fmt_ratio(0.00412) == "0.00412x" and bench.fmt_ratio(float("inf")) == "n/a"


def test_a_stopped_measurement_is_a_lower_bound_that_only_decides_a_clear_miss():
    R = bench.Ratio
    assert R(6, "lgb", 3.0, ("<=", 1.0), lower_bound=True).status == "**miss**"
    assert R(6, "lgb", 0.5, ("<=", 1.0), lower_bound=True).status == "inconclusive"
    assert R(3, "live", 150.0, (">=", 100.0), lower_bound=True).status == "pass"
    assert R(3, "live", 50.0, (">=", 100.0), lower_bound=True).status == "inconclusive"


def test_stacker_benchmark_child_reports_ready_then_one_json_line_per_job(tmp_path):
    # the protocol section 6 reads from examples/bench_stack.py --child (logreg: the fast one)
    import json

    jobs = [{"n_items": 150, "n_runs": 2, "n_classes": 3, "repeats": 2, "stackers": ["logreg"]}]
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "bench_stack.py"), "--child",
                           json.dumps(jobs)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "ready" and len(lines) == 2
    row = json.loads(lines[1])
    assert row["stacker"] == "logreg" and row["n_folds"] == 5 and len(row["all_seconds"]) == 2
    assert 0 < row["median_fit_seconds"] <= row["median_seconds"]
    assert row["holdout_macro_f1"] > row["best_source_holdout_macro_f1"]


def test_a_bench_run_keeps_the_scale_section_of_the_report_it_replaces(tmp_path):
    out = tmp_path / "benchmarks.md"
    assert bench.kept_scale_section(out) == ""  # no report yet
    out.write_text("# Benchmarks\n\n## 8. GPU\n\nold\n\n## Scale: N x K\n\n| a |\n|---|\n")
    kept = bench.kept_scale_section(out)
    assert kept.startswith("\n## Scale: N x K\n") and kept.endswith("|---|\n")
    assert "old" not in kept
