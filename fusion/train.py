"""`fusion train`: k-fold training of a fusion head on cached tensors.

One model per store fold: train on the other folds, early-stop on this fold's macro-F1, predict
this fold (out-of-fold) and the holdout. Out-of-fold probabilities for every trainable item plus
the fold-mean holdout probabilities are what every stacker consumes, leak-free.
The loop reads top to bottom: data -> model -> optimiser/schedule -> epochs -> predictions.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from .batch import Batch
from .errors import TrainError
from .rundir import Run, RunWriter, load_run

__all__ = ["TrainConfig", "train", "pick_features", "metrics_of"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a `fusion train` run depends on (written to config.json)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup: float = 0.1
    patience: int = 6
    seed: int = 0
    device: str = "auto"
    layers: str | None = None  # cached text layers to feed (None = all cached)
    folds: int | None = None  # train the first N store folds (None = all)
    fold: int | None = None  # train only this fold
    max_ram_gb: float | None = 8.0
    class_weight: bool = False
    grad_clip: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # head options (--set key=value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def pick_features(
    store, text: str | None, image: str | None, modalities: Iterable[str]
) -> tuple[str | None, str | None]:
    """Resolve feature-set names: explicit, or the store's only one of that modality."""
    modalities = tuple(modalities)
    chosen = {"text": text, "image": image}
    for mod in ("text", "image"):
        if mod not in modalities:
            chosen[mod] = None
            continue
        if chosen[mod] is None:
            cands = [n for n in store.features if store.features[n].modality == mod]
            if len(cands) != 1:
                raise TrainError(
                    f"the head needs a {mod} feature set; store {store.url!r} has "
                    f"{cands or 'none'}: pass --{mod} NAME"
                    if cands
                    else f"the head needs a {mod} feature set but store {store.url!r} has none; "
                    f"extract one with `embedstore extract ... --{mod} SPEC`"
                )
            chosen[mod] = cands[0]
        fs = store.features[chosen[mod]]
        if fs.modality != mod:
            raise TrainError(f"--{mod} {chosen[mod]!r} is a {fs.modality} feature set")
        fs.require_complete()
        if fs.n_items != store.n_items:
            raise TrainError(
                f"feature set {fs.name!r} has {fs.n_items} rows but the store has "
                f"{store.n_items} ids; re-extract it"
            )
    return chosen["text"], chosen["image"]


def metrics_of(
    y: np.ndarray, probs: np.ndarray, classes: list[Any] | None = None
) -> dict[str, Any]:
    pred = probs.argmax(1)
    labels = np.arange(probs.shape[1])
    per = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "n": int(len(y)),
    }
    if classes is not None:
        out["per_class_f1"] = {str(c): float(v) for c, v in zip(classes, per, strict=True)}
    return out


def _schedule(opt, total: int, warmup: float):
    w = max(1, int(round(warmup * total)))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total - step) / max(1, total - w))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


@torch.no_grad()
def _predict(
    head, loader_fn: Callable[[], Iterable[Batch]], device
) -> tuple[np.ndarray, np.ndarray]:
    head.eval()
    probs, rows = [], []
    for b in loader_fn():
        logits = head(b.to(device))
        probs.append(torch.softmax(logits.float(), -1).cpu().numpy())
        rows.append(b.rows.numpy())
    if not probs:
        return np.zeros((0, head.num_classes), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs).astype(np.float32), np.concatenate(rows)


def train(
    store,
    head: Any = "concat",
    *,
    text: str | None = None,
    image: str | None = None,
    out: str | os.PathLike | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    name: str | None = None,
    **overrides: Any,
) -> Run:
    """Train ``head`` (a registered name, a FusionHead subclass, or a factory) on the store's
    folds and write a run directory. ``overrides`` are TrainConfig fields; unknown keys are
    taken as head options.
    """
    from embedstore import open_store
    from embedstore.store import Store

    from .heads import create_head, resolve_head
    from .heads.registry import spec_of

    if not isinstance(store, Store):
        store = open_store(store)
    cfg = config or TrainConfig()
    fields = {k: v for k, v in overrides.items() if k in TrainConfig.__dataclass_fields__}
    opts = {k: v for k, v in overrides.items() if k not in TrainConfig.__dataclass_fields__}
    cfg = replace(cfg, **fields, options={**cfg.options, **opts})
    for key, val, lo in (
        ("epochs", cfg.epochs, 1),
        ("batch_size", cfg.batch_size, 1),
        ("patience", cfg.patience, 1),
    ):
        if val < lo:
            raise TrainError(f"--{key.replace('_', '-')} must be >= {lo}, got {val}")
    if not cfg.lr > 0:
        raise TrainError(f"--lr must be > 0, got {cfg.lr}")

    # -- data ----------------------------------------------------------------------------
    if store.labels is None:
        raise TrainError(f"store {store.url!r} has no labels; extract with --label-col to train")
    head_cls = resolve_head(head)
    modalities = getattr(head_cls, "modalities", ("text", "image"))
    text, image = pick_features(store, text, image, modalities)
    tfs = store.features[text] if text else None
    ifs = store.features[image] if image else None
    labels = store.labels.astype(np.int64)
    classes = store.classes
    k_classes = len(classes)
    folds = store.folds
    k = store.fold_info["k"]
    fold_ids = list(range(k)) if cfg.folds is None else list(range(min(cfg.folds, k)))
    if cfg.fold is not None:
        if not 0 <= cfg.fold < k:
            raise TrainError(f"--fold {cfg.fold} is outside the store's folds 0..{k - 1}")
        fold_ids = [cfg.fold]
    trainable = folds >= 0
    counts = np.bincount(labels[trainable], minlength=k_classes)
    few = [(classes[c], int(counts[c])) for c in range(k_classes) if counts[c] < k]
    if few:
        raise TrainError(
            f"class {few[0][0]!r} has {few[0][1]} trainable items, fewer than the "
            f"{k} folds ({len(few)} such classes); merge or drop rare classes, or "
            "re-create the store with fewer --folds"
        )
    text_layers = 1
    layer_sel = None
    if tfs is not None:
        from embedstore.loader import resolve_layers

        layer_sel = cfg.layers
        text_layers = len(resolve_layers(tfs.layers, layer_sel))
    dims = dict(
        text_dim=tfs.dim if tfs else 1,
        image_dim=ifs.dim if ifs else 1,
        num_classes=k_classes,
        text_layers=text_layers,
    )
    probe = create_head(head, **dims, **cfg.options)  # validates options before any work
    needs = (
        frozenset(getattr(probe, "needs", ())) | {"text_mask"}
        if tfs
        else frozenset(getattr(probe, "needs", ()))
    )
    device = _device(cfg.device)
    max_ram = None if cfg.max_ram_gb is None else cfg.max_ram_gb * 1e9

    def loader(rows: np.ndarray, shuffle: bool, seed: int, epoch: int = 0):
        ld = store.loader(
            rows,
            text=text,
            image=image,
            batch_size=cfg.batch_size,
            shuffle=shuffle,
            seed=seed,
            layers=layer_sel,
            fields=needs,
            max_ram=max_ram,
        )
        ld.set_epoch(epoch)
        for d in ld:
            yield Batch(**d)

    writer = RunWriter(out) if out is not None else None
    t_run = time.perf_counter()
    oof = np.zeros((len(folds), k_classes), np.float32)
    oof_mask = np.zeros(len(folds), bool)
    hold_rows = np.flatnonzero(folds == -1)
    hold_sum = np.zeros((len(hold_rows), k_classes), np.float64)
    fold_metrics, epoch_times = [], []
    class_w = None
    if cfg.class_weight:
        class_w = torch.tensor(
            len(labels) / (k_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device
        )
    try:
        for f in fold_ids:
            tr_rows = np.flatnonzero(trainable & (folds != f))
            va_rows = np.flatnonzero(folds == f)
            torch.manual_seed(cfg.seed * 1000 + f)
            model = create_head(head, **dims, **cfg.options).to(device)
            params = [p for p in model.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            opt = torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": cfg.weight_decay},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=cfg.lr,
            )
            steps = cfg.epochs * max(1, -(-len(tr_rows) // cfg.batch_size))
            sched = _schedule(opt, steps, cfg.warmup)
            best, best_state, best_epoch, bad = -1.0, None, 0, 0
            history = []
            for epoch in range(cfg.epochs):
                model.train()
                t0 = time.perf_counter()
                loss_sum, n_seen = 0.0, 0
                for b in loader(tr_rows, True, cfg.seed * 1000 + f, epoch):
                    b = b.to(device)
                    logits = model(b)
                    loss = model.loss(b, logits, class_w)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    sched.step()
                    loss_sum += float(loss.detach()) * b.size
                    n_seen += b.size
                epoch_times.append(time.perf_counter() - t0)
                vp, vr = _predict(model, lambda r=va_rows: loader(r, False, 0), device)
                vm = metrics_of(labels[vr], vp)
                history.append(
                    {
                        "epoch": epoch,
                        "loss": loss_sum / max(1, n_seen),
                        "val_macro_f1": vm["macro_f1"],
                        "val_accuracy": vm["accuracy"],
                        "seconds": epoch_times[-1],
                    }
                )
                if progress:
                    progress({"fold": f, "folds": fold_ids, **history[-1]})
                if vm["macro_f1"] > best + 1e-9:
                    best, best_epoch, bad = vm["macro_f1"], epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        break
            model.load_state_dict(best_state)
            fit_end = model.on_fit_end(lambda r=va_rows: loader(r, False, 0)) or {}
            vp, vr = _predict(model, lambda r=va_rows: loader(r, False, 0), device)
            oof[vr] = vp
            oof_mask[vr] = True
            if len(hold_rows):
                hp, hr = _predict(model, lambda: loader(hold_rows, False, 0), device)
                pos = np.searchsorted(hold_rows, hr)
                hold_sum[pos] += hp
            fm = metrics_of(labels[vr], vp)
            fold_metrics.append(
                {
                    "fold": f,
                    "best_epoch": best_epoch,
                    "epochs_run": len(history),
                    "accuracy": fm["accuracy"],
                    "macro_f1": fm["macro_f1"],
                    "on_fit_end": fit_end,
                    "history": history,
                }
            )
            if writer is not None:
                from safetensors.torch import save_file

                state = {k_: v.detach().cpu().contiguous() for k_, v in model.state_dict().items()}
                save_file(state, str(writer.file(f"weights/fold{f}.safetensors")))
        train_seconds = time.perf_counter() - t_run
        oof_rows = np.flatnonzero(oof_mask)
        oof_p = oof[oof_rows]
        hold_p = (hold_sum / max(1, len(fold_ids))).astype(np.float32)
        if len(hold_p):
            hold_p /= hold_p.sum(1, keepdims=True)
        metrics = {
            "head": spec_of(head_cls),
            "kind": "train",
            **metrics_of(labels[oof_rows], oof_p, classes),
        }
        metrics["holdout"] = metrics_of(labels[hold_rows], hold_p) if len(hold_rows) else None
        metrics.update(
            folds=fold_metrics,
            train_seconds=train_seconds,
            epoch_seconds=float(np.mean(epoch_times)) if epoch_times else 0.0,
            n_parameters=int(sum(p.numel() for p in probe.parameters())),
            device=str(device),
        )
        run_config = {
            "kind": "train",
            "name": name or (Path(out).name if out is not None else spec_of(head_cls)),
            "head": spec_of(head_cls),
            "head_config": probe.config,
            "train": cfg.to_dict(),
            "store": {
                "url": store.url,
                "fingerprint": store.fingerprint,
                "folds_fingerprint": store.folds_fingerprint,
            },
            "classes": classes,
            "folds": {
                **store.fold_info,
                "trained": fold_ids,
                "assignment": folds.astype(int).tolist(),
            },
            "labels": labels.astype(int).tolist(),
            "features": {
                mod: (
                    {
                        "name": fs.name,
                        "dim": fs.dim,
                        "layers": fs.layers,
                        "encoder": fs.encoder,
                        "preprocess": fs.meta.get("preprocess"),
                        "catalog": fs.meta.get("catalog"),
                        "prefix_tokens": fs.prefix_tokens,
                    }
                    if fs is not None
                    else None
                )
                for mod, fs in (("text", tfs), ("image", ifs))
            },
        }
        if writer is None:
            return Run(
                path=Path("."),
                config=run_config,
                metrics=metrics,
                oof=oof_p,
                oof_rows=oof_rows,
                holdout=hold_p,
                holdout_rows=hold_rows,
            )
        writer.write_json("config.json", run_config)
        writer.write_json("metrics.json", metrics)
        writer.write_array("oof", oof_p)
        writer.write_array("oof_rows", oof_rows.astype(np.int64))
        writer.write_array("holdout", hold_p)
        writer.write_array("holdout_rows", hold_rows.astype(np.int64))
        ids = store.ids
        all_rows = np.concatenate([oof_rows, hold_rows])
        writer.write_predictions(
            ids=ids[all_rows].tolist(),
            splits=["oof"] * len(oof_rows) + ["holdout"] * len(hold_rows),
            folds=folds[all_rows].astype(int).tolist(),
            true=[classes[c] for c in labels[all_rows]],
            probs=np.concatenate([oof_p, hold_p]) if len(hold_p) else oof_p,
            classes=classes,
        )
        path = writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return load_run(path)
