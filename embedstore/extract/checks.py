"""Checks run before any encoding and before anything is written: the catalog must be the
store's dataset, and a feature set that exists may only be resumed (same encoder, same layout)
or overwritten."""

from __future__ import annotations

from ..catalog import Catalog
from ..errors import FeatureExistsError, InvalidInputError
from ..store import Store
from .config import ExtractConfig

__all__ = ["check_ids", "check_feature_slot", "check_resumable"]


def check_ids(store: Store, cat: Catalog, url: str) -> None:
    """The catalog holds the store's ids in the store's order."""
    if store.n_items == len(cat) and store.ids.tolist() == cat.ids:
        return
    theirs = set(store.ids.tolist())
    extra = [i for i in cat.ids if i not in theirs][:3]
    if extra:
        why = f" (e.g. not in the store: {extra})"
    elif len(cat) == store.n_items:
        why = " (same ids, another order)"
    else:
        why = " (the catalog lacks some of the store's ids)"
    raise InvalidInputError(
        f"catalog {cat.path!r} does not match store {url!r}: {len(cat)} ids vs "
        f"{store.n_items} in the store{why}; a store holds one dataset in one id order: use a "
        "new --store for this catalog")


def check_feature_slot(store: Store, name: str, enc, config: ExtractConfig) -> None:
    """Feature set ``name`` may be written: absent, --overwrite, or --resume of the same run."""
    if store.segment_stores:  # format 2: a set needs one part per segment (not yet written)
        raise InvalidInputError(
            f"store {store.url!r} has {len(store.segment_stores)} appended segment(s); adding or "
            f"replacing feature set {name!r} on a grown store is not supported yet: extract it "
            "into a new store, or before appending")
    if name not in store.features or config.overwrite:
        return
    fs = store.features[name]
    if not config.resume:
        if fs.status == "complete":
            raise FeatureExistsError(f"feature set {name!r} is already complete in "
                                     f"{store.url!r}; pass --overwrite to replace it or "
                                     "--text-name/--image-name to store it under another name")
        raise FeatureExistsError(f"feature set {name!r} in {store.url!r} is incomplete "
                                 f"({fs.n_done}/{fs.n_items} rows); pass --resume to finish it "
                                 "or --overwrite to start again")
    check_resumable(fs.meta, name, enc)


def check_resumable(meta: dict, name: str, enc) -> None:
    """--resume must continue with the same encoder and the same layout."""
    stored = meta.get("encoder", {}).get("spec")
    if stored != enc.spec:
        raise InvalidInputError(f"--resume: feature set {name!r} was started with {stored!r}, "
                                f"not {enc.spec!r}; resume with the same spec or use --overwrite")
    want = {"modality": enc.modality, "dim": enc.dim, "pooled_dim": enc.pooled_dim}
    if enc.modality == "text":
        want["layers"] = list(enc.layers)
    else:
        want["n_regions"] = enc.n_regions
    got = {k: meta.get(k, meta.get("dim") if k == "pooled_dim" else None) for k in want}
    if got != want:
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        raise InvalidInputError(f"--resume: feature set {name!r} was started with another "
                                f"layout (stored, now): {diff}; pass the same --layers/"
                                "--image-size as before, or use --overwrite")
