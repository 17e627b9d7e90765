"""Where a training run computes: the torch device and the CPU thread count, both per run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import TrainError

__all__ = ["resolve_device", "torch_threads"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as
    given. Raises :class:`TrainError` with the fix for anything else or a missing GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise TrainError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: no CUDA device is available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N"
                         ) from None


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads = ``n`` inside the block (None: unchanged), restored after.

    Small heads on a busy CPU: extra OpenMP threads spin and wait (measured 4-30x slower).
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
