"""Shared CLI plumbing: one place that turns library errors into one line + exit code 2."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from embedstore.errors import EmbedStoreError
from fusion.errors import FusionError

__all__ = ["make_app", "quiet_zarr_notes", "console", "err_console", "handle_errors", "StorageOption", "parse_storage_options",
           "Quiet", "JsonFlag", "debug_enabled"]

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

StorageOption = Annotated[
    list[str] | None,
    typer.Option("--storage-option", "-S", help="fsspec storage option KEY=VALUE for remote "
                 "stores (repeatable), e.g. -S endpoint_url=http://127.0.0.1:9000 -S anon=false"),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def debug_enabled() -> bool:
    return os.environ.get("EMBEDSTORE_DEBUG", "") not in ("", "0")


def _coerce(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for typ in (int, float):
        try:
            return typ(v)
        except ValueError:
            pass
    return v


def parse_storage_options(items: list[str] | None) -> dict[str, Any] | None:
    """``["key=value", ...]`` -> dict; ``client_kwargs.endpoint_url=...`` nests on dots."""
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"storage option {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _coerce(value)
    return out


def handle_errors(fn: F) -> F:
    """Library errors -> ``error: <message>`` on stderr and exit code 2 (traceback with
    EMBEDSTORE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except (EmbedStoreError, FusionError) as e:
            if debug_enabled():
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(e))}")
            raise typer.Exit(2) from None
        except (OSError, MemoryError) as e:
            if debug_enabled():
                raise
            err_console.print(f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def quiet_zarr_notes() -> None:
    """Zarr notes that consolidated metadata and string arrays are not yet in the Zarr v3 spec;
    the store format pins both (docs/format.md), so the CLIs do not repeat the note. The library
    sets no warning filter: this is process-wide state, the CLI's to set (both apps' callbacks)."""
    for message in (".*Consolidated metadata.*", ".*vlen-utf8.*",
                    ".*not part of the Zarr format 3.*"):
        warnings.filterwarnings("ignore", message=message)
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI prints it: one ``warning:`` line (no source line, no path)."""
    return f"warning: {message}\n"


def make_app(name: str, summary: str, examples: list[str]) -> typer.Typer:
    """A top-level app with the project's settings: help = summary + runnable examples, no shell
    completion, plain tracebacks (errors are one line via :func:`handle_errors`), and a callback
    that quiets Zarr's spec notes."""
    app = typer.Typer(
        name=name,
        help=summary + "\n\nExamples:\n\n" + "\n\n".join(f"  {e}" for e in examples),
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.callback()(quiet_zarr_notes)
    return app


def run_app(app: typer.Typer) -> None:
    """Entry point shared by both console scripts."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
