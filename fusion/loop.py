"""The small pieces both training loops call: optimiser, schedule, one optimiser step, predict,
early stopping. Each loop (`fusion.train`, `fusion.finetune`) stays a plain loop of its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from .metrics import macro_f1

__all__ = ["make_optimizer", "make_schedule", "steps_per_epoch", "optimizer_step", "predict",
           "predict_blocks", "validate", "EarlyStopping"]


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


def make_schedule(opt: torch.optim.Optimizer, total: int, warmup: float
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` of the ``total`` steps, then linear decay to 0."""
    w = max(1, int(round(warmup * total)))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total - step) / max(1, total - w))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Optimiser steps in one epoch over ``n_rows`` (the last, partial batch counts)."""
    return max(1, -(-n_rows // batch_size))


def optimizer_step(opt: torch.optim.Optimizer, sched, clip: float, scaler=None) -> None:
    """Clip the gradient norm to ``clip`` (0: no clipping), step, advance the schedule, zero."""
    if scaler is not None:
        scaler.unscale_(opt)
    if clip:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _softmax_rows(model: torch.nn.Module, b: Any, device: torch.device
                  ) -> tuple[np.ndarray, np.ndarray]:
    """((B, K) float32 probabilities, (B,) store rows) of one batch."""
    return (torch.softmax(model(b.to(device)).float(), -1).cpu().numpy(),
            b.rows.cpu().numpy())


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[Any], device: torch.device
            ) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K) float32, store rows (N,)) over ``batches``, in eval mode. This
    holds the N x K array: for many classes use :func:`predict_blocks`."""
    model.eval()
    probs, rows = [], []
    for b in batches:
        p, r = _softmax_rows(model, b, device)
        probs.append(p)
        rows.append(r)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(rows)


@torch.no_grad()
def predict_blocks(model: torch.nn.Module, batches: Iterable[Any], device: torch.device,
                   block_rows: Callable[[int], int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`predict` in blocks: ``(probabilities (n, K) float32, store rows (n,))`` of at most
    ``block_rows(K)`` rows each, in the order of ``batches``. One (block_rows, K) buffer is
    filled batch by batch and reused: a block is valid until the next one is yielded (copy or
    reduce it first), so memory stays one block whatever N is."""
    model.eval()
    buf = rows = None
    n = 0
    for b in batches:
        p, r = _softmax_rows(model, b, device)
        if buf is None:
            size = max(1, int(block_rows(p.shape[1])))
            buf, rows = np.empty((size, p.shape[1]), np.float32), np.empty(size, np.int64)
        i = 0
        while i < len(p):  # a batch may straddle two blocks
            take = min(len(p) - i, len(buf) - n)
            buf[n:n + take], rows[n:n + take] = p[i:i + take], r[i:i + take]
            n, i = n + take, i + take
            if n == len(buf):
                yield buf, rows
                n = 0
    if n:
        yield buf[:n], rows[:n]


@torch.no_grad()
def validate(model: torch.nn.Module, batches: Iterable[Any], labels: np.ndarray,
             device: torch.device) -> dict[str, float]:
    """``{"val_macro_f1", "val_accuracy"}`` of ``model`` on ``batches`` (labels by store row).
    Only the argmax of each batch is kept, never the (N, K) probabilities."""
    model.eval()
    preds, rows, k = [], [], 0
    for b in batches:
        p, r = _softmax_rows(model, b, device)
        preds.append(p.argmax(1))
        rows.append(r)
        k = p.shape[1]
    if not rows:
        return {"val_macro_f1": 0.0, "val_accuracy": 0.0}
    pred, y = np.concatenate(preds), labels[np.concatenate(rows)]
    return {"val_macro_f1": macro_f1(y, pred, k), "val_accuracy": float((pred == y).mean())}


class EarlyStopping:
    """Keeps the weights of the epoch with the best validation macro-F1; says stop after
    ``patience`` epochs without a better one. Also the per-epoch history of the fold."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best, self.best_epoch, self.bad = -1.0, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def update(self, model: torch.nn.Module, record: dict[str, Any]) -> bool:
        """Record an epoch (``record`` has ``epoch`` and ``val_macro_f1``); True = stop now."""
        self.history.append(record)
        if record["val_macro_f1"] > self.best + 1e-9:
            self.best, self.best_epoch, self.bad = record["val_macro_f1"], record["epoch"], 0
            self.best_state = {k: v.detach().to("cpu", copy=True)
                               for k, v in model.state_dict().items()}
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best epoch's weights back into ``model``."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    @property
    def epoch_times(self) -> list[float]:
        return [h["seconds"] for h in self.history]
