"""`fusion train`: k-fold training of a fusion head on cached tensors.

One model per (seed, store fold): fit on the other folds' rows minus an inner validation split
carved from them (`fusion.data.inner_split`), early-stop and pick the epoch (and ``late``'s
alpha) on that inner split, then predict this fold (out-of-fold) and the holdout. The rows a fold
predicts are never used to fit or to select its model, so the out-of-fold probabilities for every
trainable item, and the fold-mean holdout probabilities, are what every stacker consumes,
leak-free. With several seeds both are the mean over the seeds.

Read top to bottom: data, then per seed and fold the split, the model, the optimiser, the
schedule, the epoch loop, the predictions; then the run directory. The helpers it calls live in `fusion.data`,
`fusion.loop` and `fusion.results`; `fusion.finetune` is the same loop with live encoders.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .config import DEFAULT_HEAD, TrainConfig
from .data import (
    cached_batches,
    class_weights,
    drop_modalities,
    inner_split,
    pick_features,
    prepare,
)
from .device import torch_threads
from .heads import create_head
from .loop import (
    EarlyStopping,
    make_optimizer,
    make_schedule,
    optimizer_step,
    steps_per_epoch,
    validate,
)
from .results import FoldResults
from .rundir import Run

__all__ = ["TrainConfig", "train", "pick_features"]


def train(store, head: Any = DEFAULT_HEAD, *, text: str | None = None, image: str | None = None,
          out: str | os.PathLike | None = None, config: TrainConfig | None = None,
          progress: Callable[[dict[str, Any]], None] | None = None, name: str | None = None,
          on_fold: Callable[[int, dict[str, Any]], None] | None = None, **overrides: Any) -> Run:
    """Train ``head`` (a registered name, a FusionHead subclass, or a factory) on the store's
    folds and write a run directory to ``out`` (``None``: the run is returned in memory).
    ``overrides`` are TrainConfig fields (``seeds=[0, 1, 2]`` trains every fold once per
    seed into one run); other keys are head options. ``progress`` gets one dict per epoch (seed,
    fold, epoch, loss, val_macro_f1, val_accuracy on the inner validation rows, seconds).
    ``on_fold(fold, fold_metrics)`` is called after each fold is predicted (its out-of-fold
    ``macro_f1`` included); an exception it raises stops the run (`fusion sweep` prunes so).
    """
    cfg = (config or TrainConfig()).override(**overrides)
    # -- data: every check before any work
    s = prepare(store, head, text, image, cfg)
    cfg = s.cfg  # prepare may resolve head options (fallback=auto)
    smoothing = {"label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else {}
    t_run = time.perf_counter()

    def batches(rows: np.ndarray, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        return cached_batches(s, rows, shuffle=shuffle, seed=seed, epoch=epoch)

    with torch_threads(cfg.threads), FoldResults(s, out) as results:
        for run_seed in cfg.seed_list:
            for f in s.fold_ids:
                # -- rows: fit, inner validation (selection), this fold's rows (predicted)
                tr_rows, va_rows = s.fold_rows(f)
                fit_rows, inner_rows = inner_split(s.labels, tr_rows, cfg.inner_val, run_seed, f,
                                                   groups=s.groups)
                class_w = class_weights(s, fit_rows)
                seed = run_seed * 1000 + f
                # -- model
                torch.manual_seed(seed)
                model = create_head(head, **s.dims, **cfg.options).to(s.device)
                # -- optimiser and schedule
                opt = make_optimizer([{"params": model.parameters(), "lr": cfg.lr}],
                                     cfg.weight_decay)
                sched = make_schedule(opt, cfg.epochs * steps_per_epoch(
                    len(fit_rows), cfg.batch_size), cfg.warmup)
                # -- the epoch loop: fit, early-stop on the inner rows
                stop = EarlyStopping(cfg.patience)
                for epoch in range(cfg.epochs):
                    model.train()
                    t0 = time.perf_counter()
                    loss_sum, n_seen = 0.0, 0
                    drop_rng = np.random.default_rng((seed, epoch, 1))  # --modality-dropout
                    for b in batches(fit_rows, shuffle=True, seed=seed, epoch=epoch):
                        if cfg.modality_dropout and s.tfs is not None and s.ifs is not None:
                            b = drop_modalities(b, cfg.modality_dropout, drop_rng)
                        b = b.to(s.device)
                        loss = model.loss(b, model(b), class_w, **smoothing)
                        loss.backward()
                        optimizer_step(opt, sched, cfg.grad_clip)
                        loss_sum += float(loss.detach()) * b.size
                        n_seen += b.size
                    seconds = time.perf_counter() - t0  # training only, validation excluded
                    record = {"seed": run_seed, "fold": f, "epoch": epoch,
                              "loss": loss_sum / max(1, n_seen),
                              **validate(model, batches(inner_rows), s.labels, s.device),
                              "seconds": seconds}
                    if progress:
                        progress(record)
                    if stop.update(model, {k: v for k, v in record.items()
                                           if k not in ("seed", "fold")}):
                        break
                stop.restore(model)
                # -- choices after fitting (late's alpha) on the inner rows too; then predict
                # this fold's rows (out-of-fold) and the holdout
                fit_end = model.on_fit_end(lambda r=inner_rows: batches(r)) or {}
                results.add(f, model, batches, va_rows, stop, fit_end, seed=run_seed,
                            n_fit=len(fit_rows), inner_rows=inner_rows)
                if on_fold:
                    on_fold(f, results.fold_metrics[-1])
                results.save_weights(results.weights_name(run_seed, f), model)
            results.end_seed(run_seed)
        # -- the run
        return results.write(kind="train", train_seconds=time.perf_counter() - t_run,
                             name=name)
