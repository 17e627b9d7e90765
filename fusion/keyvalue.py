"""The one KEY=VALUE parser, for every ``--set`` / ``--param`` style option.

Values are typed the same way everywhere: ``true/yes/on`` -> True, ``false/no/off`` -> False,
``none/null`` -> None, then int, then float, else the string as given. Keys have ``-`` turned
into ``_`` so ``--set drop-out=0.1`` and ``--set drop_out=0.1`` agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import FusionError

__all__ = ["coerce_value", "parse_key_values"]

_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")
_NONE = ("none", "null")


def coerce_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"yes"`` -> True, ``"none"`` -> None, else the string."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    if low in _NONE:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_key_values(items: Iterable[str] | None, *, flag: str = "--set",
                     example: str = "dim=128") -> dict[str, Any]:
    """``["dim=128", "use-bias=yes"]`` -> ``{"dim": 128, "use_bias": True}``.

    Raises :class:`FusionError` naming the flag and an example for an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise FusionError(f"{flag} {item!r} is not KEY=VALUE; write e.g. {flag} {example}")
        out[key] = coerce_value(value)
    return out
