"""`embedstore verify --recompute K`: re-encode K random items live and compare with the cache.

This is what a team runs before trusting a store it received: it catches a changed model
revision, swapped weights, or different preprocessing, not just damaged bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .provenance import catalog_from_feature, encoder_from_feature, weights_mismatch

__all__ = ["recompute_check", "DEFAULT_TOLERANCE"]

# fp16 storage keeps ~11 significant bits: relative error <= 2**-11 per value. Anything above
# 1% of the largest cached magnitude is not storage rounding.
DEFAULT_TOLERANCE = 1e-2


def recompute_check(store, *, k: int = 8, features: list[str] | None = None, seed: int = 0,
                    tolerance: float = DEFAULT_TOLERANCE, device: str = "cpu",
                    catalog: str | None = None, specs: dict[str, str] | None = None
                    ) -> list[dict[str, Any]]:
    """One result per feature set: ``{"feature", "ok", "max_abs", "max_rel", "n", "message"}``.

    ``max_rel`` is the largest absolute difference divided by the largest cached magnitude.
    """
    results = []
    for name in features or list(store.features):
        fs = store.features[name]
        fs.require_complete()
        enc = encoder_from_feature(fs, device=device, spec=(specs or {}).get(name))
        cat = catalog_from_feature(fs, store, catalog)
        errors = fs.errors()
        rng = np.random.default_rng(seed)
        candidates = np.array([r for r in range(fs.n_items) if r not in errors])
        rows = np.sort(rng.choice(candidates, size=min(k, len(candidates)), replace=False))
        if fs.modality == "text":
            out = enc.encode(enc.tokenize([cat.texts[r] for r in rows]))
            mask = out["mask"].cpu().numpy()
            live = [out["tokens"][j].float().cpu().numpy()[mask[j]] for j in range(len(rows))]
            cached = fs.tokens_rows(rows)
            diffs = [np.abs(a - c.astype(np.float32)) for a, c in zip(live, cached, strict=True)
                     if a.shape == c.shape]
            if len(diffs) != len(rows):
                bad = sum(a.shape != c.shape for a, c in zip(live, cached, strict=True))
                results.append({"feature": name, "ok": False, "n": len(rows), "max_abs":
                                float("inf"), "max_rel": float("inf"), "message":
                                f"feature set {name!r}: {bad}/{len(rows)} items tokenise to a "
                                "different length than cached (tokenizer or text changed)"})
                continue
            max_abs = max(float(d.max()) if d.size else 0.0 for d in diffs)
            scale = max(float(np.abs(c).max()) if c.size else 0.0 for c in cached)
        else:
            import torch

            pix = torch.stack([enc.load_image(cat.images[r]) for r in rows])
            out = enc.encode(pix)
            live = out["regions"].float().cpu().numpy()
            cached = fs.regions_rows(rows).astype(np.float32)
            max_abs = float(np.abs(live - cached).max())
            scale = float(np.abs(cached).max())
        max_rel = max_abs / max(scale, 1e-12)
        ok = max_rel <= tolerance
        msg = (f"feature set {name!r}: {len(rows)} items re-encoded, max abs diff {max_abs:.3g} "
               f"(relative {max_rel:.2e}, tolerance {tolerance:g})")
        if not ok:
            msg += " — the cache does not match its encoder"
        wm = weights_mismatch(fs, enc)
        if wm:
            ok = False
            msg += f"; {wm}"
        results.append({"feature": name, "ok": ok, "n": int(len(rows)), "max_abs": max_abs,
                        "max_rel": max_rel, "message": msg})
    return results
