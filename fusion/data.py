"""What a training run reads, checked before any work: labels, folds, feature sets, head options.

:func:`prepare` is the first step of both `fusion train` and `fusion train --finetune`: every
check that can fail runs here, so a bad input never leaves a half-trained run behind.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from embedstore import Store, open_store
from embedstore.format import PRESENT
from embedstore.loader import resolve_layers

from .batch import Batch
from .config import TrainConfig
from .device import resolve_device
from .errors import TrainError
from .heads import create_head, resolve_head, spec_of

__all__ = ["Setup", "prepare", "pick_features", "cached_batches", "class_weights", "inner_split",
           "rare_classes", "RareClassWarning", "drop_modalities", "availability",
           "store_availability"]


@dataclass
class Setup:
    """A checked run: the store, the head spec and dims, the feature sets and the folds."""

    store: Store
    head: Any  # what resolve_head accepts
    head_spec: str
    cfg: TrainConfig
    tfs: Any  # text FeatureSet or None
    ifs: Any  # image FeatureSet or None
    labels: np.ndarray  # (N,) int64
    classes: list[Any]
    folds: np.ndarray  # (N,) int8, -1 = holdout
    fold_ids: list[int]
    dims: dict[str, int]
    needs: frozenset[str]
    layer_sel: Any
    device: torch.device
    probe: torch.nn.Module  # a head built from the options (validated, counts parameters)
    groups: np.ndarray | None = None  # (N,) group codes of a grouped store, else None

    @property
    def hold_rows(self) -> np.ndarray:
        return np.flatnonzero(self.folds == -1)

    def fold_rows(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, validation rows) of fold ``f``: disjoint by construction."""
        return np.flatnonzero((self.folds >= 0) & (self.folds != f)), np.flatnonzero(
            self.folds == f)


def pick_features(store, text: str | None, image: str | None,
                  modalities: Iterable[str]) -> tuple[str | None, str | None]:
    """Resolve feature-set names: explicit, or the store's only one of that modality."""
    modalities = tuple(modalities)
    chosen = {"text": text, "image": image}
    for mod in ("text", "image"):
        if mod not in modalities:
            chosen[mod] = None
            continue
        if chosen[mod] is None:
            cands = [n for n in store.features if store.features[n].modality == mod]
            if not cands:
                raise TrainError(f"the head needs a {mod} feature set but store {store.url!r} "
                                 f"has none; extract one with `embedstore extract ... --{mod} "
                                 "SPEC`")
            if len(cands) > 1:
                raise TrainError(f"store {store.url!r} has several {mod} feature sets {cands}; "
                                 f"pass --{mod} NAME")
            chosen[mod] = cands[0]
        if chosen[mod] not in store.features:
            raise TrainError(f"--{mod} {chosen[mod]!r} is not a feature set of store "
                             f"{store.url!r}; it has {sorted(store.features)}")
        fs = store.features[chosen[mod]]
        if fs.modality != mod:
            raise TrainError(f"--{mod} {chosen[mod]!r} is a {fs.modality} feature set")
        fs.require_complete()
        if fs.n_items != store.n_items:
            raise TrainError(f"feature set {fs.name!r} has {fs.n_items} rows but the store has "
                             f"{store.n_items} ids; re-extract it")
    return chosen["text"], chosen["image"]


class RareClassWarning(UserWarning):
    """Some classes have fewer trainable items than folds (see :func:`rare_classes`)."""


def rare_classes(labels: np.ndarray, folds: np.ndarray, classes: list[Any], k: int
                 ) -> list[tuple[Any, int]]:
    """``(class, trainable items)`` of every class with 1..k-1 trainable items: such a class
    cannot be in every fold. It is trained on in the folds where it does not sit and scored
    where its items land (out of fold, each item is predicted by a model that never saw it, so
    a single-item class is never predicted right out of fold). A class with none (declared but
    absent, or only in the holdout) scores F1 0, as the metrics define."""
    counts = np.bincount(labels[folds >= 0], minlength=len(classes))
    return [(classes[c], int(counts[c])) for c in np.flatnonzero((counts > 0) & (counts < k))]


def _warn_rare(few: list[tuple[Any, int]], n_classes: int, k: int) -> None:
    if few:
        cls, n = min(few, key=lambda t: t[1])
        warnings.warn(f"{len(few)} of {n_classes} classes have fewer trainable items than the "
                      f"{k} folds (smallest: {cls!r} with {n}); they are trained on where they "
                      "appear and scored where they land, and metrics stay over all "
                      f"{n_classes} classes (merge rare classes to score them better)",
                      RareClassWarning, stacklevel=3)


def _takes(fn: Any, name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def prepare(store, head: Any, text: str | None, image: str | None, cfg: TrainConfig) -> Setup:
    """Every check that can fail, before any work: config, labels, feature sets, folds, head
    options."""
    cfg.check()
    if not isinstance(store, Store):
        store = open_store(store)
    if store.labels is None:
        raise TrainError(f"store {store.url!r} has no labels; extract with --label-col to train")
    head_cls = resolve_head(head)
    text, image = pick_features(store, text, image,
                                getattr(head_cls, "modalities", ("text", "image")))
    tfs = store.features[text] if text else None
    ifs = store.features[image] if image else None
    labels = store.labels.astype(np.int64)
    classes = store.classes
    folds = store.folds
    k = store.fold_info["k"]
    fold_ids = list(range(k)) if cfg.folds is None else list(range(min(cfg.folds, k)))
    if cfg.fold is not None:
        if not 0 <= cfg.fold < k:
            raise TrainError(f"--fold {cfg.fold} is outside the store's folds 0..{k - 1}")
        fold_ids = [cfg.fold]
    _warn_rare(rare_classes(labels, folds, classes, k), len(classes), k)
    layer_sel = cfg.layers if tfs is not None else None
    text_layers = len(resolve_layers(tfs.layers, layer_sel)) if tfs is not None else 1
    dims = dict(text_dim=tfs.dim if tfs else 1, image_dim=ifs.dim if ifs else 1,
                num_classes=len(classes), text_layers=text_layers)
    if _auto_fallback(head_cls, tfs, ifs, cfg):
        cfg = cfg.override(fallback=True)  # recorded with the head's options (config.json)
    probe = create_head(head, **dims, **cfg.options)  # validates options before any work
    needs = frozenset(getattr(probe, "needs", ()))
    if cfg.label_smoothing and not _takes(probe.loss, "label_smoothing"):
        raise TrainError(f"--label-smoothing {cfg.label_smoothing}: head {spec_of(head_cls)!r} "
                         "overrides loss() without a label_smoothing argument; add "
                         "`label_smoothing: float = 0.0` to its loss or drop the flag")
    for mod, fs in (("text", tfs), ("image", ifs)):
        if fs is not None and f"{mod}_pooled" in needs and fs.pooled_dim != fs.dim:
            raise TrainError(
                f"feature set {fs.name!r} has pooled vectors of width {fs.pooled_dim} (a projected "
                f"embedding) but {mod} tokens of width {fs.dim}; this head reads {mod}_pooled: "
                "pool the tokens instead with --set pool=mean (or pool=attention)")
    return Setup(store=store, head=head, head_spec=spec_of(head_cls), cfg=cfg, tfs=tfs, ifs=ifs,
                 labels=labels, classes=classes, folds=folds, fold_ids=fold_ids, dims=dims,
                 needs=needs, layer_sel=layer_sel, device=resolve_device(cfg.device),
                 probe=probe, groups=None if store.groups is None else
                 np.unique(store.groups, return_inverse=True)[1].reshape(-1))


def _auto_fallback(head_cls: Any, tfs: Any, ifs: Any, cfg: TrainConfig) -> bool:
    """``fallback`` of a bimodal head left unset: on when some training item lacks a modality
    (absent or failed in the store) or ``--modality-dropout`` removes one, so such items are
    scored by a classifier of the modality they have (docs/heads.md §6)."""
    if ("fallback" in cfg.options or tfs is None or ifs is None
            or not getattr(head_cls, "__module__", "").startswith("fusion.heads.")  # built-in
            or not getattr(head_cls, "fallback_routing", False)
            or set(getattr(head_cls, "modalities", ())) != {"text", "image"}
            or any(fs.pooled_dim != fs.dim for fs in (tfs, ifs))):
        return False
    if cfg.modality_dropout:
        return True
    return any(bool((fs.presence() != PRESENT).any()) for fs in (tfs, ifs))


def cached_batches(s: Setup, rows: np.ndarray, *, shuffle: bool = False, seed: int = 0,
                   epoch: int = 0) -> Iterator[Batch]:
    """Padded batches of the cached tensors of ``rows`` (only the fields the head reads)."""
    cfg = s.cfg
    ld = s.store.loader(rows, text=s.tfs.name if s.tfs else None,
                        image=s.ifs.name if s.ifs else None, batch_size=cfg.batch_size,
                        shuffle=shuffle, seed=seed, layers=s.layer_sel, fields=s.needs,
                        max_ram=None if cfg.max_ram_gb is None else cfg.max_ram_gb * 1e9)
    ld.set_epoch(epoch)
    for d in ld:
        yield Batch(**d)


def drop_modalities(batch: Batch, p: float, rng: np.random.Generator) -> Batch:
    """``--modality-dropout``: each row that has both modalities loses one of them (text or
    image, even odds) with probability ``p``, by setting its presence to False (the head then
    treats it as an item without that modality; the stored values stay, unread)."""
    n = batch.size
    text_ok = (np.ones(n, bool) if batch.text_present is None
               else batch.text_present.cpu().numpy().astype(bool))
    image_ok = (np.ones(n, bool) if batch.image_present is None
                else batch.image_present.cpu().numpy().astype(bool))
    drop = (rng.random(n) < p) & text_ok & image_ok
    which = rng.random(n) < 0.5  # True: the text goes, False: the image
    if not drop.any():
        return batch
    dev = batch.rows.device if batch.rows is not None else "cpu"
    return replace(batch,
                   text_present=torch.from_numpy(text_ok & ~(drop & which)).to(dev),
                   image_present=torch.from_numpy(image_ok & ~(drop & ~which)).to(dev))


def availability(s: Setup) -> tuple[np.ndarray, np.ndarray]:
    """(text_ok, image_ok): (N,) bool per store row, what each item has (presence 1). A
    modality the run does not read is taken from the store's only feature set of that modality
    (a text-only run is still broken down by which items have a photo); with none or several
    such sets every item counts as having it. For a gallery image set (several images per
    item) ``image_ok`` is (N,) int64 instead: each item's number of readable images (0 = none),
    which :func:`fusion.metrics.by_availability` also breaks down by."""
    return store_availability(s.store, s.tfs, s.ifs)


def store_availability(store: Store, tfs: Any, ifs: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`availability` of a store and the text / image feature sets a run reads (None
    for a modality it does not read)."""
    out = []
    for mod, fs in (("text", tfs), ("image", ifs)):
        if fs is None:
            cands = [n for n in store.features if store.features[n].modality == mod]
            fs = store.features[cands[0]] if len(cands) == 1 else None
        ok = np.ones(store.n_items, bool) if fs is None else fs.presence() == PRESENT
        if fs is not None and getattr(fs, "gallery", False):
            c = np.concatenate([[0], np.cumsum(fs.image_ok(), dtype=np.int64)])
            off, n = fs.offsets()[:-1], fs.n_images()
            ok = (c[off + n] - c[off]) * ok  # read images of the item's own rows (no gaps)
        out.append(ok)
    return out[0], out[1]


def class_weights(s: Setup, rows: np.ndarray) -> torch.Tensor | None:
    """Balanced class weights over ``rows`` (the rows a fold model fits) with
    ``class_weight``, else None. Never counted over the rows the model predicts."""
    if not s.cfg.class_weight:
        return None
    counts = np.bincount(s.labels[rows], minlength=len(s.classes))
    return torch.tensor(len(rows) / (len(s.classes) * np.maximum(counts, 1)),
                        dtype=torch.float32, device=s.device)


def inner_split(labels: np.ndarray, rows: np.ndarray, share: float, seed: int, fold: int,
                groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, inner validation rows) carved from a fold's training ``rows``.

    The inner rows are what every choice made while fitting the fold looks at (early stopping,
    the best epoch, ``late``'s alpha), so the rows the fold predicts are never used to select.
    ``max(1, round(share * len(rows)))`` rows, stratified by class (largest remainder; a class
    always keeps at least one fit row, and a class with 1 or 2 of these rows stays wholly in
    the fit part), drawn with a generator seeded by ``(seed, fold)``. With ``groups`` (a group
    code per store row) whole groups are drawn, never part of one: groups are stratified by the
    class of their first row and taken, in a seeded order, while a group's middle row is within
    its class's share; a group holding a row of a 1-2-row class stays in the fit part. Both
    outputs are sorted store rows.
    """
    rows = np.asarray(rows, np.int64)
    n = len(rows)
    if n < 2:
        raise TrainError(f"fold {fold} has {n} training row(s); an inner validation split needs "
                         "at least 2: use fewer --folds")
    n_inner = min(n - 1, max(1, int(round(share * n))))
    y = labels[rows]
    classes, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    y_idx = y_idx.reshape(-1)
    exact = n_inner * counts / n
    cap = np.where(counts <= 2, 0, counts - 1)  # rare classes stay in the fit part
    take = np.minimum(np.floor(exact), cap).astype(np.int64)
    for c in np.argsort(-(exact - take), kind="stable"):  # largest remainders first
        if take.sum() >= n_inner:
            break
        if take[c] < cap[c]:
            take[c] += 1
    rng = np.random.default_rng([seed % 2**32, fold])
    if groups is not None:
        inner = _grouped_inner(rows, y_idx, counts, take, np.asarray(groups)[rows], rng, fold)
    else:
        inner = np.concatenate([rng.permutation(rows[y == c])[:t]
                                for c, t in zip(classes, take, strict=True)])
        if not len(inner):  # every class has 1-2 rows: no stratified split exists
            inner = rng.choice(rows, n_inner, replace=False)
    inner = np.sort(inner)
    return np.setdiff1d(rows, inner, assume_unique=True), inner


def _grouped_inner(rows: np.ndarray, y_idx: np.ndarray, counts: np.ndarray, take: np.ndarray,
                   groups: np.ndarray, rng: np.random.Generator, fold: int) -> np.ndarray:
    """Inner rows made of whole groups (see :func:`inner_split`)."""
    unit = np.unique(groups, return_inverse=True)[1].reshape(-1)
    n_units = int(unit.max()) + 1
    if n_units < 2:
        raise TrainError(f"fold {fold}'s training rows are a single group; a grouped inner "
                         "validation split needs at least 2 groups: use fewer --folds")
    size = np.bincount(unit, minlength=n_units)
    blocked = np.zeros(n_units, bool)
    blocked[unit[counts[y_idx] <= 2]] = True
    first = np.unique(unit, return_index=True)[1]
    unit_cls = y_idx[first]
    cand = rng.permutation(np.flatnonzero(~blocked))
    cand = cand[np.argsort(unit_cls[cand], kind="stable")]  # by class, random within a class
    csum = np.cumsum(size[cand])
    starts = np.searchsorted(unit_cls[cand], np.arange(len(counts)))  # first index per class
    before = np.concatenate([[0], csum])[starts][unit_cls[cand]]
    within = csum - before  # rows taken in this class up to and including this group
    chosen = cand[within - size[cand] / 2 < take[unit_cls[cand]]]  # nearest to the share
    in_inner = np.isin(unit, chosen)
    kept = np.bincount(y_idx[~in_inner], minlength=len(counts))
    lost = np.unique(unit[in_inner & (kept[y_idx] == 0)])  # a class left without a fit row
    in_inner &= ~np.isin(unit, lost)
    if not in_inner.any():  # nothing eligible: the smallest group, so the fit part stays large
        pool = np.flatnonzero(~blocked) if (~blocked).any() else np.arange(n_units)
        in_inner = unit == pool[np.argmin(size[pool] + rng.random(len(pool)))]
    return rows[in_inner]
