"""The documentation runs as written: the README tour, pasted line by line into a shell with the
virtual environment on PATH, and every example printed by every ``--help`` of both CLIs.

The tour runs once (module fixture) in a scratch directory with the real MiniLM and
EfficientNet-Lite0 weights; the only change to the README's text is the catalog's size
(``--n 2000`` -> 60 items, 4 classes, 64-pixel photos), so the tour takes a couple of minutes on
2 cores. Each
``--help`` example then runs in a fresh copy of the directory the tour left behind (it holds
``data/catalog.csv``, ``cat.zarr``, ``lite0.safetensors`` and ``runs/...``, the names every
example uses). Examples that talk to S3 run against the loopback moto server.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from cli.embedstore_app import app as embedstore_app
from cli.fusion_app import app as fusion_app

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOUR_SHRINK = ("--n 2000", "--n 60 --classes 4 --image-size 64")
MOTO_PLACEHOLDER = "http://127.0.0.1:9000"


def _join_continuations(lines: list[str]) -> list[str]:
    out: list[str] = []
    pending = ""
    for line in lines:
        text = line.rstrip()
        if text.endswith("\\"):
            pending += text[:-1].rstrip() + " "
            continue
        out.append((pending + text.strip()).strip())
        pending = ""
    return [c for c in out if c]


def tour_commands(readme: str) -> list[str]:
    """The shell lines of the README's tour block (comments and blank lines dropped)."""
    section = readme.split("## A 5-minute tour", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    commands = []
    for cmd in _join_continuations(lines):
        # strip a trailing comment ("  # what it does"), never a '#' inside a word
        commands.append(re.sub(r"\s{2,}#.*$", "", cmd))
    return commands


def _is_group(cmd) -> bool:
    return hasattr(cmd, "commands")  # typer ships its own click: no isinstance(click.Group)


def _commands(app: typer.Typer, prog: str) -> list[tuple[str, object]]:
    """(path, command) for the app and every (sub)command, depth first."""
    root = typer.main.get_command(app)
    found: list[tuple[str, object]] = [(prog, root)]

    def walk(cmd, path: str) -> None:
        if _is_group(cmd):
            for name, sub in cmd.commands.items():
                found.append((f"{path} {name}", sub))
                walk(sub, f"{path} {name}")

    walk(root, prog)
    return found


def help_examples() -> list[tuple[str, str]]:
    """(command, example) for every line of every command's help that starts with a program
    name, or holds one after "Example:": the examples a user copies from ``--help``."""
    out = []
    for app, prog in ((embedstore_app, "embedstore"), (fusion_app, "fusion")):
        for path, cmd in _commands(app, prog):
            text = "\n".join(t for t in (cmd.help, cmd.epilog) if t)
            lines = [ln for ln in text.splitlines() if ln.strip()]
            for line in _join_continuations(lines):
                m = re.search(r"(?:^|\bExamples?:\s+)((?:embedstore|fusion)\s.*)$", line)
                if m:
                    out.append((path, m.group(1)))
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", COLUMNS="200")
    return env


def _sh(cmd: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tour_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tour")
    (work / "examples").symlink_to(ROOT / "examples")
    readme = (ROOT / "README.md").read_text()
    for cmd in tour_commands(readme):
        if cmd.startswith("make install"):
            continue  # this test already runs inside the installed .venv (its bin/ is on PATH)
        cmd = cmd.replace(*TOUR_SHRINK)
        res = _sh(cmd, work)
        assert res.returncode == 0, (
            f"README tour line failed (exit {res.returncode}):\n  {cmd}\n{res.stdout[-2000:]}"
            f"\n{res.stderr[-3000:]}")
    return work


def test_tour_parser_finds_the_whole_tour():
    cmds = tour_commands((ROOT / "README.md").read_text())
    assert cmds[0] == "make install && source .venv/bin/activate"
    assert cmds[1].startswith("python examples/make_catalog.py")
    assert any(c.startswith("embedstore extract") for c in cmds)
    assert any(c.startswith("fusion stack") for c in cmds)
    assert all("\\" not in c and not c.startswith("#") for c in cmds)


def test_readme_tour_runs_as_written(tour_dir):
    assert (tour_dir / "cat.zarr" / "zarr.json").exists()
    runs = sorted(p.name for p in (tour_dir / "runs").iterdir() if (p / "DONE").exists())
    assert {"text", "image", "hanet"} <= set(runs), runs


EXAMPLES = help_examples()


def test_every_command_has_an_example():
    with_examples = {path for path, _ in EXAMPLES}
    leaves = [path for app, prog in ((embedstore_app, "embedstore"), (fusion_app, "fusion"))
              for path, cmd in _commands(app, prog) if not _is_group(cmd)]
    assert {"embedstore extract", "fusion train", "fusion stack"} <= set(leaves), leaves
    missing = [path for path in leaves if path not in with_examples]
    assert not missing, f"these commands' --help show no example: {missing}"


@pytest.mark.parametrize(("command", "example"), EXAMPLES,
                         ids=[f"{c}:{i}" for i, (c, _) in enumerate(EXAMPLES)])
def test_help_example_runs(command, example, tour_dir, tmp_path, request):
    work = tmp_path / "w"
    shutil.copytree(tour_dir, work, symlinks=True)
    if MOTO_PLACEHOLDER in example:
        s3 = request.getfixturevalue("s3_server")
        example = example.replace(MOTO_PLACEHOLDER, s3.endpoint)
        _create_bucket_of(example, s3.endpoint)
    res = _sh(example, work)
    assert res.returncode == 0, (
        f"`{command} --help` example failed (exit {res.returncode}):\n  {example}\n"
        f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


def _create_bucket_of(example: str, endpoint: str) -> None:
    import s3fs

    bucket = re.search(r"s3://([^/\s]+)/", example).group(1)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
