"""The exclusive creation of a feature set's group (docs/format.md §9), for the writer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _storage
from .errors import FeatureExistsError
from .format import group_document

if TYPE_CHECKING:
    from .store import Store

__all__ = ["claim_group"]


def claim_group(store: Store, name: str, path: str, meta: dict, *, replace: bool) -> None:
    """Write the group's ``zarr.json`` exclusively, then clear anything else under ``path``.

    ``replace`` (an overwrite's ``.<name>.new``): a pending replacement left by an interrupted
    or concurrent ``--overwrite`` is deleted first. Two *concurrent* overwrites of one set are
    not supported (the later one deletes the earlier one's pending data; the earlier one then
    stops at its next block with :class:`FeatureChangedError`).
    """
    url, so = store.url, store.storage_options
    doc = group_document(meta)
    with _storage.io_errors(lambda why: f"cannot create feature set {name!r} in {url!r}: "
                            f"{why}; check permissions and free space"):
        try:
            if replace:
                _storage.remove_prefix(url, so, path)
            _storage.test_pause("claim")
            _storage.put_exclusive(url, so, f"{path}/zarr.json", doc)
        except FileExistsError:
            raise FeatureExistsError(
                f"feature set {name!r} in {url!r} is being created by another writer (its "
                "group appeared between our check and our create); wait for it and use "
                "--resume to join it, or pick another name") from None
    _storage.remove_prefix(url, so, path, keep=("zarr.json",))  # leftovers of a dead writer
