"""The train stage: the model zoo, checkpoints, resume after kill -9, MLflow and TensorBoard logs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datagen
import numpy as np
import pytest
from runs import make, output, validated_kaggle_run

from components import records
from components.tracking import tracking_uri
from schemas.config import ModelName, TrainConfig
from schemas.errors import DigitsInputError


def _converted_run(data: Path, *overrides: str):
    folder, config = validated_kaggle_run(data, *overrides)
    make(folder, config, "converted")
    return folder, config


@pytest.fixture(scope="module")
def kaggle_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kaggle")
    datagen.write_kaggle(folder, n_train=400, n_test=50)
    return folder


def test_one_short_epoch_writes_model_checkpoints_logs_and_mlflow_metrics(home, kaggle_data):
    folder, config = _converted_run(kaggle_data, "train.epochs=1")
    trained = make(folder, config, "model")
    out = folder.stage_dir("train")
    assert trained.path == out / "model.keras" and trained.path.is_file()
    assert (trained.epochs, trained.resumed_at_epoch, trained.train_rows, trained.val_rows) == (1, None, 360, 40)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-001.keras", "state.json"]
    assert json.loads((out / "checkpoints/state.json").read_text())["epoch"] == 1
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    with (out / "history.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds"} <= set(row)
    assert not list(folder.root.glob(".train.*"))
    assert folder.load().stages["train"].outputs["val_accuracy"] == trained.val_accuracy

    import keras

    model = keras.models.load_model(trained.path, safe_mode=True)
    val = records.load(output(folder, "converted").files("val"))
    probabilities = model.predict(val.images[..., None], verbose=0)
    assert probabilities.shape == (40, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert float((probabilities.argmax(axis=1) == val.labels).mean()) == pytest.approx(trained.val_accuracy)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(home))
    run = client.get_run(trained.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == folder.run_id
    assert run.data.params["train.model"] == "digits-net" and run.data.params["seed"] == "42"
    assert run.data.tags["digits.data_fingerprint"] == output(folder, "converted").fingerprint
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]


def test_killed_training_resumes_at_the_next_epoch(home, tmp_path):
    """kill -9 after the first epoch's checkpoint: no train/ folder; the re-run resumes at epoch 2 of 3."""
    datagen.write_kaggle(tmp_path / "kaggle", n_train=1500, n_test=20)
    folder, _ = _converted_run(tmp_path / "kaggle")
    command = [str(Path(sys.executable).with_name("digits")), "train", "--run", folder.run_id,
               "--set", "train.epochs=3"]
    env = {**os.environ, "DIGITS_HOME": str(home)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state = folder.root / ".train.inprogress/checkpoints/state.json"
    deadline = time.monotonic() + 300
    while not state.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["epoch"] == 1, "killed too late: a second epoch had completed"
    assert not folder.stage_dir("train").exists()
    with pytest.raises(DigitsInputError, match="no completed train stage"):
        output(folder, "model")

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming at epoch 2 of 3" in done.stdout
    assert "epoch 1/3" not in done.stdout and "epoch 3/3" in done.stdout
    trained = output(folder, "model")
    assert (trained.epochs, trained.resumed_at_epoch) == (3, 2)
    with (folder.stage_dir("train") / "history.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1, 2]  # one row per epoch, none twice
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri(home)).get_metric_history(trained.mlflow_run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]  # one MLflow run across both attempts


def test_an_interrupted_attempt_with_another_config_is_not_resumed(home, kaggle_data):
    folder, config = _converted_run(kaggle_data, "train.epochs=1")
    leftover = folder.root / ".train.inprogress/checkpoints"
    leftover.mkdir(parents=True)
    (leftover / "epoch-001.keras").write_bytes(b"not a model")
    (leftover / "state.json").write_text(json.dumps({"epoch": 1, "checkpoint": "epoch-001.keras",
                                                     "signature": {"data": "other"}, "mlflow_run_id": None}))
    trained = make(folder, config, "model")
    assert trained.resumed_at_epoch is None and trained.path.is_file()


def test_pca_svm_reference(home, kaggle_data):
    folder, config = _converted_run(kaggle_data, "train.model=pca-svm")
    trained = make(folder, config, "model")
    assert trained.path.name == "model.joblib" and trained.val_accuracy > 0.5


@pytest.mark.parametrize("name", [m for m in ModelName if m is not ModelName.pca_svm])
def test_every_zoo_model_scores_raw_pixels_and_reloads_in_safe_mode(name, tmp_path):
    import keras

    from components.train import models

    model = models.build(TrainConfig(model=name), keras)
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)).astype("uint8")
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (4, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert np.allclose(again.predict(images, verbose=0), probabilities, atol=1e-5)
