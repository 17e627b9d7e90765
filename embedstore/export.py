"""Copy a store to HDF5 with the same layout and attributes (`embedstore export`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import h5py
import numpy as np

from .errors import InvalidInputError
from .format import ATTRS_KEY, ROOT_ARRAYS
from .zarrio import read_error

__all__ = ["export_hdf5"]


def _copy(src, dst_group, name: str, progress: Callable[[int], None] | None) -> None:
    """Chunk-row by chunk-row copy, so memory stays at one chunk row."""
    is_str = src.dtype.kind in ("U", "T", "O") or str(src.dtype).startswith("StringDType")
    dtype = h5py.string_dtype("utf-8") if is_str else src.dtype
    shape = src.shape
    chunks = (max(1, min(src.chunks[0], shape[0])),) + tuple(shape[1:]) if shape[0] else None
    ds = dst_group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
    step = max(1, src.chunks[0])
    for start in range(0, shape[0], step):
        try:
            data = np.asarray(src[start : start + step])
        except Exception as e:  # noqa: BLE001 - a damaged chunk: one line naming it
            raise read_error(src, src.path, slice(start, start + step), e) from None
        if is_str:
            data = data.astype(object)
        ds[start : start + len(data)] = data
        if progress:
            progress(len(data))


def export_hdf5(store, path: str | os.PathLike, *, features: list[str] | None = None,
                progress: Callable[[int], None] | None = None, overwrite: bool = False) -> str:
    """Write ``store`` (optionally only some feature sets) to an HDF5 file.

    Layout mirrors the Zarr store: datasets ``ids``, ``labels``, ``folds`` and
    ``features/<name>/<array>``; each group's ``embedstore`` attributes are stored as a JSON
    string attribute of the same name. The file is written to a temporary name and renamed.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise InvalidInputError(f"{path!r} exists; pass --overwrite or another --to path")
    names = list(store.features) if features is None else features
    for name in names:
        store.features[name]  # raises FeatureNotFoundError listing the available ones
    tmp = path + ".tmp"
    try:
        with h5py.File(tmp, "w") as h5:
            h5.attrs[ATTRS_KEY] = json.dumps(store.meta)
            for arr in ROOT_ARRAYS:
                if arr in store.group:
                    _copy(store.group[arr], h5, arr, progress)
            fg = h5.create_group("features")
            for name in names:
                grp = store.feature_group(name)
                g = fg.create_group(name)
                g.attrs[ATTRS_KEY] = json.dumps(dict(grp.attrs[ATTRS_KEY]))
                for arr in sorted(grp.array_keys()):
                    _copy(grp[arr], g, arr, progress)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
