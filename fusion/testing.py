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
from .probs import TopK, mean_topk
from .rundir import write_run

__all__ = ["make_many_class_runs", "make_synthetic_runs"]


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


def make_many_class_runs(
    out_dir: str | os.PathLike,
    *,
    n_items: int = 2000,
    n_classes: int = 1000,
    n_runs: int = 3,
    n_folds: int = 5,
    holdout: float = 0.2,
    k: int = 20,
    zipf: float = 1.0,
    seed: int = 0,
    dense_max_classes: int | None = None,
) -> list[Path]:
    """Fake runs at many classes, written top-k without ever building an N x K array.

    Class sizes follow a Zipf law (``zipf`` exponent); folds are unstratified (a seeded random
    assignment, ``holdout`` of the items in fold -1). Each item has 24 distinct confusable
    classes, its true class among them; each run keeps a random 20 of the 24 (so it misses the
    true class one time in six, and whether a run kept a class says nothing about it) ranked by
    noisy logits; run r is skilled on the classes c with c % n_runs == r. Rows keep 95% of the
    mass on those 20 and spread 5% over the other classes. Each fold model adds its own noise: OOF rows come from the
    model of their fold, the holdout from the mean of the fold models (``holdout_folds`` is
    written top-k). Returns the run directories (``run0``, ``run1``, ...).
    """
    if n_classes < 25:
        raise StackError(f"n_classes={n_classes}: make_many_class_runs needs at least 25")
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, n_classes + 1) ** zipf
    labels = rng.permutation(rng.choice(n_classes, n_items, p=w / w.sum()))
    assignment = np.where(rng.random(n_items) < holdout, -1, rng.integers(0, n_folds, n_items))
    classes = [f"c{c}" for c in range(n_classes)]
    store = {"url": f"synthetic://{n_items}x{n_classes}/{seed}",
             "fingerprint": f"synthetic-many-{n_items}-{n_classes}-{seed}",
             "folds_fingerprint": f"synthetic-many-folds-{n_folds}-{holdout}-{seed}"}
    folds = {"k": n_folds, "assignment": assignment.tolist(), "seed": seed, "holdout": holdout}
    step = max(1, (n_classes - 1) // 24)
    offsets = np.cumsum(rng.integers(1, step + 1, (n_items, 23)), axis=1)  # distinct, < K
    cand = np.hstack([labels[:, None], (labels[:, None] + offsets) % n_classes])  # (N, 24)
    trainable = np.flatnonzero(assignment >= 0)
    hold_rows = np.flatnonzero(assignment == -1)
    ids = [f"item-{i:06d}" for i in range(n_items)]
    paths = []
    for r in range(n_runs):
        cols = np.argsort(rng.random((n_items, 24)), axis=1)[:, :20]  # (N, 20) kept
        idx = np.take_along_axis(cand, cols, 1)
        skill = np.where(labels % n_runs == r, 3.0, 1.2)
        base = rng.normal(0.0, 1.0, idx.shape)
        base += (cols == 0) * skill[:, None]  # the true class, where this run kept it

        def model(noise: float, rows: np.ndarray, base=base, idx=idx) -> TopK:
            z = base[rows] + rng.normal(0.0, noise, (len(rows), base.shape[1]))
            p = softmax(z, axis=1) * 0.95
            order = np.argsort(-p, axis=1, kind="stable")[:, :k]
            pk = np.take_along_axis(p, order, 1).astype(np.float16)
            rest = np.clip(1.0 - pk.astype(np.float64).sum(1), 0, None).astype(np.float32)
            return TopK(np.take_along_axis(idx[rows], order, 1).astype(np.int32), pk, rest,
                        n_classes)

        oof = model(0.8, trainable)
        per_fold = [model(0.8, hold_rows) for _ in range(n_folds)]
        hold_folds = TopK(np.stack([t.idx for t in per_fold]), np.stack([t.p for t in per_fold]),
                          np.stack([t.rest for t in per_fold]), n_classes)
        name = f"run{r}"
        config = {"kind": "train", "head": "concat", "name": name, "modalities": ["image", "text"],
                  "store": store, "classes": classes, "folds": folds, "labels": labels.tolist()}
        run = write_run(Path(out_dir) / name, config=config,
                        metrics={"head": "concat", "kind": "train"}, oof=oof, oof_rows=trainable,
                        holdout=mean_topk(per_fold), holdout_rows=hold_rows, ids=ids,
                        labels=labels, folds=assignment, classes=classes,
                        holdout_folds=hold_folds, top_k=k, dense_max_classes=dense_max_classes)
        paths.append(run.path)
    return paths
