"""One registry implementation for every pluggable kind: encoder backends, fusion heads, stackers.

A :class:`Registry` maps names to objects (classes or factories). Objects arrive by the
``@registry.register("name")`` decorator or, lazily, from an entry-point group of installed
packages; :meth:`Registry.get` of an unknown name raises the registry's error type with the
available names, so every kind reports the same way::

    BACKENDS = Registry("encoder backend", error=EncoderSpecError)

    @BACKENDS.register("hf")
    def create_hf(spec, opts): ...

    BACKENDS.get("hf")        # the factory
    BACKENDS.names()          # ["hf", ...] sorted
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")
_DEFAULT_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


def _identity(name: str) -> str:
    return name.strip()


class Registry(Generic[T]):
    """Names -> objects, with registration, entry points and one "unknown name" message.

    Args:
        kind: what the registry holds, in words ("fusion head"); used in every message.
        error: the exception class raised for bad names and unknown lookups.
        entry_point_group: installed packages may add entries under this group.
        normalize: maps a user-given name to its key (e.g. lowercase, ``_`` -> ``-``).
        check: called with each object at registration; raises to refuse it.
        hint: appended to the "unknown name" message (e.g. how to pass user code).
    """

    def __init__(
        self,
        kind: str,
        *,
        error: type[Exception] = KeyError,
        entry_point_group: str | None = None,
        normalize: Callable[[str], str] = _identity,
        check: Callable[[str, Any], None] | None = None,
        name_pattern: re.Pattern[str] = _DEFAULT_NAME_RE,
        hint: str = "",
    ):
        self.kind = kind
        self.error = error
        self.entry_point_group = entry_point_group
        self.normalize = normalize
        self.check = check
        self.name_pattern = name_pattern
        self.hint = hint
        self._items: dict[str, T] = {}

    # -- registration -------------------------------------------------------------------------

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the decorated object available as ``name``.

        Registering the same object (same module and qualified name) twice is allowed, so a
        module can be re-imported; a different object under a taken name is refused.
        """
        key = self.normalize(name)
        if not self.name_pattern.match(key):
            raise self.error(
                f"{self.kind} name {name!r} is not valid; use lowercase letters, digits, '-' "
                "or '_', starting with a letter"
            )

        def decorator(obj: T) -> T:
            if self.check is not None:
                self.check(name, obj)
            old = self._items.get(key)
            if old is not None and _origin(old) != _origin(obj):
                module, qualname = _origin(old)
                raise self.error(
                    f"{self.kind} name '{key}' is already registered by {module}:{qualname}; "
                    "register yours under another name"
                )
            self._items[key] = obj
            return obj

        return decorator

    # -- lookup -------------------------------------------------------------------------------

    def entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        """Entries advertised by installed packages (not loaded)."""
        if not self.entry_point_group:
            return {}
        return {
            self.normalize(ep.name): ep
            for ep in importlib.metadata.entry_points(group=self.entry_point_group)
        }

    def names(self) -> list[str]:
        """Registered names plus entry-point names, sorted."""
        return sorted(set(self._items) | set(self.entry_points()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.normalize(name) in set(self.names())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def registered(self, name: str) -> T | None:
        """The object registered in-process under ``name`` (no entry points), or None."""
        return self._items.get(self.normalize(name))

    def get(self, name: str) -> T:
        """The object for ``name``; entry points are loaded (and registered) on first use."""
        key = self.normalize(name)
        if key in self._items:
            return self._items[key]
        eps = self.entry_points()
        if key not in eps:
            available = ", ".join(self.names()) or "(none)"
            hint = f". {self.hint}" if self.hint else ""
            raise self.error(f"unknown {self.kind} {name!r}; available: {available}{hint}")
        try:
            obj = eps[key].load()
        except Exception as exc:
            raise self.error(
                f"loading {self.kind} {name!r} from entry point {eps[key].value!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if self.check is not None:
            self.check(name, obj)
        self._items[key] = obj
        return obj


def _origin(obj: Any) -> tuple[str, str]:
    return (getattr(obj, "__module__", "?"), getattr(obj, "__qualname__", repr(obj)))
