"""Head registry: ``@register_head``, ``create_head``, ``list_heads``, ``resolve_head``.

Names live in one :class:`embedstore.registry.Registry` (the implementation encoders and
stackers use too). A head is found by registry name ("hanet"), by a Python file
("my_heads.py:MyHead"), by a module ("my_pkg.heads:MyHead"), or from the ``fusion.heads``
entry-point group of installed packages::

    [project.entry-points."fusion.heads"]
    my-head = "my_pkg.heads:MyHead"
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedstore.registry import Registry
from fusion.errors import HeadError
from fusion.heads.base import FusionHead, head_signature, options_of

__all__ = ["HEADS", "create_head", "head_options", "list_heads", "register_head", "resolve_head",
           "spec_of"]

ENTRY_POINT_GROUP = "fusion.heads"

HEADS: Registry[Any] = Registry(
    "head",
    error=HeadError,
    entry_point_group=ENTRY_POINT_GROUP,
    normalize=lambda name: name.strip().lower().replace("_", "-"),
    name_pattern=re.compile(r"^[a-z][a-z0-9-]*$"),
    hint="A head of your own can be given as 'path/to/file.py:ClassName' or "
    "'package.module:ClassName'",
)
_FILE_CACHE: dict[tuple[str, float], Any] = {}  # (resolved path, mtime) -> module
_SPECS: dict[Any, str] = {}  # object loaded by spec -> the spec, to write into run configs


def register_head(name: str) -> Callable[[type[FusionHead]], type[FusionHead]]:
    """Class decorator: make ``cls`` available to ``create_head(name)`` and ``fusion heads``."""
    add = HEADS.register(name)  # refuses a malformed name now

    def decorator(cls: type[FusionHead]) -> type[FusionHead]:
        if not (isinstance(cls, type) and issubclass(cls, FusionHead)):
            raise HeadError(
                f"@register_head({name!r}) decorates {cls!r}, not a FusionHead subclass"
            )
        add(cls)
        cls.name = HEADS.normalize(name)
        return cls

    return decorator


def list_heads() -> list[str]:
    """Registered head names plus those advertised by installed packages, sorted."""
    return HEADS.names()


def _load_file(path_text: str) -> Any:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise HeadError(f"head file {path_text!r} does not exist; pass 'path/to/file.py:ClassName'")
    path = path.resolve()
    key = (str(path), path.stat().st_mtime)
    if key in _FILE_CACHE:
        return _FILE_CACHE[key]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"fusion_user_heads.{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HeadError(f"cannot import {path_text!r} as a Python module; is it a .py file?")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses/pickle look classes up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise HeadError(
            f"importing head file {path_text!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    _FILE_CACHE[key] = module
    return module


def _load_object(spec: str) -> Any:
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise HeadError(
            f"head spec {spec!r} must be 'file.py:ClassName' or 'package.module:ClassName'"
        )
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _load_file(where)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise HeadError(
                f"cannot import module {where!r} for head spec {spec!r}: {exc}; is it installed "
                "or on PYTHONPATH?"
            ) from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = sorted(
                n
                for n, v in vars(module).items()
                if isinstance(v, type) and issubclass(v, FusionHead)
            )
            raise HeadError(
                f"{where!r} has no attribute {attr!r}; FusionHead classes found there: {found}"
            )
        obj = getattr(obj, part)
    return obj


def resolve_head(spec: str | type[FusionHead] | Callable[..., FusionHead]) -> Any:
    """The class (or factory) a spec names: a registry name, ``file.py:Class``,
    ``package.module:Class``, or an entry point of the ``fusion.heads`` group."""
    if not isinstance(spec, str):
        obj = spec
    elif ":" in spec:
        obj = _load_object(spec)
    else:
        obj = HEADS.get(spec)
    if isinstance(obj, FusionHead):
        raise HeadError(f"got a built head ({type(obj).__name__}); pass its class or a name")
    if isinstance(obj, type) and not issubclass(obj, FusionHead):
        raise HeadError(f"{spec!r} names {obj.__qualname__}, which is not a FusionHead subclass")
    if not callable(obj):
        raise HeadError(
            f"{spec!r} names {obj!r}, which is neither a FusionHead class nor a factory"
        )
    if isinstance(spec, str):
        try:
            _SPECS.setdefault(obj, spec)
        except TypeError:  # unhashable factory
            pass
    return obj


def head_options(name: str | type[FusionHead] | Callable[..., FusionHead]) -> dict[str, Any]:
    """Option -> default for a head (the keyword arguments beyond the four core ones).

    Options without a default map to ``inspect.Parameter.empty``.
    """
    return options_of(resolve_head(name))


def spec_of(obj: Any) -> str:
    """The string that resolves back to ``obj`` (registry name, spec used, or module:qualname)."""
    name = getattr(obj, "name", "")
    if isinstance(obj, type) and name and HEADS.registered(name) is obj:
        return name
    try:
        if obj in _SPECS:
            return _SPECS[obj]
    except TypeError:  # unhashable factory
        pass
    qualname = getattr(obj, "__qualname__", None)
    return f"{obj.__module__}:{qualname}" if qualname else repr(obj)


def create_head(
    name_or_class_or_factory: str | type[FusionHead] | Callable[..., FusionHead],
    *,
    text_dim: int,
    image_dim: int,
    num_classes: int,
    text_layers: int = 1,
    **options: Any,
) -> FusionHead:
    """Build a head; unknown options raise :class:`HeadError` naming the accepted ones.

    The built head carries ``head.config``: the spec and every option (defaults included), so
    ``create_head(c["head"], **c["dims"], **c["options"])`` rebuilds it from a run's config.json.
    """
    obj = resolve_head(name_or_class_or_factory)
    label = spec_of(obj)
    sig = head_signature(obj)
    accepted = head_options(obj)
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in options if k not in accepted]
    if unknown and not takes_var_kw:
        raise HeadError(
            f"unknown option {unknown[0]!r} for head '{label}'; accepted options: "
            f"{', '.join(accepted) or '(none)'}"
        )
    missing = [k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in options]
    if missing:
        raise HeadError(f"head '{label}' needs option(s) {missing}; pass them as keywords")
    dims = {
        "text_dim": text_dim,
        "image_dim": image_dim,
        "num_classes": num_classes,
        "text_layers": text_layers,
    }
    head = obj(**dims, **options)
    if not isinstance(head, FusionHead):
        raise HeadError(f"head factory '{label}' returned {type(head).__name__}, not a FusionHead")
    if getattr(head, "fallback", False):  # the fallback classifiers read the pooled vectors
        head.needs = frozenset(head.needs) | {"text_pooled", "image_pooled"}
    resolved = {k: v for k, v in accepted.items() if v is not inspect.Parameter.empty}
    resolved.update(options)
    head.config = {"head": label, "dims": dims, "options": resolved}
    return head
