"""A blend of cross-fitted stackers: greedy ensemble selection over their out-of-fold outputs.

After `auto` (fusion.stack.procedure) has cross-fitted its candidates, each candidate has
out-of-fold probabilities from fold models that never saw those rows. The blend is one more
level of the same cross-fitting, with Caruana's greedy selection with replacement
(:func:`~fusion.stack.stackers.ensemble.greedy_selection`, the `ensemble` stacker's rule) as the
model:

- fold f's weights ``w_f`` are chosen on the candidates' OOF rows of the *other* folds only; the
  blend's OOF row of an item of fold f is ``sum_m w_f[m] * oof_m``: the fold's own labels
  choose nothing that scores it, so the blend's OOF macro-F1 is comparable with the candidates'
  (a stack of stacks has the same property, docs/stacking.md);
- the holdout, scheme ``per_fold``: the mean over f of ``sum_m w_f[m] * P_mf``, ``P_mf`` being
  candidate m's fold-f model on its fold-f holdout inputs (blend fold model f = the candidates'
  fold-f models with weights ``w_f``); scheme ``refit``: weights chosen on every OOF row
  (``weights``) on the candidates' refit holdouts.

:class:`Blend` is the loaded form (``weights/blend.json`` plus each member's saved models),
which :mod:`fusion.stack.apply` applies to new items the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StackError
from ..metrics import classification_metrics
from .crossfit import CrossFit
from .stackers import Stacker, stacker_class
from .stackers.ensemble import greedy_selection

__all__ = ["BLEND", "BLEND_FILE", "BLEND_SIZE", "Blend", "blend_fit", "load_blend"]

BLEND = "blend"  # the name a blended stack run records as its stacker
BLEND_FILE = "blend.json"  # under weights/: members, their params and the weights
BLEND_SIZE = 25  # greedy steps (AutoGluon's WeightedEnsemble default), the best prefix kept


@dataclass
class Member:
    """One cross-fitted candidate of the blend."""

    name: str  # the stacker, e.g. "mlp"
    params: dict[str, Any]  # what its run config would record (params + procedure params)
    fit: CrossFit


def blend_fit(members: Sequence[Member], y: np.ndarray, fold_of: np.ndarray,
              size: int = BLEND_SIZE) -> tuple[CrossFit, dict[str, Any]]:
    """Cross-fit the blend of ``members`` (``y``, ``fold_of``: labels and folds of the trainable
    rows, in the members' OOF row order): ``(its CrossFit, the weights record)``. Its models
    are the members' models with tags ``<member>-<tag>``; members no fold weighs are left out."""
    t0 = time.perf_counter()
    oof = np.stack([np.asarray(m.fit.oof, dtype=np.float64) for m in members])  # (M, N, K)
    first = members[0].fit
    fold_tags = [t for t, _ in first.models if t.startswith("fold")]
    fold_w = []
    blended = np.zeros(oof.shape[1:])
    for tag in fold_tags:
        f = int(tag[4:])
        rows, rest = fold_of == f, fold_of != f  # weights chosen on the other folds' rows
        w, _ = greedy_selection(oof[:, rest], y[rest], size)
        blended[rows] = np.tensordot(w, oof[:, rows], axes=1)
        fold_w.append(w)
    w_all, losses = greedy_selection(oof, y, size)  # the refit scheme's weights
    if first.holdout_scheme == "per_fold":
        hold = sum(np.tensordot(w, np.stack([np.asarray(m.fit.hold_folds[i]) for m in members]),
                                axes=1) for i, w in enumerate(fold_w)) / len(fold_w)
    else:
        hold = np.tensordot(w_all, np.stack([np.asarray(m.fit.hold) for m in members]), axes=1)
    used = (np.max(fold_w, axis=0) if first.holdout_scheme == "per_fold" else w_all) > 0
    models = [(f"{m.name}-{tag}", model) for m, u in zip(members, used, strict=True) if u
              for tag, model in m.fit.models]
    cv = {k: v for k, v in first.cv.items() if not k.endswith("_valid")}
    for tag in fold_tags:  # early-stopping rows of every member (all outside the scored fold)
        cv[f"{tag}_valid"] = np.unique(np.concatenate(
            [m.fit.cv.get(f"{tag}_valid", np.zeros(0, np.int64)) for m in members]))
    folds = []
    for i, rec in enumerate(first.folds):
        rows = fold_of == rec["fold"]
        folds.append({**rec, "best_iteration": None,
                      "seconds": round(sum(m.fit.folds[i]["seconds"] for m in members), 4),
                      "weights": [round(float(v), 4) for v in fold_w[i]],
                      "macro_f1": classification_metrics(y[rows], blended[rows])["macro_f1"]})
    seconds = time.perf_counter() - t0
    fit = CrossFit(oof=blended, hold=hold, contrib=None, cv=cv, folds=folds, models=models,
                   rounds=int(np.argmin(losses)) + 1, refit_seconds=first.refit_seconds,
                   train_seconds=sum(m.fit.train_seconds for m in members) + seconds,
                   holdout_scheme=first.holdout_scheme)
    record = {
        "members": [{"stacker": m.name, "params": m.params} for m in members],
        "fold_weights": [[float(v) for v in w] for w in fold_w],
        "fold_tags": fold_tags,
        "weights": [float(v) for v in w_all],
        "used": [m.name for m, u in zip(members, used, strict=True) if u],
        "scheme": first.holdout_scheme,
        "size": size,
        "seconds": round(seconds, 4),
    }
    return fit, record


class Blend:
    """A saved blend, loaded: each used member's models (per fold, or its refit) and the
    weights; :meth:`apply` combines the members' probabilities as the stack scored its holdout."""

    def __init__(self, record: dict[str, Any], members: list[tuple[str, list[tuple[str, Stacker]]]]):
        self.record = record
        self.members = members  # [(stacker name, [(tag, model), ...]), ...] of the used members
        names = [m["stacker"] for m in record["members"]]
        idx = [names.index(n) for n, _ in members]
        self.fold_weights = np.asarray(record["fold_weights"])[:, idx]  # (F, used)
        self.weights = np.asarray(record["weights"])[idx]  # (used,)


def load_blend(weights: Path, *, n_sources: int, pooled_dims: int | None, seed: int,
               per_fold: bool) -> Blend:
    """The blend saved under ``weights`` (``blend.json`` and ``<member>-<tag>.*``)."""
    path = weights / BLEND_FILE
    if not path.is_file():
        raise StackError(f"{path} is missing: a blended stack keeps its members and weights "
                         "there; re-run `fusion stack`")
    record = json.loads(path.read_text())
    tags = record["fold_tags"] if per_fold else ["refit"]
    params = {m["stacker"]: m["params"] for m in record["members"]}
    members = []
    for name in record["used"]:
        cls = stacker_class(name)
        members.append((name, [(t, cls.load(weights / f"{name}-{t}", params=dict(params[name]),
                                            n_sources=n_sources, pooled_dims=pooled_dims,
                                            seed=seed)) for t in tags]))
    return Blend(record, members)
