"""The tune stage: an Optuna study whose best settings the train stage uses; a killed tune resumes."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import datagen
import pytest
from runs import converted_kaggle_run, kill_when, output

from components.tracking import tracking_uri
from schemas.stages import GRAPH

DIGITS = str(Path(sys.executable).with_name("digits"))


KAGGLE_ROWS = (300, 20)  # the kaggle_data fixture's train and test rows (conftest)


def test_a_two_trial_tune_feeds_its_best_settings_to_train(cli, home, kaggle_data):
    result = cli("run", "train-kaggle", "--data", kaggle_data, "--set", "validate.min_rows=10",
                 "--set", "train.epochs=1", "--set", "tune.trials=2", "--set", "tune.epochs=1",
                 "--set", "tune.space=learning_rate=log 1e-3 1e-2; width=choice 0.25 0.5")
    assert result.code == 0, result.err
    (run,) = sorted((home / "runs").iterdir())
    record = json.loads((run / "run.json").read_text())
    assert list(record["stages"])[:5] == ["ingest", "validate", "convert", "tune", "train"]
    tuned = record["stages"]["tune"]["outputs"]
    assert (tuned["trials"], tuned["complete"] + tuned["pruned"] + tuned["failed"]) == (2, 2)
    best = json.loads((run / "tune/best.json").read_text())
    assert set(best["params"]) == {"learning_rate", "width"} and best["params"] == tuned["best_params"]
    assert 1e-3 <= best["params"]["learning_rate"] <= 1e-2 and best["params"]["width"] in (0.25, 0.5)
    with (run / "tune/trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["0", "1"] and all(r["state"] in ("COMPLETE", "PRUNED") for r in rows)
    assert (run / "tune/history.png").read_bytes()[:4] == b"\x89PNG"
    assert "Tuning study" in (run / "tune/report.html").read_text()
    assert not (run / "tune/trials").exists()  # the trials' checkpoints are not kept

    # train used the winner: its MLflow params and its artifact say so
    trained = record["stages"]["train"]["outputs"]
    assert trained["tuned"] == best["params"]
    from mlflow.tracking import MlflowClient

    params = MlflowClient(tracking_uri(home)).get_run(trained["mlflow_run_id"]).data.params
    assert float(params["train.learning_rate"]) == pytest.approx(best["params"]["learning_rate"])
    assert float(params["train.width"]) == best["params"]["width"]


def test_tune_is_off_by_default_and_refused_for_fine_tuning(cli, home):
    from schemas.config import default_config

    assert "tune" not in [s.name for s in GRAPH.plan(default_config("train-kaggle"))]
    result = cli("run", "train-noisy", "--set", "tune.trials=2")
    assert result.code == 2 and "tune.trials: the tune stage searches settings of training from scratch" in result.err
    result = cli("run", "train-kaggle", "--set", "tune.space=dropout=float 0 1")
    assert result.code == 2 and "'dropout' is not a tunable train setting" in result.err


def test_every_setting_the_default_space_can_draw_is_a_valid_training():
    from components.tune import distributions
    from schemas.config import DEFAULT_SPACE, TrainConfig, TuneConfig

    assert TuneConfig().space == DEFAULT_SPACE and "elastic" in DEFAULT_SPACE  # the best preset's augmentation too
    for key, dist in distributions(DEFAULT_SPACE).items():
        values = dist.choices if hasattr(dist, "choices") else (dist.low, dist.high)
        for value in values:
            assert getattr(TrainConfig.model_validate({key: value}), key) == value


def test_a_trial_trains_tune_epochs_as_one_model_without_the_runs_clean_epochs_unless_it_draws_them():
    """--preset best with tune.trials: each trial is 3 epochs of one model, not 3 members x (17 + 1 clean)."""
    from components.tune import trial_config
    from flows.cli import _config
    from schemas.config import TuneConfig

    best = _config("train-mnist", None, [], "best").train
    assert best.clean_epochs == 1 and best.members == 3
    trial = trial_config(best, TuneConfig(epochs=3), {"learning_rate": 2e-3})
    assert (trial.epochs, trial.clean_epochs, trial.members, trial.learning_rate) == (3, 0, 1, 2e-3)
    assert (trial.elastic, trial.model) == (best.elastic, best.model)  # the rest of train as configured
    assert trial_config(best, TuneConfig(), {"clean_epochs": 2}).clean_epochs == 2
    with pytest.raises(ValueError, match="width"):
        trial_config(best, TuneConfig(), {"width": -1.0})  # a drawn value is checked like any --set


@pytest.mark.e2e
def test_trials_run_on_a_two_worker_local_cluster_through_prefect_sharing_one_study(home, kaggle_data):
    folder, _ = converted_kaggle_run(kaggle_data)
    done = subprocess.run([DIGITS, "tune", "--run", folder.run_id, "--set", "tune.trials=2", "--set", "tune.epochs=1",
                           "--set", "tune.workers=2", "--set", "tune.pruner=off",
                           "--set", "tune.space=learning_rate=log 1e-3 1e-2; width=choice 0.25 0.5"],
                          env={**os.environ, "DIGITS_HOME": str(home)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "running 2 trials on a LocalCluster of 2 worker processes" in done.stdout
    tuned = output(folder, "tuning")
    assert (tuned.trials, tuned.complete) == (2, 2)
    with (folder.stage_dir("tune") / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    workers = [r["worker"] for r in rows]
    # both workers asked the one SQLite study for settings at once: two distinct trials, one on each worker
    assert sorted(r["trial"] for r in rows) == ["0", "1"]
    assert all("tcp://127.0.0.1:" in w for w in workers) and len(set(workers)) == 2, workers
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["tune-trials"])))
    assert any(r.state.is_completed() for r in runs)


def test_a_killed_tune_resumes_with_its_finished_trials(home, tmp_path):
    datagen.write_kaggle(tmp_path / "kaggle", n_train=1000, n_test=20)
    folder, _ = converted_kaggle_run(tmp_path / "kaggle")
    command = [DIGITS, "tune", "--run", folder.run_id, "--set", "tune.trials=2", "--set", "tune.epochs=2",
               "--set", "tune.pruner=off"]
    env = {**os.environ, "DIGITS_HOME": str(home)}
    db = home / "tune/optuna.db"

    def count(state: str) -> int:
        try:
            with sqlite3.connect(db) as connection:
                return connection.execute("SELECT COUNT(*) FROM trials WHERE state = ?", (state,)).fetchone()[0]
        except sqlite3.Error:
            return 0

    def complete() -> int:
        return count("COMPLETE")

    kill_when(command, env, lambda: complete() >= 1 and count("RUNNING") >= 1)  # the second trial under way
    assert complete() == 1, "killed too late: a second trial had finished"
    assert not folder.stage_dir("tune").exists()

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "1 trials finished by an earlier attempt" in done.stdout
    tuned = output(folder, "tuning")
    assert (tuned.trials, tuned.resumed_trials, tuned.complete) == (2, 1, 2)
    with sqlite3.connect(db) as connection:  # the trial the kill cut short: failed, not counted
        states = sorted(s for (s,) in connection.execute("SELECT state FROM trials"))
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
