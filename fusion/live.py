"""Live encoders for fine-tuning: the model (encoders + head) and the raw-catalog batches.

Encoders are rebuilt from the feature sets' provenance (same spec, weights, layers and
preprocessing), so at step 0 :meth:`LiveModel.features` equals the cached tensors within fp16
storage rounding. :func:`build_live_model` unfreezes them (minus the lowest ``freeze_layers``
layer groups) and turns on gradient checkpointing where the backbone offers it. While training,
frozen parts and every BatchNorm of the encoders stay in eval mode (:func:`hold_in_eval`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from embedstore.format import PRESENT
from embedstore.gallery import mean_readable, pad_gallery
from embedstore.loader import resolve_layers
from embedstore.provenance import encoder_from_feature, weights_mismatch

from .batch import Batch
from .config import FinetuneConfig
from .data import Setup
from .errors import TrainError

__all__ = ["RawBatch", "LiveModel", "layer_groups", "freeze_lowest", "enable_checkpointing",
           "hold_in_eval", "make_trainable", "build_live_model", "RawRows", "Collate", "bucketed", "RawBatches"]


@dataclass
class RawBatch:
    """Inputs for live encoders: tokenised text and preprocessed pixels."""

    rows: torch.Tensor  # (B,)
    labels: torch.Tensor | None  # (B,)
    text: dict[str, torch.Tensor] | None  # tokenizer output (B, T)
    images: torch.Tensor | None  # (B, 3, H, W); zeros where image_present is False
    text_present: torch.Tensor | None = None  # (B,) bool, None = every row has its text
    image_present: torch.Tensor | None = None  # (B,) bool, None = every row has its image
    # galleries (several images per item): ``images`` is (M, 3, H, W), every item's images in
    # item order, ``image_counts[i]`` of item i, ``image_ok`` (M,) False for a failed image
    image_counts: torch.Tensor | None = None  # (B,) int64
    image_ok: torch.Tensor | None = None  # (M,) bool

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    def to(self, device) -> RawBatch:  # encoders move their own inputs
        return replace(self, labels=None if self.labels is None else self.labels.to(device))


class LiveModel(nn.Module):
    """Encoders + head: RawBatch -> Batch (same fields as the cache) -> logits."""

    def __init__(self, head: nn.Module, text_enc=None, image_enc=None,
                 layer_pos: list[int] | None = None,
                 present: dict[str, np.ndarray | None] | None = None,
                 gallery: tuple[np.ndarray, np.ndarray] | None = None):
        super().__init__()
        # a gallery store's (image offsets [N+1], image read [M]): a failed image stays masked
        self.gallery = gallery
        # store row -> has the modality (the cache's presence, docs/format.md §2.5), so a row
        # absent or failed at extraction is absent here too; None = every row has it
        self.present = dict(present or {})
        self.head = head
        self.text_model = text_enc.torch_module if text_enc is not None else None
        self.image_model = image_enc.torch_module if image_enc is not None else None
        self.encoders = {"text": text_enc, "image": image_enc}
        self.layer_pos = layer_pos
        self._last: Batch | None = None

    def features(self, raw: RawBatch) -> Batch:
        kw: dict[str, Any] = {"rows": raw.rows, "labels": raw.labels,
                              "text_present": raw.text_present,
                              "image_present": raw.image_present}
        te, ie = self.encoders["text"], self.encoders["image"]
        if te is not None:
            out = te.encode(raw.text)
            tok = out["tokens"].float()  # (B, T, L, D)
            if self.layer_pos is not None:
                tok = tok[:, :, self.layer_pos]
            kw.update(text_tokens=tok, text_mask=out["mask"], text_pooled=out["pooled"].float())
        if ie is not None and raw.image_counts is not None:
            kw.update(self._gallery(ie, raw))
        elif ie is not None:
            out = ie.encode(raw.images)
            kw.update(image_regions=out["regions"].float(), image_pooled=out["pooled"].float(),
                      image_prefix=ie.prefix_tokens)
        return Batch(**kw)

    @staticmethod
    def _gallery(ie, raw: RawBatch) -> dict[str, Any]:
        """Every image of every item encoded in one call, then the cache's padded, masked
        layout (:func:`embedstore.gallery.pad_gallery`) and pooled mean over read images."""
        counts = raw.image_counts.tolist()
        if sum(counts):
            out = ie.encode(raw.images)
            regions, pooled = out["regions"].float(), out["pooled"].float()
        else:  # no item of the batch has an image
            regions = torch.zeros((0, ie.n_regions, ie.dim), device=ie.device)
            pooled = torch.zeros((0, ie.pooled_dim), device=ie.device)
        reg, mask = pad_gallery(regions, counts, raw.image_ok, ie.prefix_tokens)
        return {"image_regions": reg, "image_mask": mask,
                "image_pooled": mean_readable(pooled, counts, raw.image_ok),
                "image_prefix": max([1] + counts) * ie.prefix_tokens}

    def forward(self, raw: RawBatch) -> torch.Tensor:
        self._last = self.features(raw)
        return self.head(self._last)

    def loss(self, raw: RawBatch, logits: torch.Tensor, class_weight=None, **kw: Any
             ) -> torch.Tensor:
        return self.head.loss(self._last, logits, class_weight, **kw)

    def train(self, mode: bool = True) -> LiveModel:
        """Train mode for the head and the encoders' trainable parts; frozen parts and every
        BatchNorm stay in eval mode (see :func:`hold_in_eval`)."""
        super().train(mode)
        for enc in self.encoders.values():
            if enc is not None:
                enc.trainable = mode or enc.trainable
                if mode:
                    hold_in_eval(enc.torch_module)
        return self


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def hold_in_eval(module: nn.Module) -> None:
    """Put back in eval mode, inside a training encoder, every module whose parameters are all
    frozen (its dropout off: a frozen part computes exactly what the cache holds) and every
    BatchNorm layer (running statistics keep the values the cache was extracted with; the
    affine weights still train unless frozen). Small fine-tuning batches would otherwise drift
    the statistics, and live features would stop matching the cache."""
    for m in module.modules():
        if m.training and (isinstance(m, BATCH_NORMS) or _all_frozen(m)):
            m.eval()


def _all_frozen(m: nn.Module) -> bool:
    params = list(m.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def layer_groups(module: nn.Module) -> list[list[nn.Parameter]]:
    """Encoder parameters bottom-up: [everything before the first block (embeddings / stem),
    block 0, block 1, ...]; matches hidden-state numbering (0 = embeddings)."""
    blocks = None
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList | nn.Sequential) and len(m) > 1 and name.split(".")[-1] in (
                "layer", "layers", "blocks", "resblocks", "h"):
            blocks = (name, m)
            break
    if blocks is None:
        return [list(module.parameters())]
    prefix = blocks[0] + "."
    block_ids = {id(p) for p in blocks[1].parameters()}
    before: list[nn.Parameter] = []
    for n, p in module.named_parameters():
        if n.startswith(prefix):
            break
        if id(p) not in block_ids:
            before.append(p)
    return [before] + [list(b.parameters()) for b in blocks[1]]


def freeze_lowest(module: nn.Module, n: int) -> int:
    """Freeze the lowest ``n`` layer groups (see :func:`layer_groups`); returns how many
    parameters were frozen."""
    count = 0
    for group in layer_groups(module)[:n]:
        for p in group:
            p.requires_grad_(False)
            count += p.numel()
    return count


def enable_checkpointing(module: nn.Module) -> bool:
    for attr, args in (("gradient_checkpointing_enable", ()), ("set_grad_checkpointing", (True,))):
        fn = getattr(module, attr, None)
        if callable(fn):
            try:
                fn(*args)
                return True
            except (ValueError, NotImplementedError, AssertionError):
                return False
    return False


def make_trainable(enc: Any, freeze_layers: int = 0, checkpointing: bool = False) -> Any:
    """Unfreeze ``enc``'s torch module minus its lowest ``freeze_layers`` layer groups, turn on
    gradient checkpointing if asked, and let ``encode`` build an autograd graph."""
    m = enc.torch_module
    m.requires_grad_(True)
    if freeze_layers:
        freeze_lowest(m, freeze_layers)
    if checkpointing:
        enable_checkpointing(m)
    enc.trainable = True
    return enc


def build_live_model(setup: Setup, cfg: FinetuneConfig, head: nn.Module) -> LiveModel:
    """Encoders from provenance, unfrozen (minus the lowest ``freeze_layers``), around ``head``."""
    encs: dict[str, Any] = {}
    for mod, fs, spec in (("text", setup.tfs, cfg.text_spec), ("image", setup.ifs,
                                                               cfg.image_spec)):
        if fs is None:
            continue
        enc = encoder_from_feature(fs, device=str(setup.device), precision=cfg.precision,
                                   spec=spec, flag=f"--{mod}-spec")
        wm = weights_mismatch(fs, enc)
        if wm:
            raise TrainError(f"{wm}; fine-tuning must start from the cached encoder: point "
                             f"--{mod}-spec at the original weights")
        encs[mod] = make_trainable(enc, cfg.freeze_layers, cfg.gradient_checkpointing)
    pos = resolve_layers(setup.tfs.layers, setup.layer_sel) if setup.tfs is not None else None
    present = {}
    for mod, fs in (("text", setup.tfs), ("image", setup.ifs)):
        if fs is not None:
            ok = fs.presence() == PRESENT
            present[mod] = None if ok.all() else ok
    ifs = setup.ifs
    gallery = (ifs.offsets(), ifs.image_ok()) if ifs is not None and ifs.gallery else None
    return LiveModel(head, encs.get("text"), encs.get("image"), pos, present, gallery)


class RawRows(torch.utils.data.Dataset):
    """Store row -> (row, text, preprocessed image, image loaded) from the raw catalog.

    A row with no image value, or whose image cannot be read now, gets zero pixels as a
    placeholder (so the batch stacks) and ``False``: the batch marks it absent, and heads never
    read its features (never zero pixels taken for a photo; the cached path does the same)."""

    def __init__(self, texts, images, load_image, shape, gallery: bool = False):
        self.texts, self.images, self.load, self.shape = texts, images, load_image, shape
        self.gallery = gallery  # several images per item: (k, 3, H, W) and k flags per row

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, r: int):
        text = self.texts[r] if self.texts is not None else None
        img, ok = None, False
        if self.images is not None and self.gallery:
            v = self.images[r]
            paths = [] if v is None else v if isinstance(v, list) else [v]
            loaded = [self._load(p) for p in paths]
            imgs = [torch.zeros(self.shape) if x is None else x for x in loaded]
            return (r, text, torch.stack(imgs) if imgs else torch.zeros((0, *self.shape)),
                    [x is not None for x in loaded])
        if self.images is not None:
            try:
                img = self.load(self.images[r]) if self.images[r] is not None else None
            except Exception:  # noqa: BLE001 - rows that failed at extraction fail here too
                img = None
            ok = img is not None
            if img is None:
                img = torch.zeros(self.shape)
        return r, text, img, ok

    def _load(self, path: str):
        try:
            return self.load(path)
        except Exception:  # noqa: BLE001 - an image that failed at extraction fails here too
            return None


class Collate:
    """Items of :class:`RawRows` -> one :class:`RawBatch` (texts tokenised together).

    ``present``: the store's per-row presence by modality (None = every row); an image is
    present only if the store has it *and* it loaded now."""

    def __init__(self, tokenize, labels: np.ndarray,
                 present: dict[str, np.ndarray | None] | None = None,
                 gallery: tuple[np.ndarray, np.ndarray] | None = None):
        self.tokenize, self.labels = tokenize, labels
        self.present = dict(present or {})
        self.gallery = gallery  # the store's (image offsets, image read): see LiveModel

    def __call__(self, items) -> RawBatch:
        rows = torch.tensor([it[0] for it in items], dtype=torch.long)
        text = self.tokenize([it[1] for it in items]) if self.tokenize is not None else None
        has_image = items[0][2] is not None
        r = rows.numpy()
        if has_image and isinstance(items[0][3], list):  # a gallery: every item's images
            return self._gallery(items, rows, text)
        imgs = torch.stack([it[2] for it in items]) if has_image else None
        text_ok = self.present.get("text")
        image_ok = np.array([bool(it[3]) for it in items]) if has_image else None
        if image_ok is not None and self.present.get("image") is not None:
            image_ok &= self.present["image"][r]
        return RawBatch(rows=rows, labels=torch.from_numpy(self.labels[r]), text=text,
                        images=imgs,
                        text_present=None if text_ok is None or self.tokenize is None
                        else torch.from_numpy(text_ok[r]),
                        image_present=None if image_ok is None or image_ok.all()
                        else torch.from_numpy(image_ok))


    def _gallery(self, items, rows: torch.Tensor, text) -> RawBatch:
        """Images of all items concatenated; an image is read only if it loaded now *and* at
        extraction (the store's ``image_errors``), as the cache masks it."""
        r = rows.numpy()
        ok = []
        for row, it in zip(r.tolist(), items, strict=True):
            now = np.array(it[3], dtype=bool)
            if self.gallery is not None and len(now):
                o = int(self.gallery[0][row])
                now &= self.gallery[1][o : o + len(now)]
            ok.append(now)
        counts = torch.tensor([len(x) for x in ok], dtype=torch.long)
        flat = np.concatenate(ok + [np.zeros(0, bool)])
        item_ok = np.array([bool(x.any()) for x in ok])
        text_ok = self.present.get("text")
        return RawBatch(rows=rows, labels=torch.from_numpy(self.labels[r]), text=text,
                        images=torch.cat([it[2] for it in items]), image_counts=counts,
                        image_ok=torch.from_numpy(flat),
                        text_present=None if text_ok is None or self.tokenize is None
                        else torch.from_numpy(text_ok[r]),
                        image_present=None if item_ok.all() else torch.from_numpy(item_ok))


def bucketed(rows: np.ndarray, lengths: np.ndarray | None, batch_size: int,
             rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of similar token length (less padding); shuffled when ``rng`` is given."""
    rows = rng.permutation(rows) if rng is not None else rows
    out = []
    window = batch_size * 32
    for i in range(0, len(rows), window):
        chunk = rows[i : i + window]
        if lengths is not None:
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    if rng is not None:
        out = [out[j] for j in rng.permutation(len(out))]
    return out


class RawBatches:
    """``batches(rows, rng=None)``: :class:`RawBatch` es of ``rows`` from the raw catalog for
    ``model``'s encoders, bucketed by token length (shuffled with ``rng``)."""

    def __init__(self, model: LiveModel, texts, images, lengths: np.ndarray | None,
                 labels: np.ndarray, batch_size: int, num_workers: int = 0):
        te, ie = model.encoders["text"], model.encoders["image"]
        self.rows = RawRows(texts, images, ie.load_image if ie else None,
                            tuple(ie.input_shape) if ie else None, model.gallery is not None)
        self.collate = Collate(te.tokenize if te else None, labels, model.present,
                               model.gallery)
        self.lengths, self.batch_size, self.num_workers = lengths, batch_size, num_workers

    def __call__(self, rows: np.ndarray, rng: np.random.Generator | None = None
                 ) -> Iterator[RawBatch]:
        return iter(torch.utils.data.DataLoader(
            self.rows, batch_sampler=bucketed(rows, self.lengths, self.batch_size, rng),
            collate_fn=self.collate, num_workers=self.num_workers))
