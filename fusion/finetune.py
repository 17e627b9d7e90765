"""`fusion train --finetune`: the same head, the same folds and run directory, with the encoders
live and (partly) trainable.

Encoders are rebuilt from the feature sets' provenance (same spec, weights, layers and
preprocessing), so at step 0 the live outputs equal the cached tensors within fp16 storage
rounding; `--init RUN_DIR` warm-starts each fold's head from the cached-feature run's weights.
Encoders and head get separate parameter groups and learning rates; the lowest N encoder layers
can be frozen; AMP + GradScaler on GPU; gradient accumulation; gradient checkpointing where the
backbone offers it; text batches bucketed by token length.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .batch import Batch
from .errors import TrainError
from .rundir import Run, RunWriter, load_run
from .train import (
    FoldResults,
    TrainConfig,
    fit_fold,
    make_optimizer,
    make_schedule,
    prepare,
    save_weights,
)

__all__ = ["FinetuneConfig", "finetune", "LiveModel", "layer_groups", "freeze_lowest",
           "build_live_model"]


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    epochs: int = 3
    batch_size: int = 16
    encoder_lr: float = 2e-5
    head_lr: float | None = None  # default: lr
    freeze_layers: int = 0
    grad_accum: int = 1
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    catalog: str | None = None
    init: str | None = None
    max_items: int | None = None  # cap training rows per fold (smoke runs, benchmarks)
    text_spec: str | None = None  # encoder moved: new spec; the weights digest is still checked
    image_spec: str | None = None
    save_encoders: bool = False
    num_workers: int = 0


@dataclass
class RawBatch:
    """Inputs for live encoders: tokenised text and preprocessed pixels."""

    rows: torch.Tensor  # (B,)
    labels: torch.Tensor | None  # (B,)
    text: dict[str, torch.Tensor] | None  # tokenizer output (B, T)
    images: torch.Tensor | None  # (B, 3, H, W)

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    def to(self, device) -> RawBatch:  # encoders move their own inputs
        return replace(self, labels=None if self.labels is None else self.labels.to(device))


class LiveModel(nn.Module):
    """Encoders + head: RawBatch -> Batch (same fields as the cache) -> logits."""

    def __init__(self, head: nn.Module, text_enc=None, image_enc=None,
                 layer_pos: list[int] | None = None):
        super().__init__()
        self.head = head
        self.text_model = text_enc.torch_module if text_enc is not None else None
        self.image_model = image_enc.torch_module if image_enc is not None else None
        self._enc = {"text": text_enc, "image": image_enc}
        self.layer_pos = layer_pos
        self._last: Batch | None = None

    def features(self, raw: RawBatch) -> Batch:
        kw: dict[str, Any] = {"rows": raw.rows, "labels": raw.labels}
        te, ie = self._enc["text"], self._enc["image"]
        if te is not None:
            out = te.encode(raw.text)
            tok = out["tokens"].float()  # (B, T, L, D)
            if self.layer_pos is not None:
                tok = tok[:, :, self.layer_pos]
            kw.update(text_tokens=tok, text_mask=out["mask"], text_pooled=out["pooled"].float())
        if ie is not None:
            out = ie.encode(raw.images)
            kw.update(image_regions=out["regions"].float(), image_pooled=out["pooled"].float(),
                      image_prefix=ie.prefix_tokens)
        return Batch(**kw)

    def forward(self, raw: RawBatch) -> torch.Tensor:
        self._last = self.features(raw)
        return self.head(self._last)

    def loss(self, raw: RawBatch, logits: torch.Tensor, class_weight=None) -> torch.Tensor:
        return self.head.loss(self._last, logits, class_weight)

    def train(self, mode: bool = True) -> LiveModel:
        super().train(mode)
        for enc in self._enc.values():
            if enc is not None:
                enc.trainable = mode or enc.trainable
        return self


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


def _enable_checkpointing(module: nn.Module) -> bool:
    for attr, args in (("gradient_checkpointing_enable", ()), ("set_grad_checkpointing", (True,))):
        fn = getattr(module, attr, None)
        if callable(fn):
            try:
                fn(*args)
                return True
            except (ValueError, NotImplementedError, AssertionError):
                return False
    return False


def build_live_model(setup, cfg: FinetuneConfig, head: nn.Module) -> LiveModel:
    """Encoders from provenance, unfrozen (minus the lowest ``freeze_layers``), around ``head``."""
    from embedstore.loader import resolve_layers
    from embedstore.provenance import encoder_from_feature, weights_mismatch

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
        m = enc.torch_module
        m.requires_grad_(True)
        if cfg.freeze_layers:
            freeze_lowest(m, cfg.freeze_layers)
        if cfg.gradient_checkpointing:
            _enable_checkpointing(m)
        enc.trainable = True
        encs[mod] = enc
    pos = resolve_layers(setup.tfs.layers, setup.layer_sel) if setup.tfs is not None else None
    return LiveModel(head, encs.get("text"), encs.get("image"), pos)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, texts, images, load_image, shape):
        self.texts, self.images, self.load, self.shape = texts, images, load_image, shape

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, r: int):
        text = self.texts[r] if self.texts is not None else None
        img = None
        if self.images is not None:
            try:
                img = self.load(self.images[r]) if self.images[r] is not None else None
            except Exception:  # noqa: BLE001 - rows that failed at extraction fail here too
                img = None
            if img is None:
                img = torch.zeros(self.shape)
        return r, text, img


class _Collate:
    def __init__(self, tokenize, labels: np.ndarray):
        self.tokenize, self.labels = tokenize, labels

    def __call__(self, items) -> RawBatch:
        rows = torch.tensor([r for r, _, _ in items], dtype=torch.long)
        text = self.tokenize([t for _, t, _ in items]) if self.tokenize is not None else None
        imgs = torch.stack([i for _, _, i in items]) if items[0][2] is not None else None
        return RawBatch(rows=rows, labels=torch.from_numpy(self.labels[rows.numpy()]),
                        text=text, images=imgs)


def _bucketed(rows: np.ndarray, lengths: np.ndarray | None, batch_size: int,
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


def finetune(store, head: Any = "concat", *, text: str | None = None, image: str | None = None,
             out: str | os.PathLike | None = None, config: FinetuneConfig | None = None,
             progress: Callable[[dict[str, Any]], None] | None = None, name: str | None = None,
             **overrides: Any) -> Run:
    """End-to-end training of encoders + head on the raw catalog, fold by fold."""
    from embedstore.provenance import catalog_from_feature

    from .heads import create_head

    cfg = config or FinetuneConfig()
    fields_ = {k: v for k, v in overrides.items() if k in FinetuneConfig.__dataclass_fields__}
    opts = {k: v for k, v in overrides.items() if k not in FinetuneConfig.__dataclass_fields__}
    cfg = replace(cfg, **fields_, options={**cfg.options, **opts})
    if cfg.grad_accum < 1:
        raise TrainError(f"--grad-accum must be >= 1, got {cfg.grad_accum}")
    if cfg.precision not in ("fp32", "fp16", "bf16"):
        raise TrainError(f"--precision must be fp32, fp16 or bf16, got {cfg.precision!r}")
    s = prepare(store, head, text, image, cfg)
    init = None
    if cfg.init:
        init = load_run(cfg.init)
        if init.store_fingerprint != s.store.fingerprint:
            raise TrainError(f"--init {cfg.init!r} was trained on another store; warm-start "
                             "from a run of this store")
        if init.head != s.head_spec or init.config.get("head_config", {}).get("dims") != s.dims:
            raise TrainError(f"--init {cfg.init!r} is a {init.head!r} head with dims "
                             f"{init.config.get('head_config', {}).get('dims')}; this run is "
                             f"{s.head_spec!r} with {s.dims}: use the same head and features")
        missing = [f for f in s.fold_ids if not (init.path / f"weights/fold{f}.safetensors")
                   .exists()]
        if missing:
            raise TrainError(f"--init {cfg.init!r} has no weights for fold(s) {missing}; train "
                             "those folds on the cache first (or pass --fold)")
    cats = {mod: catalog_from_feature(fs, s.store, cfg.catalog)
            for mod, fs in (("text", s.tfs), ("image", s.ifs)) if fs is not None}
    texts = cats["text"].texts if "text" in cats else None
    images = cats["image"].images if "image" in cats else None
    lengths = s.tfs.lengths() if s.tfs is not None else None
    writer = RunWriter(out) if out is not None else None
    use_amp = s.device.type == "cuda" and cfg.precision != "fp32"
    amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    t_run = time.perf_counter()
    results = FoldResults(s)
    try:
        for f in s.fold_ids:
            torch.manual_seed(cfg.seed * 1000 + f)
            head_m = create_head(head, **s.dims, **cfg.options)
            if init is not None:
                from safetensors.torch import load_file

                head_m.load_state_dict(load_file(init.path / f"weights/fold{f}.safetensors"))
            model = build_live_model(s, cfg, head_m).to(s.device)
            te, ie = model._enc["text"], model._enc["image"]
            ds = _Rows(texts, images, ie.load_image if ie else None,
                       tuple(ie.input_shape) if ie else None)
            collate = _Collate(te.tokenize if te else None, s.labels)

            def batches(rows: np.ndarray, rng=None, ds=ds, collate=collate) -> Iterator[RawBatch]:
                sampler = _bucketed(rows, lengths, cfg.batch_size, rng)
                yield from torch.utils.data.DataLoader(
                    ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)

            tr_rows, va_rows = s.fold_rows(f)
            if cfg.max_items is not None and len(tr_rows) > cfg.max_items:
                tr_rows = np.sort(np.random.default_rng(cfg.seed + f).choice(
                    tr_rows, cfg.max_items, replace=False))
            head_params = list(model.head.parameters())
            enc_params = [p for m in (model.text_model, model.image_model) if m is not None
                          for p in m.parameters()]
            opt = make_optimizer([{"params": head_params, "lr": cfg.head_lr or cfg.lr,
                                   "name": "head"},
                                  {"params": enc_params, "lr": cfg.encoder_lr,
                                   "name": "encoders"}], cfg.weight_decay)
            steps = cfg.epochs * max(1, -(-len(tr_rows) // (cfg.batch_size * cfg.grad_accum)))
            sched = make_schedule(opt, steps, cfg.warmup)
            scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 \
                else None
            fit = fit_fold(
                model, opt, sched,
                train_batches=lambda ep, r=tr_rows, f=f: batches(
                    r, np.random.default_rng((cfg.seed, f, ep))),
                val_batches=lambda r=va_rows: batches(r), labels=s.labels, cfg=cfg,
                device=s.device, fold=f, progress=progress, grad_accum=cfg.grad_accum,
                scaler=scaler, step0=init is not None,
                autocast=(lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else None)
            fit_end = model.head.on_fit_end(
                lambda r=va_rows, m=model: (m.features(b.to(s.device)) for b in batches(r))) or {}
            results.add(f, model, batches, va_rows, fit, fit_end, step0=fit.get("step0"),
                        train_items=int(len(tr_rows)),
                        lr={g.get("name", "?"): g.get("initial_lr", g["lr"])
                            for g in opt.param_groups})
            save_weights(writer, f"fold{f}", model.head)
            if cfg.save_encoders:
                for mod in ("text", "image"):
                    m = getattr(model, f"{mod}_model")
                    if m is not None:
                        save_weights(writer, f"fold{f}-{mod}-encoder", m)
        return results.write(writer, kind="finetune", train_seconds=time.perf_counter() - t_run,
                             name=name, extra_config={"finetune": {
                                 "init": cfg.init,
                                 "catalog": {m: c.path for m, c in cats.items()}}})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
