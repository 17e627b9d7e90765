"""Apply a finished stack run to its source runs' probabilities for new items.

A stack run keeps its fitted models in ``weights/`` (``fold{f}`` and, for the older ``refit``
holdout scheme, ``refit``), each with a JSON sidecar (:meth:`Stacker.save`). The prediction
for new items repeats how the stack scored its own holdout (docs/stacking.md, "Cross-fitting"):

- ``per_fold``: stacker f is applied to the source runs' fold-f model probabilities (the kind
  of input it was fitted on) and the outputs are averaged over f;
- ``refit``: the refit model is applied to the source runs' fold-averaged probabilities.

A blended stack (stacker ``"blend"``, :mod:`fusion.stack.blend`) does the same for each of its
members' models and weighs their outputs with the blend's weights (fold f's weights for fold f).

So predicting a stack's own holdout rows reproduces its ``holdout.npy``. This module is pure
numpy on probabilities; computing the source runs' probabilities is `fusion predict`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import StackError
from ..probs import Probs, TopK, mean_topk
from ..rundir import Run
from .blend import BLEND, Blend, load_blend
from .inputs import candidate_columns, input_block
from .stackers import Stacker, stacker_class

__all__ = ["PER_FOLD", "REFIT", "apply_stack", "holdout_scheme", "load_stack_models",
           "source_path"]

PER_FOLD, REFIT = "per_fold", "refit"


def holdout_scheme(run: Run) -> str:
    """``"per_fold"`` or ``"refit"``: how the stack scored its holdout, and so new items."""
    rec = run.config.get("holdout_scheme") or {}
    return rec.get("scheme", REFIT) if isinstance(rec, dict) else REFIT


def load_stack_models(run: Run) -> list[tuple[str, Stacker | Blend]]:
    """The stack's models that score new items: ``[("fold0", m0), ...]`` for ``per_fold``,
    ``[("refit", m)]`` for ``refit``, ``[("blend", Blend)]`` for a blend. Loading reads text,
    JSON, npz and safetensors only."""
    cfg = run.config
    weights = run.path / "weights"
    if cfg["stacker"] == BLEND:
        return [(BLEND, load_blend(weights, n_sources=len(cfg["sources"]),
                                   pooled_dims=cfg.get("pooled_dims"),
                                   seed=int(cfg.get("seed", 0)),
                                   per_fold=holdout_scheme(run) == PER_FOLD))]
    if holdout_scheme(run) == PER_FOLD:
        found = (re.fullmatch(r"fold(\d+)\.json", p.name) for p in weights.glob("fold*.json"))
        tags = [f"fold{n}" for n in sorted(int(m.group(1)) for m in found if m)]
    else:
        tags = ["refit"]
    if not tags or not all((weights / f"{t}.json").is_file() for t in tags):
        raise StackError(
            f"stack run {run.path.name!r} holds no loadable models in {weights} (written before "
            "stack models could be reloaded, or its weights were removed); re-run `fusion stack`")
    cls = stacker_class(cfg["stacker"])
    return [(t, cls.load(weights / t, params=dict(cfg.get("params") or {}),
                         n_sources=len(cfg["sources"]), pooled_dims=cfg.get("pooled_dims"),
                         seed=int(cfg.get("seed", 0))))
            for t in tags]


def _columns(run: Run, model: Stacker, probs: Sequence[np.ndarray], pooled: np.ndarray | None
             ) -> np.ndarray:
    if getattr(model, "topk_input", False):  # the candidate stacker: each source's top k
        k = run.config.get("source_k")
        if k is None:
            raise StackError(f"stack run {run.path.name!r} does not record the k of its "
                             "candidate inputs (written by an older version); re-run it")
        return candidate_columns(list(probs), int(k))
    blocks = [input_block(p, model.log_probs) for p in probs]
    if pooled is not None:
        blocks.append(np.asarray(pooled, dtype=np.float64))
    return np.hstack(blocks)


def apply_stack(run: Run, models: Sequence[tuple[str, Stacker | Blend]], *,
                per_fold: Sequence[np.ndarray] | None = None,
                mean: Sequence[np.ndarray] | None = None,
                pooled: np.ndarray | None = None) -> Probs:
    """(N, K) stack probabilities for N items (a :class:`~fusion.probs.TopK` block for a
    stacker whose outputs are top-k, the candidate stacker). ``per_fold[m]`` is source run m's (F, N, K)
    fold-model probabilities (scheme ``per_fold``), ``mean[m]`` its (N, K) fold-averaged ones
    (scheme ``refit``), in the order of the stack's ``sources``; ``pooled`` (N, D) the pooled
    vectors of ``config.pooled_sets`` when the stack used ``probs+pooled``."""
    if len(models) == 1 and isinstance(models[0][1], Blend):
        blend = models[0][1]
        outs = [_apply_models(run, ms, per_fold, mean, pooled) for _name, ms in blend.members]
        if holdout_scheme(run) == PER_FOLD:  # fold f: the members' fold-f models, weights w_f
            out = sum(np.tensordot(w, np.stack([o[f] for o in outs]), axes=1)
                      for f, w in enumerate(blend.fold_weights)) / len(blend.fold_weights)
        else:
            out = np.tensordot(blend.weights, np.stack([o[0] for o in outs]), axes=1)
    else:
        outs = _apply_models(run, models, per_fold, mean, pooled)
        if isinstance(outs[0], TopK):
            return mean_topk(outs) if holdout_scheme(run) == PER_FOLD else outs[0]
        out = sum(outs) / len(outs)
    out = np.asarray(out, dtype=np.float32)
    return out / np.maximum(out.sum(1, keepdims=True), 1e-12)


def _apply_models(run: Run, models: Sequence[tuple[str, Stacker]],
                  per_fold: Sequence[np.ndarray] | None, mean: Sequence[np.ndarray] | None,
                  pooled: np.ndarray | None) -> list[Probs]:
    """Each model's probabilities: fold model f on the sources' fold-f probabilities (scheme
    ``per_fold``), or the refit model on their fold-averaged ones (a list of one)."""
    n_src = len(run.config["sources"])
    if holdout_scheme(run) == PER_FOLD:
        if per_fold is None or len(per_fold) != n_src:
            raise StackError(f"stack run {run.path.name!r} needs the fold-model probabilities "
                             f"of its {n_src} source runs")
        n_folds = {len(p) for p in per_fold}
        if n_folds != {len(models)}:
            raise StackError(f"stack run {run.path.name!r} has {len(models)} fold models but its "
                             f"sources have {sorted(n_folds)} folds; predict with the runs it "
                             "was fitted on")
        return [m.predict_proba(_columns(run, m, [p[f] for p in per_fold], pooled))
                for f, (_tag, m) in enumerate(models)]
    if mean is None or len(mean) != n_src:
        raise StackError(f"stack run {run.path.name!r} needs the probabilities of its "
                         f"{n_src} source runs")
    (_tag, model), = models
    return [model.predict_proba(_columns(run, model, mean, pooled))]


def source_path(run: Run, source: dict) -> Path:
    """Where source run ``source`` (an entry of ``config.sources``) is: its recorded path, else
    a directory of the same name next to the stack run (runs copied together)."""
    recorded = Path(source["path"])
    for p in (recorded, run.path.parent / recorded.name):
        if (p / "config.json").is_file():
            return p
    raise StackError(f"source run {source['name']!r} of stack {run.path.name!r} is neither at "
                     f"{str(recorded)!r} nor next to the stack; copy it there")
