"""The MLP stacker: the stacking feed-forward net of Chordia & Kumar (2020), in torch."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.special import softmax
from sklearn.preprocessing import StandardScaler
from torch import nn

from ...errors import StackError
from .base import Stacker, register_stacker

__all__ = ["MLPStacker"]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads, restoring the caller's count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@register_stacker("mlp")
class MLPStacker(Stacker):
    """One hidden layer over the concatenated probability blocks, softmax output, cross-entropy;
    early-stopped on the inner split (patience ``early_stopping_rounds`` epochs), refit for the
    median best epoch. Seeded through a private RNG state, so the global torch seed is left
    alone."""

    early_stopping_default = 10
    threads_param = "threads"
    defaults: ClassVar[dict[str, Any]] = {
        "hidden": 64,
        "dropout": 0.1,
        "lr": 3e-3,
        "weight_decay": 1e-4,
        "batch_size": 128,
        "max_epochs": 100,
        "threads": 1,  # a net this small runs fastest on one thread; more only add contention
    }

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.require_known_params()

    def fit_local(self, X, y, X_valid, y_valid, n_classes, rounds) -> None:
        p = self.params
        self.scaler = StandardScaler().fit(X)
        Xt = self.tensor(X)  # (N, F)
        yt = torch.as_tensor(y, dtype=torch.long)  # (N,)
        Xv = self.tensor(X_valid) if X_valid is not None else None
        yv = torch.as_tensor(y_valid, dtype=torch.long) if X_valid is not None else None
        epochs = int(rounds) if rounds is not None else int(p["max_epochs"])
        with torch_threads(int(p["threads"])), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = nn.Sequential(
                nn.Linear(X.shape[1], int(p["hidden"])),
                nn.ReLU(),
                nn.Dropout(float(p["dropout"])),
                nn.Linear(int(p["hidden"]), n_classes),
            )
            opt = torch.optim.AdamW(
                net.parameters(), lr=float(p["lr"]), weight_decay=float(p["weight_decay"])
            )
            gen = torch.Generator().manual_seed(self.seed)
            loss_fn = nn.CrossEntropyLoss()
            best_loss, best_epoch, best_state, stale = math.inf, epochs, None, 0
            bs = int(p["batch_size"])
            for epoch in range(1, epochs + 1):
                net.train()
                for idx in torch.randperm(len(Xt), generator=gen).split(bs):
                    opt.zero_grad()
                    loss_fn(net(Xt[idx]), yt[idx]).backward()
                    opt.step()
                if Xv is None:
                    continue
                net.eval()
                with torch.no_grad():
                    v = float(loss_fn(net(Xv), yv))
                if v < best_loss - 1e-6:
                    best_loss, best_epoch, stale = v, epoch, 0
                    best_state = {k: t.clone() for k, t in net.state_dict().items()}
                else:
                    stale += 1
                    if stale >= self.early_stopping_rounds:
                        break
            if best_state is not None:
                net.load_state_dict(best_state)
        net.eval()
        self.net = net
        self.best_iteration = best_epoch

    def tensor(self, X: np.ndarray) -> torch.Tensor:
        """Standardised float32 features."""
        return torch.as_tensor(self.scaler.transform(X), dtype=torch.float32)

    def margin_local(self, X):
        with torch.no_grad(), torch_threads(int(self.params["threads"])):
            return self.net(self.tensor(X)).double().numpy()

    def proba_local(self, X):
        return softmax(self.margin_local(X), axis=1)

    def save_model(self, path_stem):
        path = path_stem.with_suffix(".safetensors")
        state = {k: t.contiguous() for k, t in self.net.state_dict().items()}
        state["scaler.mean"] = torch.as_tensor(self.scaler.mean_, dtype=torch.float64)
        state["scaler.scale"] = torch.as_tensor(self.scaler.scale_, dtype=torch.float64)
        save_file(state, str(path), metadata={"classes": ",".join(map(str, self.present))})
        return path

    def load_local(self, path_stem):
        state = load_file(str(path_stem.with_suffix(".safetensors")))
        if "scaler.mean" not in state:
            raise StackError(f"{path_stem.with_suffix('.safetensors')} lacks the input scaling "
                             "(written by an older version); re-run `fusion stack` to predict")
        self.scaler = StandardScaler()
        self.scaler.mean_ = state.pop("scaler.mean").numpy()
        self.scaler.scale_ = state.pop("scaler.scale").numpy()
        self.scaler.n_features_in_ = len(self.scaler.mean_)
        hidden, n_in = state["0.weight"].shape
        net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(0.0),
                            nn.Linear(hidden, state["3.weight"].shape[0]))
        net.load_state_dict(state, strict=True)
        self.net = net.eval()
