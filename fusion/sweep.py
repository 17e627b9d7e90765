"""`fusion sweep`: an Optuna study over a head's options and the training options.

Each trial is a k-fold `fusion.train` run on the cache, in memory, scored on its out-of-fold
macro-F1 (the holdout is never looked at). After each fold the mean out-of-fold macro-F1 of the
folds so far is reported as the trial's intermediate value; the pruner (median by default)
stops a hopeless trial before its remaining folds. The study lives in ``<out>/study.db``
(SQLite), so the same command run again continues it: trials that were running when a sweep
was killed are marked failed and their parameters tried again first, and ``n_trials`` counts
the finished (complete or pruned) trials over every invocation. The best trial is then trained
again into ``<out>/best``, a normal run directory (`fusion.rundir.write_run`) that `fusion
compare`, `fusion stack` and `fusion predict` accept; ``<out>/sweep.json`` lists every trial.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from .config import DEFAULT_HEAD, TrainConfig
from .data import prepare
from .errors import FusionError, TrainError
from .heads import head_options
from .rundir import Run, load_run
from .space import Space, parse_space
from .train import train

__all__ = ["SweepConfig", "SweepResult", "sweep", "STUDY_NAME"]

STUDY_NAME = "fusion-sweep"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class SweepConfig:
    """How a study runs (every default of `fusion sweep`, once)."""

    n_trials: int = 20  # finished trials (complete + pruned) the study reaches, over re-runs
    timeout: float | None = None  # seconds for this invocation (None: no limit)
    prune: bool = True
    startup_trials: int = 5  # trials finished before the pruner may stop one
    sampler_seed: int = 0  # seed of the TPE sampler

    def check(self) -> None:
        if self.n_trials < 1:
            raise TrainError(f"--n-trials must be >= 1, got {self.n_trials}")
        if self.timeout is not None and not self.timeout > 0:
            raise TrainError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.startup_trials < 0:
            raise TrainError(f"--startup-trials must be >= 0, got {self.startup_trials}")


@dataclass
class SweepResult:
    study: optuna.Study
    best: Run  # <out>/best
    summary: dict[str, Any]  # what <out>/sweep.json holds


def sweep(store, head: Any = DEFAULT_HEAD, space: str | Space = "", *, out: str | os.PathLike,
          text: str | None = None, image: str | None = None, config: TrainConfig | None = None,
          sweep_config: SweepConfig | None = None,
          progress: Callable[[dict[str, Any]], None] | None = None, **overrides: Any
          ) -> SweepResult:
    """Search ``space`` (``"dim=64,128 lr=1e-4:3e-3:log"``, see :mod:`fusion.space`) for
    ``head`` on ``store``; ``config`` / ``overrides`` fix everything else (TrainConfig fields
    and head options, as for :func:`fusion.train`). ``progress`` gets one dict per finished
    trial (number, state, value, finished, total, best), and one with state "start" once every
    check has passed."""
    sc = sweep_config or SweepConfig()
    sc.check()
    cfg = (config or TrainConfig()).override(**overrides)
    s = prepare(store, head, text, image, cfg)  # every check before the study is touched
    if not isinstance(space, Space):
        space = parse_space(space, list(head_options(s.head)), repr(s.head_spec))
    text = s.tfs.name if s.tfs is not None else None
    image = s.ifs.name if s.ifs is not None else None
    out = Path(out)
    identity = json.loads(json.dumps({
        "head": s.head_spec, "space": space.describe(), "store": s.store.fingerprint,
        "text": text, "image": image, "train": cfg.to_dict()}, default=str))
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):  # one process per study
        study = _open_study(out, identity, sc)
        n_runs = len(s.fold_ids) * len(cfg.seed_list)

        def objective(trial: optuna.Trial) -> float:
            train_over, options = space.suggest(trial)
            scores: list[float] = []

            def on_fold(_fold: int, fm: dict[str, Any]) -> None:
                scores.append(float(fm["macro_f1"]))
                trial.report(float(np.mean(scores)), len(scores) - 1)
                if len(scores) < n_runs and trial.should_prune():
                    raise optuna.TrialPruned(f"mean fold macro-F1 {np.mean(scores):.4f} after "
                                             f"{len(scores)} of {n_runs} folds")

            try:
                run = train(s.store, s.head, text=text, image=image, out=None,
                            config=cfg.override(**train_over, options={**cfg.options, **options}),
                            on_fold=on_fold)
            except FusionError as e:  # e.g. options that do not fit together: this trial fails
                trial.set_user_attr("error", str(e))
                raise
            return float(run.metrics["macro_f1"])  # out-of-fold, never the holdout

        def report(st: optuna.Study, ft: optuna.trial.FrozenTrial) -> None:
            if progress:
                done = _finished(st)
                best = _best(st)
                progress({"number": ft.number, "state": ft.state.name.lower(), "value": ft.value,
                          "finished": done, "total": sc.n_trials,
                          "best": best.value if best else None})

        remaining = sc.n_trials - _finished(study)
        if progress:  # every check passed: the study starts (or continues)
            best = _best(study)
            progress({"number": None, "state": "start", "value": None,
                      "finished": _finished(study), "total": sc.n_trials,
                      "best": best.value if best else None})
        if remaining > 0:
            study.optimize(objective, n_trials=remaining, timeout=sc.timeout, callbacks=[report],
                           catch=(FusionError,), gc_after_trial=False)
        best_trial = _best(study)
        if best_trial is None:
            failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            why = failed[-1].user_attrs.get("error", "") if failed else ""
            raise TrainError(f"no trial of the sweep in {str(out)!r} completed ({len(failed)} "
                             f"failed{': ' + str(why) if why else ''}); check --space and --set")
        best = _write_best(s, cfg, space, best_trial, out, text, image)
        summary = _summary(study, identity, best_trial, sc)
        _write_json(out / "sweep.json", summary)
        return SweepResult(study, best, summary)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``<out>/.lock`` (an flock: the kernel drops it when the process dies, so a killed
    sweep never leaves it behind) or refuse in one line."""
    with open(out / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainError(f"another `fusion sweep` is running the study in {str(out)!r}; "
                             "wait for it (or stop it) before running this one") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open_study(out: Path, identity: dict[str, Any], sc: SweepConfig) -> optuna.Study:
    """The study in ``<out>/study.db``: created, or loaded when it is this same sweep; trials
    left running by a killed sweep are marked failed and queued again."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'study.db').resolve()}")
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=sc.startup_trials, n_warmup_steps=0)
              if sc.prune else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=sc.sampler_seed),
                                pruner=pruner, load_if_exists=True)
    known = study.user_attrs.get("sweep")
    if known is None:
        study.set_user_attr("sweep", identity)
    elif known != identity:
        diff = sorted(k for k in set(known) | set(identity) if known.get(k) != identity.get(k))
        raise TrainError(f"{str(out / 'study.db')!r} holds another sweep (different "
                         f"{', '.join(diff)}: {_first_diff(known, identity, diff[0])}); re-run "
                         "the original command to continue it, or pass another --out")
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_system_attr(trial_id, "fail_reason", "interrupted (sweep killed)")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=False)
    return study


def _first_diff(known: dict[str, Any], identity: dict[str, Any], key: str) -> str:
    a, b = known.get(key), identity.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
        k = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[0]
        return f"{key}.{k} {a.get(k)!r} there, {b.get(k)!r} here"
    return f"{key} {a!r} there, {b!r} here"


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def _write_best(s, cfg: TrainConfig, space: Space, trial: optuna.trial.FrozenTrial, out: Path,
                text: str | None, image: str | None) -> Run:
    """``<out>/best``: the best trial trained again with the normal run writer (weights
    included); kept when it already holds that trial."""
    dest = out / "best"
    try:
        written = json.loads((out / "sweep.json").read_text())["best"]["trial"]
    except (OSError, ValueError, KeyError, TypeError):
        written = None
    if written == trial.number and dest.is_dir():
        return load_run(dest)
    train_over, options = space.split(trial.params)
    staging = out / f".best-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    train(s.store, s.head, text=text, image=image, out=staging,
          config=cfg.override(**train_over, options={**cfg.options, **options}),
          name=f"{out.name}-best")
    old = out / f".best-old-{os.getpid()}"
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    return load_run(dest)


def _summary(study: optuna.Study, identity: dict[str, Any], best: optuna.trial.FrozenTrial,
             sc: SweepConfig) -> dict[str, Any]:
    return {
        "sweep": identity, "n_trials": sc.n_trials, "prune": sc.prune,
        "score": "out-of-fold macro-F1 (fusion.metrics; the holdout is never used)",
        "best": {"trial": best.number, "value": best.value, "params": best.params,
                 "run": "best"},
        "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value,
                    "params": t.params, "fold_scores": [t.intermediate_values[k] for k in
                                                       sorted(t.intermediate_values)],
                    "seconds": _seconds(t), "error": t.user_attrs.get("error")}
                   for t in study.get_trials(deepcopy=False)],
    }


def _seconds(t: optuna.trial.FrozenTrial) -> float | None:
    """Wall time of a finished trial (pruned and failed ones included)."""
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, tmp.with_name(path.name))
