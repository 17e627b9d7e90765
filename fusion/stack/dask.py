"""Dask for the GBDT stackers: connecting to a scheduler and splitting arrays over workers.

``dask.distributed`` is an optional dependency (``pip install 'embedstore-fusion[dask]'``), so it
is imported only when ``--dask`` is given.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import StackError

__all__ = ["DASK_CONNECT_TIMEOUT", "connect", "dask_array"]

DASK_CONNECT_TIMEOUT = "20s"


def connect(address: str) -> Any:
    """A ``distributed.Client`` for ``address`` (``tcp://host:8786``), or one clear StackError."""
    try:
        from distributed import Client
    except ImportError:
        raise StackError(
            "dask=... needs dask.distributed; install it with pip install 'embedstore-fusion[dask]'"
        ) from None
    try:
        return Client(address, timeout=DASK_CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise StackError(
            f"cannot reach the Dask scheduler at {address!r} ({e}); start one "
            "(`dask scheduler` + `dask worker`) or drop --dask"
        ) from None


def dask_array(X: np.ndarray, client: Any) -> Any:
    """``X`` as a dask array in one row chunk per worker of ``client``."""
    import dask.array as da

    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    rows = max(1, math.ceil(len(X) / n_workers))
    chunks = (rows,) if X.ndim == 1 else (rows, X.shape[1])
    return da.from_array(X, chunks=chunks)
