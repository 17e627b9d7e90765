"""`stack()`: checked inputs -> cross-fitted stacker -> a run directory of kind ``"stack"``.

Leak-freedom is the whole point, so the procedure is fixed (docs/stacking.md):

1. Every source run was trained on the store's canonical folds, so its ``oof.npy`` row for item i
   came from a model that never saw i. :class:`~fusion.stack.inputs.StackInputs` checks that the
   runs agree on store, folds, classes and labels and that every block is row-normalised.
2. :func:`~fusion.stack.crossfit.cross_fit` fits one stacker per fold on the other folds and
   scores the fold (the stack's own out-of-fold predictions), then refits on every trainable row
   to score the holdout.
3. GBDT stackers also write per-item TreeSHAP contributions of each source run.

The run is written by :func:`fusion.rundir.write_run`, which scores it with
:mod:`fusion.metrics` like every head run, so a stack can be stacked or compared with heads.
Defaults of :func:`stack` are stated once, here; the CLI passes only what the user gave.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StackError
from ..metrics import classification_metrics
from ..rundir import Run, RunWriter, write_run
from .attribution import CONTRIBUTIONS_FILE, group_matrix, write_contributions
from .auto import (
    AUTO,
    AUTO_CANDIDATES,
    AUTO_GBDT_MAX_WORK,
    AUTO_MAX_PER_CLASS_K,
    AUTO_PARAMS,
    AUTO_TOLERANCE,
    DEFAULT_STACKER,
    auto_candidates,
    by_k,
    candidate_rule,
    selection_record,
)
from .blend import BLEND, BLEND_FILE, Member, blend_fit
from .crossfit import CrossFit, cross_fit, explain
from .dask import connect
from .inputs import StackInputs, candidate_matrix, feature_matrix, fingerprint, label, modalities
from .stackers import Stacker, create_stacker, stacker_class

__all__ = ["AUTO", "AUTO_CANDIDATES", "AUTO_GBDT_MAX_WORK", "AUTO_MAX_PER_CLASS_K", "AUTO_PARAMS",
           "AUTO_TOLERANCE",
           "BLEND", "DEFAULT_SEED", "DEFAULT_STACKER", "FEATURES", "auto_candidates",
           "default_out", "stack"]

FEATURES = ("probs", "probs+pooled")  # the first is the default
DEFAULT_SEED = 0


def default_out(stacker: str) -> Path:
    """Where `fusion stack` writes without ``--out``: ``runs/stack-<stacker>``."""
    return Path("runs") / f"stack-{stacker}"


def stack(
    runs: Sequence[str | os.PathLike | Run],
    *,
    stacker: str = DEFAULT_STACKER,
    features: str = FEATURES[0],
    params: dict[str, Any] | None = None,
    seed: int = DEFAULT_SEED,
    out: str | os.PathLike | None = None,
    dask: str | None = None,
    pooled: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int | None = None,
    pooled_dims: int | None = None,
    pooled_sets: Sequence[str] | None = None,
) -> Run:
    """Cross-fit ``stacker`` on the source runs' out-of-fold probabilities and write a stack run.

    ``features="probs+pooled"`` appends ``pooled`` (N_store, D) embedding columns (the pooled
    vectors of the store's feature sets ``pooled_sets``, in order, which `fusion predict` needs
    to apply the stack to new items); with
    ``pooled_dims`` each fitted model first projects them on their first ``pooled_dims`` principal
    components, a PCA fitted on that model's own training rows (multi-level fusion, Verma et
    al. 2020; leak-free like the stacker itself). ``dask`` is a
    scheduler address (``tcp://host:8786``): the GBDT then trains on that cluster. Returns the
    written run; ``run.extra["cv_indices"]`` holds the store rows of every fit/valid/scored split.
    ``out=None`` writes into a fresh temporary directory. ``threads`` sets each stacker's thread
    parameter (``threads_param``) unless ``params`` sets it.

    ``stacker="auto"`` (the default) cross-fits the stackers of ``AUTO_CANDIDATES`` (the GBDT
    only below ``AUTO_GBDT_MAX_WORK``), then a blend of them (:mod:`.blend`), and keeps the one
    with the best out-of-fold macro-F1 (no holdout row is used to choose); the choice, every
    candidate's score, the blend's weights and the reasons go to ``config["selection"]``.
    """
    say = progress or (lambda _msg: None)
    stacker = stacker.strip().lower()
    if stacker == AUTO and (params or dask is not None):
        raise StackError(
            "--params and --dask need one stacker; add e.g. --stacker lightgbm (the default "
            f"'auto' tries {', '.join(AUTO_CANDIDATES)} with their defaults)"
        )
    if stacker != AUTO and dask is not None and not stacker_class(stacker).supports_dask:
        raise StackError(
            f"stacker {stacker!r} cannot train on Dask; use lightgbm or xgboost, or drop --dask"
        )
    if features not in FEATURES:
        raise StackError(f"features={features!r} is not one of {list(FEATURES)}")
    inp = StackInputs(runs)
    pooled = inp.check_pooled(features, pooled)
    if pooled_dims is not None and pooled is None:
        raise StackError(f"pooled_dims={pooled_dims} reduces pooled features; add "
                         "features='probs+pooled' (CLI: --features probs+pooled --pooled SET)")
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="fusion-stack-")) / f"stack-{stacker}"
    out = Path(out)
    for r in inp.runs:
        if out.resolve() == r.path.resolve():
            raise StackError(
                f"--out {str(out)!r} is the source run {label(r)}; choose another directory"
            )
    t_all = time.perf_counter()
    n_pooled = 0 if pooled is None else pooled.shape[1]
    if pooled_dims is not None:
        n_pooled = min(n_pooled, pooled_dims)
    auto = stacker == AUTO
    n_rows = len(inp.trainable)
    candidates = auto_candidates(inp.k, n_rows, len(inp.runs)) if auto else (stacker,)
    tried: list[dict[str, Any]] = []
    fitted: list[_Fitted] = []
    y = inp.labels[inp.trainable]
    with connect(dask) if dask is not None else nullcontext() as client:
        for name in candidates:
            if stacker == AUTO:
                say(f"auto: cross-fitting candidate {name!r}")
            cand_params = {**AUTO_PARAMS.get(name, {}), **(params or {})} if auto else params
            # auto explains only the stacker it keeps (after the choice): TreeSHAP of every
            # candidate would cost about as much as their fits
            one = _cross_fit_one(inp, name, cand_params, threads, seed, client, pooled,
                                 n_pooled, pooled_dims, say, explain_now=len(candidates) == 1)
            fitted.append(one)
            tried.append({"stacker": name, "oof_macro_f1": _f1(y, one.fit.oof),
                          "train_seconds": round(one.fit.train_seconds, 4),
                          **({"auto_params": AUTO_PARAMS[name]} if auto and name in AUTO_PARAMS
                             else {})})
    blend = None
    if len(fitted) > 1:  # a blend of the candidates, cross-fitted one level up (.blend)
        bfit, blend = blend_fit([Member(f.name, f.config_params(), f.fit) for f in fitted], y,
                                inp.assignment[inp.trainable])
        tried.append({"stacker": BLEND, "oof_macro_f1": _f1(y, bfit.oof),
                      "train_seconds": round(blend["seconds"], 4), "used": blend["used"]})
        fitted.append(_Fitted(BLEND, None, bfit, fitted[0].names, blend=blend))
    chosen = fitted[0]
    best_f1 = tried[0]["oof_macro_f1"]
    for one, t in zip(fitted[1:], tried[1:], strict=True):
        if t["oof_macro_f1"] > best_f1 + AUTO_TOLERANCE:
            chosen, best_f1 = one, t["oof_macro_f1"]
    stacker, fit = chosen.name, chosen.fit
    if chosen.probe is not None and chosen.probe.explain and fit.contrib is None:
        fit.contrib = explain(fit, chosen.X, chosen.X_ho, inp.assignment[inp.trainable],
                              chosen.group, chosen.X_hf)
    selection = (selection_record(tried, stacker) if len(candidates) > 1 else
                 by_k(tried, inp.k) if auto else None)
    if selection is not None:
        say(f"auto: chose {stacker!r}: {selection['why']}")
        if blend is not None:
            selection["blend"] = blend
        if len(candidates) > 1:
            selection["candidate_rule"] = candidate_rule(inp.k, n_rows, len(inp.runs))
    sources = _sources(inp)
    head = f"stack-{stacker}"
    config: dict[str, Any] = {
        "kind": "stack",
        "head": head,
        "name": out.name,
        "stacker": stacker,
        "features": features,
        "feature_names": chosen.names,
        "n_pooled": n_pooled,
        "pooled_dims": pooled_dims,
        "pooled_sets": list(pooled_sets) if pooled_sets is not None else None,
        # the k of each source's top-k classes the candidate stacker reads (`fusion predict`)
        "source_k": (min(inp.source_k, inp.k) if getattr(chosen.probe, "topk_input", False)
                     else None),
        # a blend's members keep their own params in weights/blend.json
        "params": chosen.config_params() if chosen.probe is not None else {},
        "user_params": dict(params or {}),
        "seed": seed,
        "selection": selection,
        # -p tune=true: what each fitted model tried and chose (stackers/tuning.py)
        "tuning": {tag: m.tuning for tag, m in fit.models if m.tuning is not None} or None,
        "holdout_scheme": _scheme_note(fit, inp),
        "dask": dask is not None,
        "sources": sources,
        "modalities": sorted({m for s in sources for m in s["modalities"]}),
        "store": inp.store,
        "classes": inp.classes,
        "folds": inp.folds,
        "labels": inp.labels.tolist(),
    }
    metrics: dict[str, Any] = {
        "head": head,
        "kind": "stack",
        "stacker": stacker,
        "selection": selection,
        "holdout_scheme": fit.holdout_scheme,
        "folds": fit.folds,
        "refit": {"rounds": fit.rounds, "seconds": round(fit.refit_seconds, 4)},
        "train_seconds": round(sum(t["train_seconds"] for t in tried), 4),  # all candidates
        "total_seconds": round(time.perf_counter() - t_all, 4),
        "sources": sources,
        "attribution": _attribution_note(chosen.probe, stacker),
    }
    run = write_run(out, config=config, metrics=metrics, oof=fit.oof, oof_rows=inp.trainable,
                    holdout=fit.hold, holdout_rows=inp.holdout, ids=inp.ids, labels=inp.labels,
                    folds=inp.assignment, classes=inp.classes,
                    extra_files=lambda w: _extra_files(w, inp, fit, n_pooled, blend if
                                                       stacker == BLEND else None))
    run.extra["cv_indices"] = fit.cv
    return run


@dataclass
class _Fitted:
    """One cross-fitted stacker (or the blend, ``probe`` None) and the inputs it was fitted on
    (kept for the TreeSHAP of the one `auto` keeps)."""

    name: str
    probe: Stacker | None
    fit: CrossFit
    names: list[str]
    X: np.ndarray | None = None
    X_ho: np.ndarray | None = None
    X_hf: np.ndarray | None = None
    group: np.ndarray | None = None
    blend: dict[str, Any] | None = None

    def config_params(self) -> dict[str, Any]:
        """The params its run config records (what `Stacker.load` rebuilds it from)."""
        assert self.probe is not None
        return {**self.probe.params, **self.probe.procedure_params()}


def _f1(y: np.ndarray, probs: Any) -> float:
    return classification_metrics(y, probs)["macro_f1"]


def _cross_fit_one(inp: StackInputs, stacker: str, params: dict[str, Any] | None,
                   threads: int | None, seed: int, client: Any, pooled: np.ndarray | None,
                   n_pooled: int, pooled_dims: int | None, say: Callable[[str], None],
                   explain_now: bool = True) -> _Fitted:
    """Cross-fit one stacker; TreeSHAP now (``explain_now``) or later with :func:`explain`."""
    params = dict(params or {})
    key = stacker_class(stacker).threads_param
    if threads is not None and key is not None:
        params.setdefault(key, threads)

    def new_model() -> Stacker:
        return create_stacker(stacker, n_classes=inp.k, params=params, seed=seed, client=client,
                              n_sources=len(inp.runs), pooled_dims=pooled_dims)

    probe = new_model()
    if getattr(probe, "topk_input", False):  # the candidate stacker: top-k inputs, never N x K
        if pooled is not None:
            raise StackError(f"stacker {stacker!r} takes the runs' top-k probabilities only; "
                             "drop --features probs+pooled or pick another --stacker")
        X, X_ho, _, X_hf = candidate_matrix(inp)
        names = probe.feature_names(inp.names)
        group = probe.group_matrix() if probe.explain else None
    else:
        X, X_ho, names, X_hf = feature_matrix(inp, probe.log_probs, pooled, stacker)
        if pooled_dims is not None:  # the columns the models see after their own PCA
            names = names[: len(inp.runs) * inp.k] + [f"pooled_pca:{j}"
                                                       for j in range(n_pooled)]
        group = group_matrix(len(inp.runs), inp.k, n_pooled) if probe.explain else None
    fit = cross_fit(new_model, X, inp.labels[inp.trainable], X_ho,
                    inp.assignment[inp.trainable], n_folds=inp.n_folds,
                    trainable=inp.trainable, holdout=inp.holdout, seed=seed,
                    group=group if explain_now else None, say=say, X_ho_folds=X_hf)
    return _Fitted(stacker, probe, fit, names, X, X_ho, X_hf, group)


def _scheme_note(fit: CrossFit, inp: StackInputs) -> dict[str, Any]:
    """How the holdout was scored (docs/stacking.md, "Cross-fitting")."""
    if fit.holdout_scheme == "per_fold":
        return {"scheme": "per_fold", "note": "mean over fold models f of the stacker of fold "
                "f applied to the source runs' holdout_folds[f]"}
    return {"scheme": "refit", "note": "a refit on every trainable row scored the source runs' "
            "fold-averaged holdout probabilities", "runs_without_holdout_folds":
            inp.lacking_holdout_folds}


def _sources(inp: StackInputs) -> list[dict[str, Any]]:
    """Identity and scores of every source run, as the stack saw it."""
    y, y_ho = inp.labels[inp.trainable], inp.labels[inp.holdout]
    out = []
    for name, r, b, h in zip(inp.names, inp.runs, inp.oof, inp.hold, strict=True):
        so, sh = classification_metrics(y, b), classification_metrics(y_ho, h)
        out.append({
            "name": name,
            "path": str(r.path.resolve()),
            "head": r.head,
            "kind": r.config.get("kind"),
            "modalities": modalities(r),
            "fingerprint": fingerprint(b, h),
            "accuracy": so["accuracy"],
            "macro_f1": so["macro_f1"],
            "holdout": {"accuracy": sh["accuracy"], "macro_f1": sh["macro_f1"]},
        })
    return out


def _attribution_note(probe: Stacker | None, stacker: str) -> dict[str, Any]:
    if probe is None:
        return {"method": None, "reason": "a blend of stackers has no TreeSHAP of its own; "
                "stack with --stacker lightgbm for contributions"}
    if probe.explain:
        note = {"method": "treeshap", "file": CONTRIBUTIONS_FILE,
                "target": "margin of the predicted class"}
        cap = getattr(probe, "explain_rows", None)  # the candidate stacker explains a sample
        if cap is not None:
            note["sample"] = (f"a seeded sample of at most {cap} items per scored block (the "
                              "others are not in the file); -p explain_rows=N to change it")
        return note
    reason = (f"{stacker} has no TreeSHAP; contributions are written only by the lightgbm "
              "and xgboost stackers" if not probe.attribution else "explain=false was set")
    return {"method": None, "reason": reason}


def _extra_files(w: RunWriter, inp: StackInputs, fit: CrossFit, n_pooled: int,
                 blend: dict[str, Any] | None) -> None:
    """``cv_indices.npz``, ``contributions.csv`` (GBDTs) and ``weights/`` of a stack run (a
    blend: its members' models and ``weights/blend.json``)."""
    np.savez(w.file("cv_indices.npz"), **fit.cv)
    if fit.contrib is not None:
        rows = np.concatenate([inp.trainable, inp.holdout])
        preds = np.concatenate([fit.oof.argmax(1), fit.hold.argmax(1)])
        write_contributions(
            w.file(CONTRIBUTIONS_FILE),
            ids=[inp.ids[r] for r in rows],
            splits=["oof"] * len(inp.trainable) + ["holdout"] * len(inp.holdout),
            folds=inp.assignment[rows].tolist(),
            true=[inp.classes[v] if v >= 0 else "" for v in inp.labels[rows]],
            predicted=[inp.classes[p] for p in preds],
            groups=list(inp.names) + (["pooled"] if n_pooled else [])
            + (["shared"] if fit.contrib.shape[1] == len(inp.names) + 2 and not n_pooled else [])
            + ["bias"],
            values=fit.contrib,
        )
    for tag, model in fit.models:
        model.save(w.file(f"weights/{tag}"))
    if blend is not None:
        w.file(f"weights/{BLEND_FILE}").write_text(json.dumps(blend, indent=1) + "\n")
