"""A feature set's identity: what decides whether a model trained on it may run on another set
(docs/format.md §2.7). Runs record it; `fusion predict` and bundles compare it."""

from __future__ import annotations

import hashlib
import json

__all__ = ["IDENTITY_FIELDS", "feature_identity", "identity_fingerprint"]


#: The fields of a feature set's attributes that decide whether a model trained on it may run on
#: another set (docs/format.md §2.7). ``encoder`` is reduced to what identifies the weights.
IDENTITY_FIELDS = ("modality", "kind", "dim", "pooled_dim", "dtype", "layers", "n_regions",
                   "prefix_tokens", "grid", "pooling", "preprocess", "encoder", "gallery")


def _encoder_identity(enc: dict | None) -> dict | None:
    """The weights, not where they lay: a local spec path differs between machines while the
    sha256 of the same weights does not; without a recorded sha256 the spec is the identity."""
    if not enc:
        return None
    if enc.get("weights_sha256"):
        return {"library": enc.get("library"), "name": enc.get("name"),
                "weights_sha256": enc["weights_sha256"]}
    return {"spec": enc.get("spec"), "revision": enc.get("revision")}


def feature_identity(meta: dict, fields: tuple[str, ...] = IDENTITY_FIELDS) -> dict:
    """The identity of a feature set from its attributes (``FeatureSet.meta``), restricted to
    ``fields`` that are present (format-1 sets lack some, e.g. ``gallery``)."""
    out = {}
    for key in fields:
        if key not in meta:
            continue
        out[key] = _encoder_identity(meta[key]) if key == "encoder" else meta[key]
    return out


def identity_fingerprint(identity: dict) -> str:
    """First 16 hex of SHA-256 over the canonical JSON of an identity (keys sorted)."""
    doc = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]
