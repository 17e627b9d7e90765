"""Synthetic source runs for tests, docs and the stacker benchmark: no store, no training.

:func:`make_synthetic_runs` writes run directories (through :func:`fusion.rundir.write_run`, like
every real run) that share one fake store and its folds, with probabilities drawn so that the
runs are complementary: what a stacker is for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import softmax

from .errors import StackError
from .rundir import write_run

__all__ = ["make_synthetic_runs"]


def make_synthetic_runs(
    out_dir: str | os.PathLike,
    *,
    n_items: int = 600,
    n_classes: int = 6,
    n_runs: int = 3,
    n_folds: int = 5,
    holdout: float = 0.2,
    seed: int = 0,
    holdout_folds: bool = False,
    skill_scale: float = 1.0,
    near_chance: Sequence[str] = (),
) -> list[Path]:
    """Write ``n_runs`` fake `fusion train` runs sharing one fake store under ``out_dir``.

    A "text" run is confident on the first half of the classes, an "image" run on the other
    half, a "fusion" run moderately good everywhere, and further "fusion-i" runs have random
    per-class skill. Folds are stratified, with ``holdout`` of every class in fold -1; item ids
    are ``item-00000``... Returns the run directories in that order.

    ``holdout_folds=True`` simulates k fold models per run, as `fusion train` has them: each
    fold model adds its own noise to the run's logits, a trainable row's probabilities come from
    the model of its fold, the holdout's from the mean of the fold models, and each fold model's
    holdout probabilities are written as ``holdout_folds.npy``. ``skill_scale`` multiplies every
    run's skill (0.5: weaker sources that disagree more); runs named in ``near_chance`` get a
    skill of 0.05 on every class (a source that is nearly noise).
    """
    if n_runs < 2:
        raise StackError(f"n_runs={n_runs}: need at least 2 runs to stack")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_items) % n_classes)
    assignment = np.empty(n_items, dtype=np.int64)
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_ho = int(round(holdout * len(idx)))
        assignment[idx[:n_ho]] = -1
        assignment[idx[n_ho:]] = np.arange(len(idx) - n_ho) % n_folds
    classes = [f"c{c}" for c in range(n_classes)]
    store = {
        "url": f"synthetic://{n_items}x{n_classes}/{seed}",
        "fingerprint": f"synthetic-{n_items}-{n_classes}-{seed}",
        "folds_fingerprint": f"synthetic-folds-{n_folds}-{holdout}-{seed}",
    }
    folds = {"k": n_folds, "assignment": assignment.tolist(), "seed": seed, "holdout": holdout}
    half = np.arange(n_classes) < n_classes // 2
    skills = [
        ("text", ["text"], np.where(half, 4.0, 0.3)),
        ("image", ["image"], np.where(half, 0.3, 3.5)),
        ("fusion", ["image", "text"], np.full(n_classes, 1.6)),
    ]
    for i in range(3, n_runs):
        skills.append((f"fusion-{i - 2}", ["image", "text"], rng.uniform(0.5, 2.5, n_classes)))
    trainable = np.flatnonzero(assignment >= 0)
    hold_rows = np.flatnonzero(assignment == -1)
    ids = [f"item-{i:05d}" for i in range(n_items)]
    paths = []
    for name, mods, skill in skills[:n_runs]:
        skill = np.full(n_classes, 0.05) if name in near_chance else skill * skill_scale
        logits = rng.normal(0.0, 1.0, (n_items, n_classes))
        logits[np.arange(n_items), labels] += skill[labels]
        probs = softmax(logits, axis=1).astype(np.float32)
        per_fold = None
        if holdout_folds:  # fold model f = the run's logits + its own noise
            fold_probs = softmax(logits[None] + rng.normal(0.0, 0.8, (n_folds, *logits.shape)),
                                 axis=2).astype(np.float32)
            probs[trainable] = fold_probs[assignment[trainable], trainable]
            per_fold = fold_probs[:, hold_rows]
            probs[hold_rows] = per_fold.mean(0)
        head = name if name in ("text", "image") else "concat"
        config = {"kind": "train", "head": head, "name": name, "modalities": mods,
                  "store": store, "classes": classes, "folds": folds, "labels": labels.tolist()}
        run = write_run(Path(out_dir) / name, config=config, metrics={"head": head, "kind": "train"},
                        oof=probs[trainable], oof_rows=trainable, holdout=probs[hold_rows],
                        holdout_rows=hold_rows, ids=ids, labels=labels, folds=assignment,
                        classes=classes, holdout_folds=per_fold)
        paths.append(run.path)
    return paths
