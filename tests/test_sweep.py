"""`fusion sweep`: the --space grammar, trials scored out of fold (never on the holdout),
pruning that stops a trial's remaining folds, resuming after a real SIGKILL, and the best run
accepted by `fusion stack`, `compare` and `predict`."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

import fusion
from cli.fusion_app import app
from fusion.space import SEARCHABLE_TRAIN, parse_space
from fusion.sweep import SweepConfig, sweep

from .conftest import kill_when, make_complementary_store
from .test_train import _relabelled_copy

runner = CliRunner()
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = {"epochs": 2, "batch_size": 32, "hidden": 8}  # concat: dim, hidden, dropout, pool...


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """120 items, 6 classes, 5 folds + 20% holdout (tests/conftest.py)."""
    return make_complementary_store(tmp_path_factory.mktemp("sweep") / "s.zarr", n=120)


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="fusion-sweep",
                             storage=f"sqlite:///{out / 'study.db'}").get_trials()


# -- the grammar --------------------------------------------------------------------------------

def test_space_grammar_types_ranges_and_tells_training_from_head_options():
    sp = parse_space("dim=64,128,256 dropout=0.0:0.5 lr=1e-4:3e-3:log epochs=2:6 "
                     "mode=hybrid,keyless batch-size=16,32", ["dim", "dropout", "mode"])
    d = {x.name: x for x in sp.dims}
    assert d["dim"].choices == (64, 128, 256) and not d["dim"].train
    assert (d["dropout"].low, d["dropout"].high, d["dropout"].log, d["dropout"].integer) == (
        0.0, 0.5, False, False)
    assert d["lr"].train and d["lr"].log and (d["lr"].low, d["lr"].high) == (1e-4, 3e-3)
    assert d["epochs"].integer and d["epochs"].train
    assert d["mode"].choices == ("hybrid", "keyless")
    assert d["batch_size"].choices == (16, 32) and d["batch_size"].train
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    train, head = sp.suggest(trial)
    assert set(train) == {"lr", "epochs", "batch_size"} and set(head) == {"dim", "dropout", "mode"}
    assert isinstance(train["epochs"], int) and 2 <= train["epochs"] <= 6
    assert parse_space("lr=1e-3", []).dims[0].choices == (1e-3,)  # one value: a fixed choice
    assert 1e-4 <= train["lr"] <= 3e-3 and head["dim"] in (64, 128, 256)


@pytest.mark.parametrize("space, message", [
    ("dimm=1,2", r"'dimm' is neither a training option nor an option of the head; training "
                 r"options: epochs, .*lr.*; head options: dim, dropout$"),
    ("seed=1,2", r"'seed' is neither"),  # how the sweep runs, not what a trial is
    ("dim", r"'dim' is not NAME=VALUES"),
    ("lr=0.1:0.01", r"needs lo < hi, got 0.1 and 0.01"),
    ("lr=0:0.1:log", r"a log range needs lo > 0"),
    ("lr=a:b", r"ends of a range must be numbers"),
    ("lr=1:2:lin", r"not a range lo:hi or lo:hi:log"),
    ("dim=1,1", r"repeats a value"),
    ("dim=1,2 dim=3", r"names 'dim' twice"),
    ("", r"--space is empty"),
])
def test_space_errors_are_one_line_with_the_fix(space, message):
    with pytest.raises(fusion.TrainError, match=message) as e:
        parse_space(space, ["dim", "dropout"])
    assert "\n" not in str(e.value)
    assert "lr" in SEARCHABLE_TRAIN and "device" not in SEARCHABLE_TRAIN


# -- the study ----------------------------------------------------------------------------------

def test_trials_score_out_of_fold_never_the_holdout_and_best_is_a_run_stack_accepts(
        store, tmp_path):
    """Relabelling every holdout row changes no trial's score (the search never reads the
    holdout); the best trial is retrained into <out>/best with the same out-of-fold macro-F1,
    and `fusion stack` takes it next to another run of the store (`compare`, `predict` too)."""
    space = "dim=8,16 lr=1e-3:1e-2:log"
    kw = dict(out=tmp_path / "a", sweep_config=SweepConfig(n_trials=3, prune=False), **TINY)
    a = sweep(store, "concat", space, **kw)
    other = _relabelled_copy(store, tmp_path / "relabelled.zarr", np.flatnonzero(store.folds < 0))
    b = sweep(other, "concat", space, **{**kw, "out": tmp_path / "b"})
    va = [t["value"] for t in a.summary["trials"]]
    assert len(va) == 3 and va == [t["value"] for t in b.summary["trials"]]
    assert a.best.metrics["holdout"]["macro_f1"] != b.best.metrics["holdout"]["macro_f1"]
    best = a.summary["best"]
    assert best["value"] == max(va)
    assert a.best.path == tmp_path / "a" / "best"
    assert a.best.metrics["macro_f1"] == pytest.approx(best["value"], abs=1e-12)
    assert a.best.config["head_config"]["options"]["dim"] == best["params"]["dim"]
    assert a.best.config["train"]["lr"] == best["params"]["lr"]
    assert (a.best.path / "weights/fold0.safetensors").exists()
    assert json.loads((tmp_path / "a/sweep.json").read_text())["best"]["trial"] == best["trial"]
    plain = fusion.train(store, "image", out=tmp_path / "image", **TINY)
    res = runner.invoke(app, ["stack", "-r", str(a.best.path), "-r", str(plain.path),
                              "--stacker", "logreg", "--out", str(tmp_path / "stack")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compare", str(a.best.path), str(plain.path), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["predict", "--run", str(a.best.path), "--store", store.url,
                              "--rows", "holdout", "--out", str(tmp_path / "p.csv"), "-q"])
    assert res.exit_code == 0, res.output
    # the same command again: the study is complete, nothing is retrained
    mtime = (a.best.path / "oof.npy").stat().st_mtime_ns
    again = sweep(store, "concat", space, **kw)
    assert len(again.summary["trials"]) == 3
    assert (a.best.path / "oof.npy").stat().st_mtime_ns == mtime


def test_pruned_trials_stop_after_the_first_fold(store, tmp_path):
    """With lr 1e-7 a trial learns nothing; the median pruner stops it after fold 0, so its
    remaining folds never run (one intermediate value instead of five)."""
    res = sweep(store, "concat", "lr=0.03,0.0000001", out=tmp_path / "p",
                sweep_config=SweepConfig(n_trials=6, startup_trials=1, sampler_seed=6),
                **TINY)
    trials = _trials(tmp_path / "p")
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete
    assert [t.params["lr"] for t in pruned] == [1e-7] * 3  # seed 6 draws it for trials 2, 4, 5
    assert all(t.params["lr"] == 0.03 for t in complete)
    assert all(len(t.intermediate_values) == 1 for t in pruned)
    assert all(len(t.intermediate_values) == 5 for t in complete)
    assert res.summary["best"]["params"]["lr"] == 0.03
    assert all(t["seconds"] > 0 for t in res.summary["trials"])  # pruned ones timed too


def test_timeout_stops_starting_trials(store, tmp_path):
    res = sweep(store, "concat", "dim=8,16", out=tmp_path / "t",
                sweep_config=SweepConfig(n_trials=20, timeout=0.01), **TINY)
    assert len(res.summary["trials"]) == 1  # the first trial runs, then the time is up


def test_cli_errors_are_one_line_and_leave_no_study(store, tmp_path):
    base = ["sweep", "--store", store.url, "--head", "concat", "--out", str(tmp_path / "x")]
    res = runner.invoke(app, [*base, "--space", "dimm=8,16"])
    assert res.exit_code == 2 and "'dimm' is neither a training option" in res.output
    assert "head options: dim, dropout, hidden" in res.output
    res = runner.invoke(app, [*base, "--space", "lr=1e-3:1e-2", "--lr", "0.1"])
    assert res.exit_code == 2 and "'lr' is both searched (--space) and fixed (--lr)" in res.output
    res = runner.invoke(app, [*base, "--space", "dim=8,16", "--n-trials", "0"])
    assert res.exit_code == 2 and "--n-trials must be >= 1, got 0" in res.output
    assert not (tmp_path / "x" / "study.db").exists()
    # a study of another sweep in the same directory is refused, and left as it was
    out = tmp_path / "y"
    sweep(store, "concat", "dim=8,16", out=out, sweep_config=SweepConfig(n_trials=1), **TINY)
    res = runner.invoke(app, ["sweep", "--store", store.url, "--head", "concat", "--out",
                              str(out), "--space", "dim=8,32", "--epochs", "2",
                              "--batch-size", "32", "--set", "hidden=8"])
    assert res.exit_code == 2, res.output
    assert "holds another sweep (different space: space 'dim=8,16' there, 'dim=8,32' here)" \
        in res.output
    res = runner.invoke(app, ["sweep", "--store", store.url, "--head", "concat", "--out",
                              str(out), "--space", "dim=8,16", "--epochs", "3",
                              "--batch-size", "32", "--set", "hidden=8"])
    assert res.exit_code == 2 and "(different train: train.epochs 2 there, 3 here)" in res.output
    # while another process holds the study (its flock), a second sweep is refused
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(fusion.TrainError, match="another `fusion sweep` is running"):
            sweep(store, "concat", "dim=8,16", out=out, sweep_config=SweepConfig(n_trials=2),
                  **TINY)
    assert len(_trials(out)) == 1
    assert len(_trials(out)) == 1


def test_a_killed_sweep_resumes_with_the_same_command(store, tmp_path):
    """SIGKILL of a `fusion sweep` process during trial 1: the same command again marks it
    failed, tries its parameters again first, keeps trial 0 and finishes the study; the best
    run is written."""
    out = tmp_path / "k"
    cmd = [str(BIN / "fusion"), "sweep", "--store", store.url, "--head", "concat", "--space",
           "dim=8,16 lr=1e-3:1e-2:log", "--n-trials", "3", "--no-prune", "--epochs", "3",
           "--patience", "3", "--batch-size", "16", "--set", "hidden=8", "--threads", "1",
           "--out", str(out), "-q"]
    db = out / "study.db"

    def states() -> list[str]:
        """Trial states; a running trial counts once both its parameters are stored."""
        if not db.exists():
            return []
        try:
            with sqlite3.connect(db) as con:
                rows = con.execute("select t.state, count(p.param_id) from trials t left join "
                                   "trial_params p using (trial_id) group by t.trial_id "
                                   "order by t.number").fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
        return [s for s, n in rows if s != "RUNNING" or n == 2]

    kill_when(cmd, ENV, lambda: states()[:2] == ["COMPLETE", "RUNNING"], timeout=240)
    assert not (out / "best").exists()
    before = _trials(out)
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]

    done = runner.invoke(app, cmd[1:])  # the same command, in this process
    assert done.exit_code == 0, done.output
    after = _trials(out)
    assert [t.state.name for t in after] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert after[0].value == before[0].value and after[0].datetime_complete == \
        before[0].datetime_complete  # trial 0 was not run again
    assert after[2].params == before[1].params  # the interrupted trial, tried again first
    assert "4 trials (3 complete, 0 pruned, 1 failed)" in done.output
    assert fusion.load_run(out / "best").metrics["macro_f1"] == pytest.approx(
        max(t.value for t in after if t.value is not None), abs=1e-12)
