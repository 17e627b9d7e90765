"""The stacker backends (one module each) and their registry; see :mod:`.base`."""

from __future__ import annotations

from .base import (
    STACKERS,
    Stacker,
    available_cpus,
    create_stacker,
    list_stackers,
    register_stacker,
    stacker_class,
)
from .candidate import CandidateStacker
from .ensemble import EnsembleStacker
from .lightgbm import LightGBMStacker
from .loglinear import LogLinearStacker
from .logreg import LogRegStacker
from .mlp import MLPStacker
from .monotone import MonotoneLightGBMStacker
from .xgboost import XGBoostStacker

__all__ = [
    "STACKERS",
    "Stacker",
    "available_cpus",
    "create_stacker",
    "list_stackers",
    "register_stacker",
    "stacker_class",
    "CandidateStacker",
    "EnsembleStacker",
    "LightGBMStacker",
    "LogLinearStacker",
    "LogRegStacker",
    "MLPStacker",
    "MonotoneLightGBMStacker",
    "XGBoostStacker",
]
