"""`fusion stack`: cross-fitted stackers over the out-of-fold probabilities of several runs.

One concept per module:

- :mod:`.inputs`       load the source runs, check that they can be combined, align their rows
- :mod:`.crossfit`     the cross-fitting loop (the only place a stacker is fitted and scores)
- :mod:`.procedure`    :func:`stack`: inputs -> cross-fit -> a run directory of kind "stack"
- :mod:`.attribution`  TreeSHAP per source run: ``contributions.csv``, summary, chart
- :mod:`.dask`         the optional Dask cluster for the GBDTs
- :mod:`.stackers`     the registry and one module per backend (ensemble, lightgbm, xgboost,
                       logreg, mlp)

Synthetic source runs for tests and docs are in :mod:`fusion.testing`; the stacker benchmark is
``examples/bench_stack.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..keyvalue import parse_key_values
from .attribution import plot_contributions, summarize_contributions
from .procedure import (
    AUTO,
    AUTO_CANDIDATES,
    DEFAULT_SEED,
    DEFAULT_STACKER,
    FEATURES,
    default_out,
    stack,
)
from .stackers import (
    Stacker,
    create_stacker,
    list_stackers,
    register_stacker,
    stacker_class,
)

__all__ = [
    "AUTO",
    "AUTO_CANDIDATES",
    "DEFAULT_SEED",
    "DEFAULT_STACKER",
    "FEATURES",
    "Stacker",
    "create_stacker",
    "default_out",
    "list_stackers",
    "parse_params",
    "plot_contributions",
    "register_stacker",
    "stack",
    "stacker_class",
    "summarize_contributions",
]


def parse_params(items: Iterable[str] | None) -> dict[str, Any]:
    """``--params`` items -> typed dict, by the one KEY=VALUE parser
    (:func:`fusion.keyvalue.parse_key_values`; keys get ``-`` -> ``_``)."""
    return parse_key_values(items, flag="--params", example="num_leaves=31")
