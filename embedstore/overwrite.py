"""Finishing an ``--overwrite``: the complete replacement ``features/.<name>.new`` is swapped
into place (see :func:`embedstore._storage.swap_group` and docs/format.md §8). Idempotent, so a
second rank, or the next writer after a crash, finishes a swap that was interrupted."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from . import _storage
from .format import ATTRS_KEY
from .zarrio import io_call

if TYPE_CHECKING:  # annotations only
    from .store import Store

__all__ = ["finish_swap", "finish_interrupted_swaps"]


def finish_swap(store: Store, name: str) -> None:
    """Move the complete replacement ``features/.<name>.new`` into place. Idempotent: a swap
    that another process finished, or that was interrupted, is finished or left as is."""
    url, so = store.url, store.storage_options
    src, dst = f"features/.{name}.new", f"features/{name}"
    try:
        raw = _storage.read(url, so, f"{src}/zarr.json")
    except FileNotFoundError:
        return  # nothing pending: already swapped
    doc = json.loads(raw)
    # object stores: readers meanwhile see the new generation with status 'writing'
    doc["attributes"][ATTRS_KEY]["status"] = "writing"
    try:
        _storage.swap_group(url, so, src, dst, placeholder=json.dumps(doc).encode())
    except FileNotFoundError:
        if _storage.exists(url, so, f"{src}/zarr.json"):
            raise  # a real failure, not a concurrent completion


def finish_interrupted_swaps(store: Store) -> list[str]:
    """Complete every replacement that was finalised but not swapped in (the writer died
    between the two steps). Called when a store is opened for writing."""
    try:
        grp = store.location.open_group("features")
        names = [k for k in grp.group_keys() if k.startswith(".") and k.endswith(".new")]
    except Exception:  # noqa: BLE001 - nothing to repair in a store we cannot list
        return []
    for key in [k for k in grp.group_keys() if k.startswith(".") and k.endswith(".old")]:
        if key[1 : -len(".old")] in grp.group_keys():  # a swap finished but did not clean up
            _storage.remove_prefix(store.url, store.storage_options, f"features/{key}")
    done = []
    for key in names:
        try:
            meta = grp[key].attrs.get(ATTRS_KEY) or {}
        except Exception:  # noqa: BLE001
            continue
        if meta.get("status") == "complete":
            name = key[1 : -len(".new")]
            io_call(lambda name=name: finish_swap(store, name),
                f"finish the interrupted --overwrite of feature set {name!r} in {store.url!r}")
            done.append(name)
    if done:
        store.consolidate()
    return done
