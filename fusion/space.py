"""The `fusion sweep --space` grammar: what a study searches, one dimension per word.

``"dim=64,128,256 dropout=0.0:0.5 lr=1e-4:3e-3:log"``: ``name=a,b,c`` is categorical (values
typed as ``--set`` types them, :func:`fusion.keyvalue.coerce_value`), ``name=lo:hi`` uniform,
``name=lo:hi:log`` log-uniform; a range is over integers when both ends are integers, else over
floats. A name is a training option when it is a field of :class:`fusion.config.TrainConfig`
(``lr``, ``weight_decay``, ``epochs``, ``batch_size``, ``label_smoothing``...), else an option of
the head; any other name is refused in one line listing the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from .config import TrainConfig
from .errors import TrainError
from .keyvalue import coerce_value

__all__ = ["Dimension", "Space", "parse_space", "SEARCHABLE_TRAIN", "EXAMPLE"]

EXAMPLE = "dim=64,128,256 dropout=0.0:0.5 lr=1e-4:3e-3:log"
# TrainConfig fields a trial may vary; the others (device, folds, seeds, threads...) say how
# and where the sweep runs, not what a trial is
SEARCHABLE_TRAIN = tuple(k for k in TrainConfig.__dataclass_fields__ if k not in (
    "seed", "seeds", "device", "layers", "folds", "fold", "max_ram_gb", "threads", "options"))


@dataclass(frozen=True)
class Dimension:
    """One searched name: ``choices`` (categorical) or ``low``..``high`` (``log``, ``integer``)."""

    name: str
    train: bool  # a TrainConfig field (else a head option)
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name}=" + ",".join(str(c) for c in self.choices)
        return f"{self.name}={self.low}:{self.high}" + (":log" if self.log else "")


@dataclass(frozen=True)
class Space:
    """The parsed ``--space``: dimensions in the order given."""

    dims: tuple[Dimension, ...]

    def suggest(self, trial: optuna.Trial) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(training overrides, head options)`` for ``trial``."""
        return self.split({d.name: d.suggest(trial) for d in self.dims})

    def split(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A trial's ``params`` -> ``(training overrides, head options)``."""
        train = {d.name for d in self.dims if d.train}
        return ({k: v for k, v in params.items() if k in train},
                {k: v for k, v in params.items() if k not in train})

    def describe(self) -> str:
        return " ".join(d.describe() for d in self.dims)


def parse_space(text: str, head_options: dict[str, Any] | list[str], head: str = "the head"
                ) -> Space:
    """Parse ``--space`` for a head whose options are ``head_options`` (names), or raise
    :class:`TrainError` naming the word and the fix."""
    words = text.split()
    if not words:
        raise TrainError(f"--space is empty; pass e.g. --space \"{EXAMPLE}\"")
    options = sorted(head_options)
    dims: list[Dimension] = []
    for word in words:
        name, sep, value = word.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name or not value:
            raise TrainError(f"--space word {word!r} is not NAME=VALUES; write e.g. "
                             f"--space \"{EXAMPLE}\"")
        if name in (d.name for d in dims):
            raise TrainError(f"--space names {name!r} twice; give each name once")
        is_train = name in SEARCHABLE_TRAIN
        if not is_train and name not in options:
            raise TrainError(
                f"--space {name!r} is neither a training option nor an option of {head}; "
                f"training options: {', '.join(SEARCHABLE_TRAIN)}; head options: "
                f"{', '.join(options) or '(none)'}")
        dims.append(_dimension(word, name, value, is_train))
    return Space(tuple(dims))


def _dimension(word: str, name: str, value: str, is_train: bool) -> Dimension:
    if ":" not in value:
        choices = tuple(coerce_value(v) for v in value.split(",") if v.strip())
        if not choices:
            raise TrainError(f"--space word {word!r} has no values; write e.g. {name}=a,b,c")
        if len(set(map(repr, choices))) != len(choices):
            raise TrainError(f"--space word {word!r} repeats a value; list each value once")
        return Dimension(name, is_train, choices=choices)
    parts = value.split(":")
    log = len(parts) == 3 and parts[2].strip().lower() == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise TrainError(f"--space word {word!r} is not a range lo:hi or lo:hi:log; write "
                         f"e.g. {name}=1e-4:3e-3:log")
    ends = [coerce_value(p) for p in parts[:2]]
    if not all(isinstance(e, int | float) and not isinstance(e, bool) for e in ends):
        raise TrainError(f"--space word {word!r}: the ends of a range must be numbers, got "
                         f"{parts[0]!r} and {parts[1]!r}")
    low, high = ends
    if not low < high:
        raise TrainError(f"--space word {word!r}: the range needs lo < hi, got {low} and {high}")
    if log and low <= 0:
        raise TrainError(f"--space word {word!r}: a log range needs lo > 0, got {low}")
    integer = all(isinstance(e, int) for e in ends)
    return Dimension(name, is_train, low=low, high=high, log=log, integer=integer)
