"""Ensembles (train.members): members trained in this process or on a Dask cluster through Prefect, combined
into one Keras model that evaluate, the registry and export take like any model."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import datagen
import numpy as np
import pytest
from runs import converted_kaggle_run, kill_when, make, output

from components import records
from components.keras_layers import load_keras_model
from components.tracking import tracking_uri
from components.train import processor_name
from components.train.ensemble import members_of
from flows import runner, stages

DIGITS = str(Path(sys.executable).with_name("digits"))


@pytest.mark.e2e
def test_a_two_member_ensemble_is_one_model_through_evaluate_registry_export_and_transfer(cli, home, kaggle_data,
                                                                                           tmp_path):
    result = cli("run", "train-kaggle", "--data", kaggle_data, "--set", "validate.min_rows=10",
                 "--set", "train.epochs=1", "--set", "train.members=2", "--set", "train.member_models=digits-net,baseline",
                 "--set", "train.test_time_shifts=4", "--set", "evaluate.threshold=0")
    assert result.code == 0, result.err
    (run,) = sorted((home / "runs").iterdir())
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed"
    members = record["stages"]["train"]["outputs"]["members"]
    assert [(m["name"], m["model"], m["seed"]) for m in members] == [("member-00", "digits-net", 42),
                                                                     ("member-01", "baseline", 43)]
    assert "member-01: epoch 1/1" in result.out
    # each member's time is an estimate of the whole ensemble's (train.members=1000 started with none)
    assert re.search(r"member-00 \(digits-net, seed 42\): trained in \d+ s; at that pace the 2 members take about "
                     r"\d+ (s|min)", result.out), result.out

    # one model: its members nested, their probabilities averaged over each image and its 4 one-pixel shifts
    model = load_keras_model(run / "train/model.keras")
    assert [layer.name for layer in members_of(model)] == ["member-00-digits-net", "member-01-baseline"]
    val = records.load(output(stages.RunFolder(run), "converted").files("val"))
    member_models = [load_keras_model(run / "train/members" / m["name"] / "model.keras") for m in members]
    alone = [member.predict(val.images[..., None], verbose=0) for member in member_models]
    copies = [np.roll(val.images, shift, axis=(1, 2)) for shift in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))]
    expected = np.mean([member.predict(c[..., None], verbose=0) for member in member_models for c in copies], axis=0)
    assert np.allclose(model.predict(val.images[..., None], verbose=0), expected, atol=1e-5)
    assert not np.allclose(expected, np.mean(alone, axis=0), atol=1e-5)  # the shifts change the probabilities
    assert record["stages"]["train"]["outputs"]["model"] == ("ensemble of 2 (1 digits-net, 1 baseline) with 4 "
                                                              "test-time shifts")

    # evaluate scores every member beside the ensemble, on the same images
    metrics = json.loads((run / "evaluate/metrics.json").read_text())
    scored = {m["name"]: m["val_accuracy"] for m in metrics["members"]}
    for m, probabilities in zip(members, alone):
        assert scored[m["name"]] == pytest.approx(float((probabilities.argmax(axis=1) == val.labels).mean()))
    assert "<h2>Members</h2>" in (run / "evaluate/report.html").read_text()

    # registered and exported like any model; MLflow shows the members as child runs of the stage's run
    assert record["registry_version"] == 1 and (run / "export/saved_model").is_dir()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(home))
    parent = record["stages"]["train"]["outputs"]["mlflow_run_id"]
    for m in members:
        child = client.get_run(m["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent and child.data.tags["digits.member"] == m["name"]
    assert client.get_run(parent).data.metrics["final_val_accuracy"] == pytest.approx(metrics["val_accuracy"])

    # a transfer base like any model: each member is fine-tuned from its own weights (train.members left at 1)
    datagen.write_noisy(tmp_path / "noisy", n_train=200, n_test=20)
    tuned = cli("run", "train-noisy", "--data", tmp_path / "noisy", "--set", "validate.min_rows=10",
                "--set", "train.epochs=1", "--set", "transfer.base=models:/digits-kaggle@champion",
                "--set", "evaluate.threshold=0")
    assert tuned.code == 0, tuned.err
    assert "the base models:/digits-kaggle/1 is an ensemble of 2 members" in tuned.out
    noisy = next(r for r in (home / "runs").iterdir() if "train-noisy" in r.name)
    transferred = json.loads((noisy / "run.json").read_text())["stages"]["transfer"]["outputs"]
    # ... and each keeps its base member's architecture (train.model says digits-net for both)
    assert [(m["name"], m["model"]) for m in transferred["members"]] == [("member-00", "digits-net"),
                                                                         ("member-01", "baseline")]
    assert "member-01 (baseline, seed 43)" in tuned.out
    assert transferred["base"] == "models:/digits-kaggle/1"
    # the fine-tuned ensemble (test_time_shifts left at 0): the plain mean of its members
    fine_tuned = [load_keras_model(noisy / "transfer/members" / m["name"] / "model.keras") for m in transferred["members"]]
    assert np.allclose(load_keras_model(noisy / "transfer/model.keras").predict(val.images[..., None], verbose=0),
                       np.mean([m.predict(val.images[..., None], verbose=0) for m in fine_tuned], axis=0), atol=1e-5)
    for i, m in enumerate(members):  # member i started from base member i: same architecture, same layer count
        base_member = load_keras_model(noisy / f"transfer/base-member-{i:02d}.keras")
        alone = load_keras_model(run / "train/members" / m["name"] / "model.keras")
        assert len(base_member.layers) == len(alone.layers)
        assert np.allclose(base_member.predict(val.images[..., None], verbose=0),
                           alone.predict(val.images[..., None], verbose=0), atol=1e-5)


def test_a_member_whose_loss_becomes_nan_fails_the_stage_in_one_line_and_nothing_is_registered(cli, home, kaggle_data):
    result = cli("run", "train-kaggle", "--data", kaggle_data, "--set", "validate.min_rows=10",
                 "--set", "train.epochs=1", "--set", "train.members=2", "--set", "train.learning_rate=1e12",
                 "--set", "evaluate.threshold=0")
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "member-00 (digits-net, seed 42)" in line and "the training loss became" in line
    assert "learning_rate" in line and "Traceback" not in result.out
    (run,) = sorted((home / "runs").iterdir())
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and record["stages"]["train"]["status"] == "failed"
    assert "evaluate" not in record["stages"] and record.get("registry_version") is None
    assert stages.registry().versions("digits-kaggle") == []


def test_pca_svm_cannot_be_a_member(cli, home, kaggle_data):
    result = cli("run", "train-kaggle", "--data", kaggle_data, "--set", "train.members=2",
                 "--set", "train.member_models=digits-net,pca-svm")
    assert result.code == 2
    assert result.err.strip() == ("digits: error: invalid value for 'train': an ensemble averages Keras networks' "
                                  "probabilities: pca-svm cannot be a member")
    shifted = cli("run", "train-kaggle", "--data", kaggle_data, "--set", "train.model=pca-svm",
                  "--set", "train.test_time_shifts=4")
    assert shifted.code == 2
    assert shifted.err.strip() == ("digits: error: invalid value for 'train': test_time_shifts averages a Keras "
                                   "network's probabilities over shifted copies: pca-svm is not one")


@pytest.mark.e2e
def test_members_train_on_a_two_worker_local_cluster_through_prefect(home, kaggle_data):
    folder, _ = converted_kaggle_run(kaggle_data)
    done = subprocess.run([DIGITS, "train", "--run", folder.run_id, "--set", "train.epochs=1",
                           "--set", "train.members=2", "--set", "train.workers=2"],
                          env={**os.environ, "DIGITS_HOME": str(home)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "running 2 members on a LocalCluster of 2 worker processes" in done.stdout
    assert "distributed.scheduler" not in done.stdout  # the cluster's own chatter stays off the console
    trained = runner.output_of(folder, "train")  # `digits train` runs train; calibrate is evaluate's
    workers = [m["worker"] for m in trained.members]
    assert all(w and "tcp://127.0.0.1:" in w for w in workers) and len(set(workers)) == 2, workers
    assert [m["processor"] for m in trained.members] == [processor_name()] * 2 and trained.processor == processor_name()
    assert json.loads((folder.root / "run.json").read_text())["stages"]["train"]["outputs"]["members"][1]["worker"] \
        == workers[1]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["ensemble-members"])))
    assert any(r.state.is_completed() for r in runs)


@pytest.mark.e2e
def test_a_killed_ensemble_resumes_training_only_the_unfinished_members(home, tmp_path):
    datagen.write_kaggle(tmp_path / "kaggle", n_train=1500, n_test=20)
    folder, _ = converted_kaggle_run(tmp_path / "kaggle")
    command = [DIGITS, "train", "--run", folder.run_id, "--set", "train.epochs=2", "--set", "train.members=2"]
    env = {**os.environ, "DIGITS_HOME": str(home)}
    members = folder.root / ".train.inprogress/members"
    kill_when(command, env, (members / "member-00/member.json").is_file)
    assert not (members / "member-01/member.json").exists(), "killed too late: member-01 had finished"
    assert not folder.stage_dir("train").exists()
    kept = (members / "member-00/model.keras").stat().st_mtime_ns

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "member-00 (digits-net, seed 42): trained by an earlier attempt" in done.stdout
    assert "member-00: epoch" not in done.stdout
    assert "member-01: epoch 2/2" in done.stdout
    trained = runner.output_of(folder, "train")
    assert [m["name"] for m in trained.members] == ["member-00", "member-01"]
    assert (folder.stage_dir("train") / "members/member-00/model.keras").stat().st_mtime_ns == kept


def test_test_time_shifts_make_one_model_an_ensemble_whose_member_evaluate_scores_beside_it(home, kaggle_data):
    folder, config = converted_kaggle_run(kaggle_data, "train.epochs=1", "train.test_time_shifts=8",
                                          "evaluate.threshold=0")
    make(folder, config, "model")
    make(folder, config, "evaluation")
    trained = runner.output_of(folder, "train")  # the averaged shifts, before calibrate scales them
    assert trained.model.startswith("ensemble of 1 (1 digits-net) with 8 test-time shifts")
    model = load_keras_model(trained.path)
    (member,) = members_of(model)
    assert member.name == "member-00-digits-net"
    val = records.load(output(folder, "converted").files("val"))
    shifts = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]  # rows, columns
    alone = member.predict(val.images[..., None], verbose=0)
    copies = np.mean([member.predict(np.roll(val.images, s, axis=(1, 2))[..., None], verbose=0) for s in shifts], axis=0)
    assert np.allclose(model.predict(val.images[..., None], verbose=0), copies, atol=1e-5)
    (scored,) = json.loads((folder.stage_dir("evaluate") / "metrics.json").read_text())["members"]
    assert scored["name"] == "member-00" and scored["val_accuracy"] == pytest.approx(
        float((alone.argmax(axis=1) == val.labels).mean()))
