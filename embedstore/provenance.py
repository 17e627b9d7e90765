"""Rebuild what produced a feature set from its provenance: the encoder (same spec, weights,
layers, preprocessing) and the raw catalog. Used by `embedstore verify --recompute` and
`fusion train --finetune`."""

from __future__ import annotations

import os
from typing import Any

from .catalog import Catalog, read_catalog
from .encoders import create_encoder
from .errors import CatalogError, EmbedStoreError, EncoderSpecError

__all__ = ["ProvenanceError", "encoder_from_feature", "catalog_from_feature", "weights_mismatch"]


class ProvenanceError(EmbedStoreError, ValueError):
    """A provenance field that cannot be resolved any more (weights moved, catalog missing...)."""


def encoder_from_feature(fs, *, device: str = "cpu", precision: str | None = None,
                         spec: str | None = None, flag: str = "--spec"):
    """The encoder that produced feature set ``fs``, rebuilt from its provenance.

    ``spec`` overrides the recorded spec (e.g. weights moved to another path); the weights
    digest is still checked by :func:`weights_mismatch`.
    """
    meta = fs.meta
    recorded = meta.get("encoder", {}).get("spec")
    if not recorded and not spec:
        raise ProvenanceError(f"feature set {fs.name!r}: provenance field encoder.spec is "
                              f"missing; pass {flag} BACKEND:MODEL[@WEIGHTS]")
    use = spec or recorded
    extract = meta.get("extract") or {}
    pre = meta.get("preprocess") or {}
    kwargs: dict[str, Any] = {"modality": fs.modality, "device": device,
                              "precision": precision or "fp32",
                              "seed": int(extract.get("seed", 0))}
    if fs.modality == "text":
        kwargs["layers"] = list(fs.layers)
        kwargs["max_length"] = int(pre.get("max_length") or extract.get("max_length") or 256)
    else:
        size = extract.get("image_size")
        if size:
            kwargs["image_size"] = int(size)
    try:
        enc = create_encoder(use, **kwargs)
    except EncoderSpecError as e:
        raise ProvenanceError(f"feature set {fs.name!r}: provenance field encoder.spec={use!r} "
                              f"cannot be rebuilt ({e}); pass {flag} with the encoder's new "
                              "location") from None
    if fs.modality == "text" and list(enc.layers) != list(fs.layers):
        raise ProvenanceError(f"feature set {fs.name!r}: rebuilt encoder gives layers "
                              f"{enc.layers}, the cache has {fs.layers}")
    if enc.dim != fs.dim:
        raise ProvenanceError(f"feature set {fs.name!r}: rebuilt encoder has width {enc.dim}, "
                              f"the cache {fs.dim}; {flag} points at another model")
    return enc


def weights_mismatch(fs, enc) -> str | None:
    """A message when the rebuilt encoder's weights digest differs from the recorded one."""
    want = (fs.meta.get("encoder") or {}).get("weights_sha256")
    have = (enc.provenance().get("encoder") or {}).get("weights_sha256")
    if want and have and want != have:
        return (f"feature set {fs.name!r}: weights changed since extraction (sha256 "
                f"{have[:12]}... now, {want[:12]}... recorded in encoder.weights_sha256)")
    return None


def catalog_from_feature(fs, store, catalog: str | os.PathLike | None = None) -> Catalog:
    """The raw catalog the store was built from (``catalog`` overrides the recorded path);
    its ids must be the store's ids in the same order."""
    prov = fs.meta.get("catalog") or {}
    path = os.fspath(catalog) if catalog is not None else prov.get("path")
    if not path:
        raise ProvenanceError(f"feature set {fs.name!r}: provenance field catalog.path is "
                              "missing; pass --catalog PATH")
    try:
        cat = read_catalog(path, id_col=prov.get("id_col", "id"),
                           text_cols=tuple(prov.get("text_cols") or ("title", "description")),
                           image_col=prov.get("image_col") or "image", label_col=None,
                           need_text=fs.modality == "text", need_image=fs.modality == "image")
    except CatalogError as e:
        raise ProvenanceError(f"feature set {fs.name!r}: catalog.path={path!r} cannot be read "
                              f"({e}); pass --catalog PATH") from None
    if cat.ids != store.ids.tolist():
        raise ProvenanceError(f"catalog {path!r} does not hold the store's ids in store order; "
                              "pass --catalog with the catalog the store was extracted from")
    return cat
