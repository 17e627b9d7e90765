"""Errors raised by the fusion library; the CLI maps each to one line and exit code 2."""

from __future__ import annotations

__all__ = ["FusionError", "RunDirError", "HeadError", "StackError", "TrainError"]


class FusionError(Exception):
    """Base class: the message says what was wrong, the value, and the fix."""


class RunDirError(FusionError):
    """A run directory is missing, incomplete or malformed."""


class HeadError(FusionError, ValueError):
    """Unknown head, bad head option, or a head that breaks the contract."""


class StackError(FusionError, ValueError):
    """Stacker inputs that cannot be combined (different stores/folds, bad blocks...)."""


class TrainError(FusionError, ValueError):
    """Training inputs that cannot be used (no labels, incomplete feature set...)."""
