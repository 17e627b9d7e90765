"""`fusion.Predictor`: a bundle (`fusion export`) applied to raw items, encoders live.

::

    from fusion import Predictor
    p = Predictor.load("model/")                      # CPU or GPU (device="auto")
    probs = p.predict([{"title": "...", "description": "...", "image": "photo.jpg"}])
    top = p.top_k(probs, 5)

Each item runs through what extraction did: its text columns HTML-stripped and joined
(:func:`embedstore.catalog.join_text`), tokenised and encoded by the encoder rebuilt from the
bundle's provenance (its weights' sha256 checked); its image decoded and transformed by the
encoder's own transform. Token states and image regions are rounded to the store's fp16 as the
cache holds them, so the fold models see what they saw in training and the probabilities equal
`fusion predict` on the same items extracted into a store, up to the encoder's batch padding.
An image that is missing or cannot be read is absent (``Batch.image_present`` False, zero
features), and so is an empty text, as presence says in the store (docs/format.md §2.5).
A bundle trained on a gallery (several images per item, docs/format.md §2.6) takes a list of
images per item (or one, or none) and builds the cache's padded, masked batch over them.

A stack bundle holds its source runs as bundles under ``sources/``: each batch is encoded once
per distinct feature configuration (encoders are shared between sources that name the same
ones), every source predicts per fold model, and the stack's saved stackers are applied as
`fusion predict` applies them (:mod:`fusion.stack.apply`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from embedstore.catalog import join_text, read_catalog
from embedstore.errors import ImageLoadError
from embedstore.extract.batches import f16
from embedstore.gallery import mean_readable, pad_gallery
from embedstore.loader import resolve_layers
from embedstore.provenance import encoder_from_feature, weights_mismatch

from .batch import Batch
from .bundle import read_bundle
from .device import resolve_device
from .predict import PredictError, fold_of, load_fold_models
from .probs import TopK
from .stack.apply import apply_stack, load_stack_models

__all__ = ["Predictor"]


class _RecordedSet:
    """The parts of a feature set that :mod:`embedstore.provenance` reads, from a bundle."""

    def __init__(self, name: str, meta: dict[str, Any]):
        self.name, self.meta = name, meta
        self.modality = meta["modality"]
        self.layers = list(meta.get("layers") or [])
        self.dim = int(meta["dim"])


class Predictor:
    """Encoders + the fold models of a head run (or a stack's saved stackers over source
    predictors); :meth:`predict` maps raw items to (N, K)."""

    def __init__(self, doc: dict[str, Any], encoders: dict[str, Any], models: list[torch.nn.Module],
                 layer_pos: list[int] | None, device: torch.device, *,
                 slots: np.ndarray | None = None, sources: Sequence[Predictor] = (),
                 stack: Any = None):
        self.doc, self.encoders, self.models = doc, encoders, models
        self.layer_pos, self.device = layer_pos, device
        self.classes: list[Any] = list(doc["classes"])
        self.slots = np.zeros(len(models), np.int64) if slots is None else slots  # fold per model
        self.sources, self.stack = list(sources), stack  # a stack bundle: sub-predictors, plan
        heads = list(self._heads())
        text = next(((h.doc["features"].get("text") or {}).get("meta") for h in heads
                     if h.doc["features"].get("text")), None) or {}
        image = next(((h.doc["features"].get("image") or {}).get("meta") for h in heads
                      if h.doc["features"].get("image")), None) or {}
        cat_t, cat_i = text.get("catalog") or {}, image.get("catalog") or {}
        self.text_cols = tuple(cat_t.get("text_cols") or ("title", "description"))
        self.image_col = cat_i.get("image_col") or "image"
        self.feature_doc = {"text": text, "image": image}
        # heads with equal features share one encoding of a batch (a stack's sources)
        self._feature_key = json.dumps([doc.get("features"), layer_pos], sort_keys=True,
                                       default=str)

    def _heads(self) -> Iterator[Predictor]:
        """Every head predictor of this bundle (itself, or its sources', recursively)."""
        if self.stack is None:
            yield self
        for s in self.sources:
            yield from s._heads()

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "auto", trust_code: bool = False,
             text_spec: str | None = None, image_spec: str | None = None,
             _encoders: dict[str, Any] | None = None) -> Predictor:
        """Read bundle ``path``; rebuild its encoders (``*_spec`` overrides where the weights
        lie; their sha256 must still match) and its fold models (or, for a stack bundle, its
        sources and stackers). User-code heads need ``trust_code``; nothing is unpickled."""
        root = Path(path)
        doc = read_bundle(root)
        shared = {} if _encoders is None else _encoders  # one encoder per set, across sources
        if doc.get("kind") == "stack":
            sources = [cls.load(root / s["path"], device=device, trust_code=trust_code,
                                text_spec=text_spec, image_spec=image_spec, _encoders=shared)
                       for s in doc["stack"]["sources"]]
            plan = SimpleNamespace(path=root, config=doc["stack"])
            return cls(doc, {}, [], None, resolve_device(device), sources=sources,
                       stack=(plan, load_stack_models(plan)))
        code = doc.get("code") or {}
        hc = dict(doc["head_config"])
        if not code.get("builtin"):
            if not trust_code:
                raise PredictError(
                    f"bundle {root} runs head code {code.get('head')!r} (file "
                    f"{code.get('source') or 'outside the bundle'}); read it, then pass "
                    "--trust-code (trust_code=True)")
            if code.get("source"):
                src = root / code["source"]
                if hashlib.sha256(src.read_bytes()).hexdigest() != code.get("sha256"):
                    raise PredictError(f"{src} differs from the code the bundle was exported "
                                       "with (sha256); re-export the bundle")
                hc["head"] = f"{src}:{code['head'].rsplit(':', 1)[1]}"
        dev = resolve_device(device)
        encoders: dict[str, Any] = {}
        layer_pos = None
        for mod, spec in (("text", text_spec), ("image", image_spec)):
            rec = doc["features"].get(mod)
            if rec is None:
                continue
            fs = _RecordedSet(rec["name"], rec["meta"])
            key = json.dumps([mod, rec["meta"].get("encoder")], sort_keys=True, default=str)
            if key not in shared:
                enc = encoder_from_feature(fs, device=str(dev), spec=spec, flag=f"--{mod}-spec")
                wm = weights_mismatch(fs, enc)
                if wm:
                    raise PredictError(f"{wm}; point --{mod}-spec at the weights the bundle "
                                       "names")
                enc.torch_module.eval()
                shared[key] = enc
            encoders[mod] = shared[key]
            if mod == "text":
                layer_pos = resolve_layers(fs.layers, doc.get("layers"))
        files = sorted((root / "weights").rglob("fold*.safetensors"))
        models = load_fold_models(hc, files, dev, trust_code=True, what=f"bundle {root}")
        folds = sorted({fold_of(f) for f in files})
        return cls(doc, encoders, models, layer_pos, dev,
                   slots=np.array([folds.index(fold_of(f)) for f in files]))

    def _features(self, texts: Sequence[str], images: Sequence[Any]) -> Batch:
        kw: dict[str, Any] = {}
        te, ie = self.encoders.get("text"), self.encoders.get("image")
        if te is not None:
            out = te.encode(te.tokenize(list(texts)))
            tok = f16(out["tokens"]).float()
            if self.layer_pos is not None:
                tok = tok[:, :, self.layer_pos]
            has = [bool(t.strip()) for t in texts]  # an empty text is absent, as extraction says
            kw.update(text_tokens=tok, text_mask=out["mask"].bool(),
                      text_pooled=out["pooled"].float(),
                      text_present=None if all(has) else torch.tensor(has))
        gallery = bool((self.doc["features"].get("image") or {}).get("meta", {}).get("gallery"))
        if ie is not None and gallery:
            kw.update(self._gallery(ie, images))
        elif ie is not None:
            if any(isinstance(src, list | tuple) for src in images):
                raise PredictError("an item lists several images, but this bundle's image "
                                   "features hold one image per item; give one image per item, "
                                   "or train on a store extracted from a gallery catalog")
            pix, ok = [], []
            for src in images:
                try:
                    if src is None or (isinstance(src, str) and not src.strip()):
                        raise ValueError("no image")  # absent in the catalog
                    pix.append(ie.load_image(src))
                    ok.append(True)
                except (ImageLoadError, TypeError, ValueError):
                    pix.append(torch.zeros(tuple(ie.input_shape)))
                    ok.append(False)
            out = ie.encode(torch.stack(pix))
            good = torch.tensor(ok, device=out["regions"].device)
            regions = f16(out["regions"]).float() * good[:, None, None]
            pooled = out["pooled"].float() * good[:, None]
            kw.update(image_regions=regions, image_pooled=pooled, image_prefix=ie.prefix_tokens,
                      image_present=None if all(ok) else good)
        return Batch(**kw).to(self.device)

    @staticmethod
    def _gallery(ie, images: Sequence[Any]) -> dict[str, Any]:
        """Every image of every item encoded once, rounded to the store's fp16, then the
        cache's padded, masked layout (:func:`embedstore.gallery.pad_gallery`); an image that
        is missing or cannot be read is masked, an item with none is absent."""
        pix, ok, counts = [], [], []
        for srcs in images:
            srcs = [] if srcs is None else list(srcs) if isinstance(srcs, list | tuple) else [srcs]
            counts.append(len(srcs))
            for src in srcs:
                try:
                    if isinstance(src, str) and not src.strip():
                        raise ValueError("no image")
                    pix.append(ie.load_image(src))
                    ok.append(True)
                except (ImageLoadError, TypeError, ValueError):
                    pix.append(torch.zeros(tuple(ie.input_shape)))
                    ok.append(False)
        if pix:
            out = ie.encode(torch.stack(pix))
            regions, pooled = f16(out["regions"]).float(), out["pooled"].float()
        else:
            regions = torch.zeros((0, ie.n_regions, ie.dim), device=ie.device)
            pooled = torch.zeros((0, ie.pooled_dim), device=ie.device)
        good = torch.tensor(ok, dtype=torch.bool, device=regions.device)
        reg, mask = pad_gallery(regions, counts, good, ie.prefix_tokens)
        item_ok = mask.any(dim=1)
        return {"image_regions": reg, "image_mask": mask,
                "image_pooled": mean_readable(pooled, counts, good),
                "image_prefix": max([1] + counts) * ie.prefix_tokens,
                "image_present": None if bool(item_ok.all()) else item_ok}

    def predict(self, items: Sequence[Mapping[str, Any]], batch_size: int = 32) -> np.ndarray:
        """(N, K) float32 probabilities for ``items``: dicts with the catalog's text columns
        (e.g. ``title``, ``description``) and image column (a path, URL or bytes)."""
        texts = [join_text([it.get(c) for c in self.text_cols]) for it in items]
        return self._predict(texts, [it.get(self.image_col) for it in items], batch_size)

    def predict_catalog(self, path: str | os.PathLike, batch_size: int = 32,
                        progress: Callable[[int, int], None] | None = None
                        ) -> tuple[list[str], np.ndarray]:
        """(ids, (N, K) probabilities) for a catalog file (CSV / Parquet / JSONL) read with the
        columns the bundle's store was extracted from."""
        text, image = self.feature_doc["text"], self.feature_doc["image"]
        cat = read_catalog(path, id_col=((text or image).get("catalog") or {}).get("id_col", "id"),
                           text_cols=self.text_cols, image_col=self.image_col, label_col=None,
                           need_text=bool(text), need_image=bool(image))
        n = len(cat.ids)
        return cat.ids, self._predict(cat.texts or [""] * n, cat.images or [None] * n,
                                      batch_size, progress)

    @torch.no_grad()
    def _predict(self, texts: Sequence[str], images: Sequence[Any], batch_size: int,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        n = len(texts)
        out = np.zeros((n, len(self.classes)), np.float32)
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            probs = self._batch_probs(texts[s:e], images[s:e], {})[0]
            out[s:e] = probs.dense() if isinstance(probs, TopK) else probs
            if progress:
                progress(e, n)
        return out

    def _batch(self, texts: Sequence[str], images: Sequence[Any], cache: dict[str, Batch]
               ) -> Batch:
        """This head's features for one batch, encoded once per distinct configuration."""
        key = self._feature_key
        if key not in cache:
            cache[key] = self._features(texts, images)
        return cache[key]

    def _batch_probs(self, texts: Sequence[str], images: Sequence[Any],
                     cache: dict[str, Batch]) -> tuple[np.ndarray, np.ndarray | None]:
        """((B, K) probabilities, (F, B, K) per fold model or None for a stack), rows
        normalised, as `fusion predict` computes them from a store."""
        if self.stack is not None:
            plan, models = self.stack
            per_fold, mean = [], []
            for src in self.sources:
                m, fp = src._batch_probs(texts, images, cache)
                mean.append(m)
                if fp is not None:
                    per_fold.append(fp)
            pooled = None
            if plan.config.get("features") == "probs+pooled":
                pooled = np.hstack([self._pooled(n, texts, images, cache)
                                    for n in plan.config.get("pooled_sets") or []])
            return apply_stack(plan, models, per_fold=per_fold, mean=mean, pooled=pooled), None
        b = self._batch(texts, images, cache)
        fp = np.zeros((int(self.slots.max()) + 1, b.size, len(self.classes)), np.float32)
        for m, s in zip(self.models, self.slots, strict=True):
            fp[s] += torch.softmax(m(b).float(), -1).cpu().numpy()
        fp /= np.bincount(self.slots).astype(np.float32)[:, None, None]
        fp /= np.maximum(fp.sum(2, keepdims=True), 1e-12)
        mean = fp.mean(0)
        return mean / np.maximum(mean.sum(1, keepdims=True), 1e-12), fp

    def _pooled(self, name: str, texts: Sequence[str], images: Sequence[Any],
                cache: dict[str, Batch]) -> np.ndarray:
        """(B, P) pooled vectors of feature set ``name`` (one of the sources' sets)."""
        for h in self._heads():
            for mod, rec in h.doc["features"].items():
                if rec and rec["name"] == name:
                    b = h._batch(texts, images, cache)
                    return getattr(b, f"{mod}_pooled").cpu().numpy()
        raise PredictError(f"the stack bundle uses the pooled vectors of {name!r}, which none "
                           "of its sources' feature sets provides; re-export it")

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[list[tuple[Any, float]]]:
        """Per item, the ``k`` most probable (class, probability), most probable first."""
        k = min(k, probs.shape[1])
        idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(probs[i, j])) for j in row] for i, row in
                enumerate(idx)]
