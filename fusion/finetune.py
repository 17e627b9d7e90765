"""`fusion train --finetune`: the same head, folds and run directory as `fusion train`, with the
encoders live and (partly) trainable.

Read top to bottom like `fusion.train`: data (store checks, raw catalog, ``--init`` checks),
then per seed and fold the rows (fit / inner validation / predicted, as in `fusion.train`: the
epoch is chosen on the inner split, never on the rows the fold predicts), the model (encoders from provenance around the head, warm-started from the
``--init`` run's weights), the optimiser (separate head / encoder learning rates), the schedule,
the epoch loop (AMP + GradScaler on GPU, gradient accumulation), the predictions; then the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from embedstore.provenance import catalog_from_feature

from .config import DEFAULT_HEAD, FinetuneConfig
from .data import Setup, class_weights, inner_split, prepare
from .device import torch_threads
from .errors import TrainError
from .heads import create_head
from .live import LiveModel, RawBatches, build_live_model, freeze_lowest, layer_groups
from .loop import (
    EarlyStopping,
    make_optimizer,
    make_schedule,
    optimizer_step,
    predict,
    steps_per_epoch,
    validate,
)
from .metrics import classification_metrics
from .results import FoldResults
from .rundir import Run, load_run

__all__ = ["FinetuneConfig", "finetune", "LiveModel", "layer_groups", "freeze_lowest",
           "build_live_model"]


def _init_run(s: Setup, init: str) -> Run:
    """The cached-feature run ``--init`` warm-starts from, checked against this run."""
    run = load_run(init)
    if run.store_fingerprint != s.store.fingerprint:
        raise TrainError(f"--init {init!r} was trained on another store; warm-start from a run "
                         "of this store")
    dims = run.config.get("head_config", {}).get("dims")
    if run.head != s.head_spec or dims != s.dims:
        raise TrainError(f"--init {init!r} is a {run.head!r} head with dims {dims}; this run is "
                         f"{s.head_spec!r} with {s.dims}: use the same head and features")
    diff = _options_diff(run.config.get("head_config", {}).get("options"),
                         s.probe.config.get("options", {}))
    if diff:
        raise TrainError(f"--init {init!r} head options differ: {diff}; warm-start from a run "
                         "trained with the same options (or pass them with --set)")
    missing = [f for f in s.fold_ids for seed in s.cfg.seed_list
               if not _init_weights(run, seed, f).exists()]
    if missing:
        raise TrainError(f"--init {init!r} has no weights for fold(s) {missing}; train those "
                         "folds on the cache first (or pass --fold)")
    return run


def _options_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """``"dropout 0.1 -> 0.3, mode 'a' -> 'b'"`` for the head options that differ ('' when
    none do, or when ``old`` is None: a run written before head options were recorded)."""
    if old is None:
        return ""
    new = json.loads(json.dumps(new, default=str))  # as config.json holds them
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
                     for k in keys if old.get(k, "(unset)") != new.get(k, "(unset)"))


def _init_weights(run: Run, seed: int, fold: int):
    """The ``--init`` head weights for (seed, fold): ``weights/seed{s}/fold{i}`` when the run has
    repeats of that seed, else ``weights/fold{i}``."""
    per_seed = run.path / f"weights/seed{seed}/fold{fold}.safetensors"
    return per_seed if per_seed.exists() else run.path / f"weights/fold{fold}.safetensors"


def finetune(store, head: Any = DEFAULT_HEAD, *, text: str | None = None, image: str | None = None,
             out: str | os.PathLike | None = None, config: FinetuneConfig | None = None,
             progress: Callable[[dict[str, Any]], None] | None = None, name: str | None = None,
             **overrides: Any) -> Run:
    """End-to-end training of encoders + head on the raw catalog, fold by fold.
    ``overrides`` are FinetuneConfig fields; other keys are head options."""
    cfg = (config or FinetuneConfig()).override(**overrides)
    # -- data: store checks, the raw catalog, the warm-start run
    s = prepare(store, head, text, image, cfg)
    cfg = s.cfg  # prepare may resolve head options (fallback=auto)
    init = _init_run(s, cfg.init) if cfg.init else None
    cats = {mod: catalog_from_feature(fs, s.store, cfg.catalog)
            for mod, fs in (("text", s.tfs), ("image", s.ifs)) if fs is not None}
    texts = cats["text"].texts if "text" in cats else None
    images = cats["image"].images if "image" in cats else None
    lengths = s.tfs.lengths() if s.tfs is not None else None
    use_amp = s.device.type == "cuda" and cfg.precision != "fp32"
    amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    t_run = time.perf_counter()

    def autocast():
        return (torch.autocast("cuda", dtype=amp_dtype) if use_amp
                else contextlib.nullcontext())

    with torch_threads(cfg.threads), FoldResults(s, out) as results:
        for run_seed in cfg.seed_list:
            for f in s.fold_ids:
                _fit_fold(s, cfg, head, init, texts, images, lengths, autocast, use_amp,
                          amp_dtype, results, progress, run_seed, f)
            results.end_seed(run_seed)
        # -- the run
        return results.write(kind="finetune", train_seconds=time.perf_counter() - t_run,
                             name=name, extra_config={"finetune": {
                                 "init": cfg.init,
                                 "catalog": {m: c.path for m, c in cats.items()}}})


def _fit_fold(s: Setup, cfg: FinetuneConfig, head: Any, init: Run | None, texts, images,
              lengths, autocast, use_amp: bool, amp_dtype, results: FoldResults,
              progress, run_seed: int, f: int) -> None:
    """One (seed, fold): fit on the fold's training rows minus the inner split, pick the epoch
    on the inner split, predict the fold's rows and the holdout into ``results``."""
    tr_rows, va_rows = s.fold_rows(f)
    fit_rows, inner_rows = inner_split(s.labels, tr_rows, cfg.inner_val, run_seed, f,
                                       groups=s.groups)
    if cfg.max_items is not None and len(fit_rows) > cfg.max_items:
        fit_rows = np.sort(np.random.default_rng(run_seed + f).choice(
            fit_rows, cfg.max_items, replace=False))
    class_w = class_weights(s, fit_rows)
    smoothing = {"label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else {}
    # -- model: live encoders around the head
    torch.manual_seed(run_seed * 1000 + f)
    head_m = create_head(head, **s.dims, **cfg.options)
    if init is not None:
        head_m.load_state_dict(load_file(_init_weights(init, run_seed, f)))
    model = build_live_model(s, cfg, head_m).to(s.device)
    batches = RawBatches(model, texts, images, lengths, s.labels, cfg.batch_size,
                         cfg.num_workers)
    step0 = None
    if init is not None:  # metrics of the fold's rows before any update (warm-start check)
        vp, vr = predict(model, batches(va_rows), s.device)
        step0 = classification_metrics(s.labels[vr], vp)
    # -- optimiser and schedule: head and encoders get their own learning rates
    enc_params = [p for m in (model.text_model, model.image_model) if m is not None
                  for p in m.parameters()]
    opt = make_optimizer([
        {"params": list(model.head.parameters()), "lr": cfg.head_lr or cfg.lr, "name": "head"},
        {"params": enc_params, "lr": cfg.encoder_lr, "name": "encoders"},
    ], cfg.weight_decay)
    sched = make_schedule(opt, cfg.epochs * steps_per_epoch(
        len(fit_rows), cfg.batch_size * cfg.grad_accum), cfg.warmup)
    scaler = (torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16
              else None)
    # -- the epoch loop, with gradient accumulation; early stopping on the inner rows
    stop = EarlyStopping(cfg.patience)
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, n_seen, pending = 0.0, 0, 0
        opt.zero_grad(set_to_none=True)
        for b in batches(fit_rows, np.random.default_rng((run_seed, f, epoch))):
            b = b.to(s.device)
            with autocast():
                loss = model.loss(b, model(b), class_w, **smoothing)
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            pending += 1
            if pending == cfg.grad_accum:
                optimizer_step(opt, sched, cfg.grad_clip, scaler)
                pending = 0
            loss_sum += float(loss.detach()) * b.size
            n_seen += b.size
        if pending:  # the last, partial accumulation
            optimizer_step(opt, sched, cfg.grad_clip, scaler)
        seconds = time.perf_counter() - t0  # training only, validation excluded
        record = {"seed": run_seed, "fold": f, "epoch": epoch, "loss": loss_sum / max(1, n_seen),
                  **validate(model, batches(inner_rows), s.labels, s.device),
                  "seconds": seconds}
        if progress:
            progress(record)
        if stop.update(model, {k: v for k, v in record.items() if k not in ("seed", "fold")}):
            break
    stop.restore(model)
    # -- choices after fitting on the inner rows; then this fold's rows and the holdout
    fit_end = model.head.on_fit_end(
        lambda r=inner_rows, m=model, bs=batches: (m.features(b.to(s.device)) for b in bs(r))
    ) or {}
    results.add(f, model, batches, va_rows, stop, fit_end, seed=run_seed,
                n_fit=len(fit_rows), inner_rows=inner_rows, step0=step0,
                train_items=int(len(fit_rows)),
                lr={g.get("name", "?"): g.get("initial_lr", g["lr"]) for g in opt.param_groups})
    results.save_weights(results.weights_name(run_seed, f), model.head)
    if cfg.save_encoders:
        for mod, m in (("text", model.text_model), ("image", model.image_model)):
            if m is not None:
                name = results.weights_name(run_seed, f)
                results.save_weights(f"{name}-{mod}-encoder", m)
