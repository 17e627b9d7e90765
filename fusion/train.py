"""`fusion train`: k-fold training of a fusion head on cached tensors.

One model per store fold: train on the other folds, early-stop on this fold's macro-F1, predict
this fold (out-of-fold) and the holdout. Out-of-fold probabilities for every trainable item plus
the fold-mean holdout probabilities are what every stacker consumes, leak-free.

The loop reads top to bottom: setup (data, checks) -> per fold: model, optimiser, schedule,
epochs with early stopping, predictions -> run directory. `fusion.finetune` reuses the setup,
the epoch loop and the run writer with live encoders in the model.
"""

from __future__ import annotations

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
    threads: int | None = None  # torch intra-op threads on CPU (None = torch's default)
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
        fs = store.features[chosen[mod]]
        if fs.modality != mod:
            raise TrainError(f"--{mod} {chosen[mod]!r} is a {fs.modality} feature set")
        fs.require_complete()
        if fs.n_items != store.n_items:
            raise TrainError(f"feature set {fs.name!r} has {fs.n_items} rows but the store has "
                             f"{store.n_items} ids; re-extract it")
    return chosen["text"], chosen["image"]


def fast_macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Macro-F1 over labels 0..k-1 from a confusion matrix (equal to scikit-learn's
    ``f1_score(average="macro", labels=range(k), zero_division=0)``; a test checks it). The
    epoch loop calls this every epoch, where sklearn's input validation costs ~40 ms."""
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    return float(f1.mean())


def metrics_of(y: np.ndarray, probs: np.ndarray, classes: list[Any] | None = None
               ) -> dict[str, Any]:
    pred = probs.argmax(1)
    labels = np.arange(probs.shape[1])
    out = {"accuracy": float(accuracy_score(y, pred)),
           "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
           "n": int(len(y))}
    if classes is not None:
        per = f1_score(y, pred, labels=labels, average=None, zero_division=0)
        out["per_class_f1"] = {str(c): float(v) for c, v in zip(classes, per, strict=True)}
    return out


# ---------------------------------------------------------------------------------------------
# setup shared with fine-tuning


@dataclass
class Setup:
    store: Any
    head: Any  # what resolve_head accepts
    head_spec: str
    cfg: Any
    tfs: Any
    ifs: Any
    labels: np.ndarray  # (N,) int64
    classes: list[Any]
    folds: np.ndarray  # (N,) int8, -1 = holdout
    fold_ids: list[int]
    dims: dict[str, int]
    needs: frozenset[str]
    layer_sel: Any
    device: torch.device
    probe: torch.nn.Module

    @property
    def hold_rows(self) -> np.ndarray:
        return np.flatnonzero(self.folds == -1)

    def fold_rows(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, validation rows) of fold ``f``."""
        return np.flatnonzero((self.folds >= 0) & (self.folds != f)), np.flatnonzero(
            self.folds == f)


def prepare(store, head: Any, text: str | None, image: str | None, cfg: Any) -> Setup:
    """Every check that can fail, before any work: labels, feature sets, folds, head options."""
    from embedstore import open_store
    from embedstore.store import Store

    from .heads import create_head, resolve_head
    from .heads.registry import spec_of

    if not isinstance(store, Store):
        store = open_store(store)
    for key, val in (("epochs", cfg.epochs), ("batch_size", cfg.batch_size),
                     ("patience", cfg.patience)):
        if val < 1:
            raise TrainError(f"--{key.replace('_', '-')} must be >= 1, got {val}")
    if not cfg.lr > 0:
        raise TrainError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {cfg.threads}")
        # small heads on a busy CPU: extra OpenMP threads spin and wait (measured 4-30x slower)
        torch.set_num_threads(cfg.threads)
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
    counts = np.bincount(labels[folds >= 0], minlength=len(classes))
    few = [(classes[c], int(counts[c])) for c in range(len(classes)) if counts[c] < k]
    if few:
        raise TrainError(f"class {few[0][0]!r} has {few[0][1]} trainable items, fewer than the "
                         f"{k} folds ({len(few)} such classes); merge or drop rare classes, or "
                         "re-create the store with fewer --folds")
    layer_sel, text_layers = None, 1
    if tfs is not None:
        from embedstore.loader import resolve_layers

        layer_sel = cfg.layers
        text_layers = len(resolve_layers(tfs.layers, layer_sel))
    dims = dict(text_dim=tfs.dim if tfs else 1, image_dim=ifs.dim if ifs else 1,
                num_classes=len(classes), text_layers=text_layers)
    probe = create_head(head, **dims, **cfg.options)  # validates options before any work
    needs = frozenset(getattr(probe, "needs", ()))
    for mod, fs in (("text", tfs), ("image", ifs)):
        if fs is not None and f"{mod}_pooled" in needs and fs.pooled_dim != fs.dim:
            raise TrainError(
                f"feature set {fs.name!r} has pooled vectors of width {fs.pooled_dim} (a projected "
                f"embedding) but {mod} tokens of width {fs.dim}; this head reads {mod}_pooled: "
                "pool the tokens instead with --set pool=mean (or pool=attention)")
    return Setup(store=store, head=head, head_spec=spec_of(head_cls), cfg=cfg, tfs=tfs, ifs=ifs,
                 labels=labels, classes=classes, folds=folds, fold_ids=fold_ids, dims=dims,
                 needs=needs, layer_sel=layer_sel, device=_device(cfg.device), probe=probe)


def make_optimizer(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.AdamW:
    """AdamW; within each group, weight decay only on matrices (not biases / norms / scalars)."""
    out = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        rest = {k: v for k, v in g.items() if k != "params"}
        out.append({**rest, "params": [p for p in params if p.ndim >= 2],
                    "weight_decay": weight_decay})
        out.append({**rest, "params": [p for p in params if p.ndim < 2], "weight_decay": 0.0})
    return torch.optim.AdamW([g for g in out if g["params"]], foreach=True)


def make_schedule(opt, total: int, warmup: float):
    """Linear warm-up over ``warmup`` of the steps, then linear decay to 0."""
    w = max(1, int(round(warmup * total)))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total - step) / max(1, total - w))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


@torch.no_grad()
def predict(model, batches: Iterable[Any], device) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and store rows for every batch (eval mode)."""
    model.eval()
    probs, rows = [], []
    for b in batches:
        logits = model(b.to(device))
        probs.append(torch.softmax(logits.float(), -1).cpu().numpy())
        rows.append(b.rows.cpu().numpy())
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs).astype(np.float32), np.concatenate(rows)


def fit_fold(model, opt, sched, *, train_batches: Callable[[int], Iterable[Any]],
             val_batches: Callable[[], Iterable[Any]], labels: np.ndarray, cfg: Any,
             device, fold: int, progress=None, class_weight=None, grad_accum: int = 1,
             scaler=None, autocast=None, step0: bool = False) -> dict[str, Any]:
    """Epochs with early stopping on validation macro-F1; the best state is loaded back.

    Returns ``{"best_epoch", "history", "epoch_times", "step0"}``.
    """
    params = [p for g in opt.param_groups for p in g["params"]]
    best, best_state, best_epoch, bad = -1.0, None, 0, 0
    history, epoch_times = [], []
    out: dict[str, Any] = {}
    if step0:  # metrics before any update (warm-start check)
        vp, vr = predict(model, val_batches(), device)
        out["step0"] = metrics_of(labels[vr], vp)
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, n_seen = 0.0, 0
        opt.zero_grad(set_to_none=True)
        for i, b in enumerate(train_batches(epoch)):
            b = b.to(device)
            with autocast() if autocast else _null():
                logits = model(b)
                loss = model.loss(b, logits, class_weight)
            (scaler.scale(loss / grad_accum) if scaler else loss / grad_accum).backward()
            if (i + 1) % grad_accum == 0:
                _step(opt, sched, params, cfg.grad_clip, scaler)
            loss_sum += float(loss.detach()) * b.size
            n_seen += b.size
        if n_seen and (i + 1) % grad_accum:
            _step(opt, sched, params, cfg.grad_clip, scaler)
        epoch_times.append(time.perf_counter() - t0)
        vp, vr = predict(model, val_batches(), device)
        pred = vp.argmax(1)
        vm = {"macro_f1": fast_macro_f1(labels[vr], pred, vp.shape[1]),
              "accuracy": float((pred == labels[vr]).mean()) if len(vr) else 0.0}
        history.append({"epoch": epoch, "loss": loss_sum / max(1, n_seen),
                        "val_macro_f1": vm["macro_f1"], "val_accuracy": vm["accuracy"],
                        "seconds": epoch_times[-1]})
        if progress:
            progress({"fold": fold, **history[-1]})
        if vm["macro_f1"] > best + 1e-9:
            best, best_epoch, bad = vm["macro_f1"], epoch, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in
                          model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    out.update(best_epoch=best_epoch, history=history, epoch_times=epoch_times)
    return out


def _step(opt, sched, params, clip: float, scaler) -> None:
    if scaler:
        scaler.unscale_(opt)
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FoldResults:
    """Out-of-fold and holdout predictions gathered fold by fold (shared with fine-tuning)."""

    def __init__(self, setup: Setup):
        self.setup = setup
        k = len(setup.classes)
        self.oof = np.zeros((len(setup.folds), k), np.float32)
        self.oof_mask = np.zeros(len(setup.folds), bool)
        self.hold_rows = setup.hold_rows
        self.hold_sum = np.zeros((len(self.hold_rows), k), np.float64)
        self.fold_metrics: list[dict[str, Any]] = []
        self.epoch_times: list[float] = []

    def add(self, fold: int, model, batches: Callable[[np.ndarray], Iterable[Any]],
            va_rows: np.ndarray, fit: dict[str, Any], fit_end: dict[str, Any],
            **extra: Any) -> None:
        """Predict fold ``fold``'s validation rows (out-of-fold) and the holdout."""
        s = self.setup
        vp, vr = predict(model, batches(va_rows), s.device)
        self.oof[vr], self.oof_mask[vr] = vp, True
        if len(self.hold_rows):
            hp, hr = predict(model, batches(self.hold_rows), s.device)
            self.hold_sum[np.searchsorted(self.hold_rows, hr)] += hp
        fm = metrics_of(s.labels[vr], vp)
        self.epoch_times += fit["epoch_times"]
        self.fold_metrics.append({"fold": fold, "best_epoch": fit["best_epoch"],
                                  "epochs_run": len(fit["history"]),
                                  "accuracy": fm["accuracy"], "macro_f1": fm["macro_f1"],
                                  "on_fit_end": fit_end, "history": fit["history"], **extra})

    def write(self, writer: RunWriter | None, *, kind: str, train_seconds: float,
              name: str | None, extra_config: dict[str, Any] | None = None) -> Run:
        rows = np.flatnonzero(self.oof_mask)
        return write_run(self.setup, writer, kind=kind, oof=self.oof[rows], oof_rows=rows,
                         hold_sum=self.hold_sum, fold_metrics=self.fold_metrics,
                         epoch_times=self.epoch_times, train_seconds=train_seconds, name=name,
                         extra_config=extra_config)


def write_run(setup: Setup, writer: RunWriter | None, *, kind: str, oof: np.ndarray,
              oof_rows: np.ndarray, hold_sum: np.ndarray, fold_metrics: list[dict[str, Any]],
              epoch_times: list[float], train_seconds: float, name: str | None,
              extra_config: dict[str, Any] | None = None) -> Run:
    """Metrics + config + arrays + predictions; ``DONE`` last (RunWriter.finish)."""
    s = setup
    hold_rows = s.hold_rows
    hold_p = (hold_sum / max(1, len(s.fold_ids))).astype(np.float32)
    if len(hold_p):
        hold_p /= hold_p.sum(1, keepdims=True)
    metrics = {"head": s.head_spec, "kind": kind,
               **metrics_of(s.labels[oof_rows], oof, s.classes)}
    metrics["holdout"] = metrics_of(s.labels[hold_rows], hold_p) if len(hold_rows) else None
    metrics.update(folds=fold_metrics, train_seconds=train_seconds,
                   epoch_seconds=float(np.mean(epoch_times)) if epoch_times else 0.0,
                   n_parameters=int(sum(p.numel() for p in s.probe.parameters())),
                   device=str(s.device))
    out = writer.path if writer is not None else None
    config = {
        "kind": kind,
        "name": name or (Path(out).name if out is not None else s.head_spec),
        "head": s.head_spec,
        "head_config": s.probe.config,
        "train": s.cfg.to_dict(),
        "store": {"url": s.store.url, "fingerprint": s.store.fingerprint,
                  "folds_fingerprint": s.store.folds_fingerprint},
        "classes": s.classes,
        "folds": {**s.store.fold_info, "trained": s.fold_ids,
                  "assignment": s.folds.astype(int).tolist()},
        "labels": s.labels.astype(int).tolist(),
        "features": {mod: ({"name": fs.name, "dim": fs.dim, "layers": fs.layers,
                            "encoder": fs.encoder, "preprocess": fs.meta.get("preprocess"),
                            "catalog": fs.meta.get("catalog"),
                            "prefix_tokens": fs.prefix_tokens} if fs is not None else None)
                     for mod, fs in (("text", s.tfs), ("image", s.ifs))},
        **(extra_config or {}),
    }
    if writer is None:
        return Run(path=Path("."), config=config, metrics=metrics, oof=oof, oof_rows=oof_rows,
                   holdout=hold_p, holdout_rows=hold_rows)
    writer.write_json("config.json", config)
    writer.write_json("metrics.json", metrics)
    writer.write_array("oof", oof)
    writer.write_array("oof_rows", oof_rows.astype(np.int64))
    writer.write_array("holdout", hold_p)
    writer.write_array("holdout_rows", hold_rows.astype(np.int64))
    rows = np.concatenate([oof_rows, hold_rows])
    writer.write_predictions(
        ids=s.store.ids[rows].tolist(),
        splits=["oof"] * len(oof_rows) + ["holdout"] * len(hold_rows),
        folds=s.folds[rows].astype(int).tolist(),
        true=[s.classes[c] for c in s.labels[rows]],
        probs=np.concatenate([oof, hold_p]) if len(hold_p) else oof, classes=s.classes)
    return load_run(writer.finish())


def save_weights(writer: RunWriter | None, name: str, module: torch.nn.Module) -> None:
    if writer is None:
        return
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(writer.file(f"weights/{name}.safetensors")))


# ---------------------------------------------------------------------------------------------


def train(store, head: Any = "concat", *, text: str | None = None, image: str | None = None,
          out: str | os.PathLike | None = None, config: TrainConfig | None = None,
          progress: Callable[[dict[str, Any]], None] | None = None, name: str | None = None,
          **overrides: Any) -> Run:
    """Train ``head`` (a registered name, a FusionHead subclass, or a factory) on the store's
    folds and write a run directory. ``overrides`` are TrainConfig fields; other keys are head
    options.
    """

    cfg = config or TrainConfig()
    fields_ = {k: v for k, v in overrides.items() if k in TrainConfig.__dataclass_fields__}
    opts = {k: v for k, v in overrides.items() if k not in TrainConfig.__dataclass_fields__}
    cfg = replace(cfg, **fields_, options={**cfg.options, **opts})
    threads_before = torch.get_num_threads()
    try:
        return _train(store, head, text, image, out, cfg, progress, name)
    finally:
        torch.set_num_threads(threads_before)


def _train(store, head, text, image, out, cfg, progress, name) -> Run:
    from .heads import create_head

    s = prepare(store, head, text, image, cfg)
    max_ram = None if cfg.max_ram_gb is None else cfg.max_ram_gb * 1e9

    def batches(rows: np.ndarray, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        ld = s.store.loader(rows, text=s.tfs.name if s.tfs else None,
                            image=s.ifs.name if s.ifs else None, batch_size=cfg.batch_size,
                            shuffle=shuffle, seed=seed, layers=s.layer_sel, fields=s.needs,
                            max_ram=max_ram)
        ld.set_epoch(epoch)
        for d in ld:
            yield Batch(**d)

    class_w = None
    if cfg.class_weight:
        counts = np.bincount(s.labels[s.folds >= 0], minlength=len(s.classes))
        class_w = torch.tensor(len(s.labels) / (len(s.classes) * np.maximum(counts, 1)),
                               dtype=torch.float32, device=s.device)
    writer = RunWriter(out) if out is not None else None
    t_run = time.perf_counter()
    results = FoldResults(s)
    try:
        for f in s.fold_ids:
            tr_rows, va_rows = s.fold_rows(f)
            torch.manual_seed(cfg.seed * 1000 + f)
            model = create_head(head, **s.dims, **cfg.options).to(s.device)
            opt = make_optimizer([{"params": model.parameters(), "lr": cfg.lr}],
                                 cfg.weight_decay)
            sched = make_schedule(opt, cfg.epochs * max(1, -(-len(tr_rows) // cfg.batch_size)),
                                  cfg.warmup)
            fit = fit_fold(model, opt, sched,
                           train_batches=lambda ep, r=tr_rows, f=f: batches(
                               r, True, cfg.seed * 1000 + f, ep),
                           val_batches=lambda r=va_rows: batches(r),
                           labels=s.labels, cfg=cfg, device=s.device, fold=f,
                           progress=progress, class_weight=class_w)
            fit_end = model.on_fit_end(lambda r=va_rows: batches(r)) or {}
            results.add(f, model, batches, va_rows, fit, fit_end)
            save_weights(writer, f"fold{f}", model)
        return results.write(writer, kind="train", train_seconds=time.perf_counter() - t_run,
                             name=name)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


__all__ += ["Setup", "FoldResults", "prepare", "make_optimizer", "make_schedule", "predict", "fit_fold",
            "write_run", "save_weights"]
