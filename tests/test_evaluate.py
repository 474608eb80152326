"""The evaluate stage and the registry: gate, champion, rollback, racing promotions, a real mlflow server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import datagen
from components.registry import CHAMPION
from components.registry.mlflow import MlflowRegistry
from components.tracking import tracking_uri
from flows import stages
from flows.local_api import free_port
from runs import make, validated_kaggle_run
from schemas.errors import DigitsInputError


KAGGLE_ROWS = (1000, 20)  # the kaggle_data fixture's train and test rows (conftest)


def _trained_run(data: Path, *overrides: str):
    folder, config = validated_kaggle_run(data, "evaluate.threshold=0.2", *overrides)
    make(folder, config, "converted")
    make(folder, config, "model")
    return folder, config


def _evaluate_and_register(folder, config):
    evaluation = make(folder, config, "evaluation")
    registration = make(folder, config, "registration")
    version, promoted = registration.version, registration.promoted
    return evaluation, version, promoted


STRONG = ("train.model=baseline", "train.epochs=3", "train.augment=false")
WEAK = ("train.model=baseline", "train.epochs=1", "train.learning_rate=1e-7", "train.augment=false")


def test_a_weaker_model_never_replaces_the_champion_and_rollback_restores_it(home, kaggle_data, cli):
    strong, config = _trained_run(kaggle_data, *STRONG)
    first, version, promoted = _evaluate_and_register(strong, config)
    assert first.passed and (version, promoted) == ("1", True)
    metrics = json.loads((strong.stage_dir("evaluate") / "metrics.json").read_text())
    assert metrics["gate"] == {"passed": True, "threshold": 0.2, "policy": "at-least-champion", "alpha": 0.05,
                               "champion_version": None, "champion_val_accuracy": None, "reason": first.reason,
                               "seen_val": 0, "allow_seen_val": False}
    assert metrics["comparison"] is None
    assert np.array(metrics["confusion"]).sum() == 100 and set(metrics["per_class"]) == {str(c) for c in range(10)}
    assert 0 <= metrics["calibration"]["ece"] <= 1 and metrics["calibration"]["reliability"]
    for name in ("confusion.png", "errors.png", "robustness.png", "reliability.png", "report.html"):
        assert (strong.stage_dir("evaluate") / name).stat().st_size > 1000, name
    assert "Gate passed" in (strong.stage_dir("evaluate") / "report.html").read_text()
    record = strong.load()
    assert (record.registry_version, record.promoted) == (1, True)

    weak, config = _trained_run(kaggle_data, *WEAK)
    second, version, promoted = _evaluate_and_register(weak, config)
    assert not second.passed and (version, promoted) == (None, False)
    assert second.champion_version == "1" and second.champion_val_accuracy == pytest.approx(first.val_accuracy)
    assert f"{second.val_accuracy:.4%}" in second.reason and f"{first.val_accuracy:.4%}" in second.reason
    assert weak.load().promoted is False and "below champion version 1" in weak.load().promotion_reason
    assert not (weak.stage_dir("evaluate") / "report.html").read_text().count("Gate passed")

    again, config = _trained_run(kaggle_data, *STRONG)  # as good as the champion: promoted (>=)
    third, version, promoted = _evaluate_and_register(again, config)
    assert third.passed and (version, promoted) == ("2", True)
    reg = stages.registry()
    assert [(v.version, v.aliases) for v in reg.versions("digits-kaggle")] == [("1", []), ("2", [CHAMPION])]
    paired = json.loads(reg.versions("digits-kaggle")[1].tags["digits.comparison"])  # what it was promoted on
    assert paired["champion_version"] == "1" and paired == third.comparison

    result = cli("registry", "rollback", "digits-kaggle")
    assert result.code == 0, result.err
    assert reg.champion("digits-kaggle").version == "1" and len(reg.versions("digits-kaggle")) == 2
    result = cli("registry", "show", "digits-kaggle")
    assert result.code == 0 and again.run_id in result.out
    result = cli("registry", "promote", "digits-kaggle", "9")
    assert result.code == 2
    (message,) = result.err.strip().splitlines()
    assert "digits-kaggle has no version 9" in message


RACE = """
import sys, time
from pathlib import Path
from components.registry.mlflow import MlflowRegistry
registry = MlflowRegistry(sys.argv[1], Path(sys.argv[2]))
while time.time() < float(sys.argv[5]):
    time.sleep(0.001)
version, promoted = registry.register("digits-race", Path(sys.argv[4]), {"digits.mlflow_run_id": sys.argv[3]},
                                     lambda current: True)
print(version.version, promoted)
"""


def test_two_racing_promotions_leave_one_champion_and_every_version(home, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(home)
    home.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    experiment = client.create_experiment("race", artifact_location=(home / "mlartifacts").as_uri())
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    model = tmp_path / "model.keras"
    model.write_bytes(b"weights")
    start = str(time.time() + 8)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, uri, str(home), run_id, str(model), start],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for run_id in runs]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    versions = MlflowRegistry(uri, home).versions("digits-race")
    assert sorted(v.version for v in versions) == ["1", "2"]
    assert sum(v.champion for v in versions) == 1
    last = max(versions, key=lambda v: int(v.version))
    assert last.champion and last.tags.get("digits.previous_champion") == "1"  # serialised: 1 then 2


def test_registry_against_a_real_mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         (tmp_path / "artifacts").as_uri(), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as infra/compose.yaml: no job runner
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        from mlflow.tracking import MlflowClient

        client = None
        while client is None:
            try:
                client = MlflowClient(uri)
                experiment = client.create_experiment("digits-server-test")
            except Exception:
                client = None
                assert time.monotonic() < deadline
                time.sleep(0.5)
        registry = MlflowRegistry(uri, tmp_path / "locks")
        model = tmp_path / "model.keras"
        for content in (b"first", b"second"):
            model.write_bytes(content)
            run_id = client.create_run(experiment).info.run_id
            registry.register("digits-served", model, {"digits.mlflow_run_id": run_id}, lambda current: True)
        assert registry.champion("digits-served").version == "2"
        assert registry.rollback("digits-served").version == "1"
        assert registry.download(registry.champion("digits-served"), tmp_path / "dl").read_bytes() == b"first"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert server.poll() is not None


def test_require_promotion_exits_3_when_the_gate_refuses(cli, home, kaggle_data):
    result = cli("run", "train-kaggle", "--data", kaggle_data, "--set", "validate.min_rows=10",
                 "--set", "train.epochs=1", "--set", "train.model=baseline", "--set", "evaluate.threshold=1.0",
                 "--require-promotion")
    assert result.code == 3
    (message,) = result.err.strip().splitlines()
    assert "not promoted" in message and "is below the threshold 100.00%" in message
    (run,) = (home / "runs").iterdir()
    record = json.loads((run / "run.json").read_text())
    assert record["promoted"] is False and record["stages"]["evaluate"]["status"] == "completed"
    assert stages.registry().champion("digits-kaggle") is None


def test_scoring_a_model_file_runs_no_code_from_it(tmp_path):
    """Keras safe mode: a model with a Lambda layer (arbitrary Python) is refused, not executed."""
    import keras

    from components.evaluate import load_predict

    inputs = keras.Input((28, 28, 1))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(keras.layers.Lambda(lambda x: x * 2)(inputs)))
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    with pytest.raises(DigitsInputError, match="lambda.keras: not a loadable Keras model .*safe_mode"):
        load_predict(tmp_path / "lambda.keras")


@pytest.mark.parametrize("accuracy, champion_accuracy, passed, words", [
    (0.985, None, False, "val_accuracy 98.5000% is below the threshold 99.00%; no champion yet"),
    (0.995, None, True, "val_accuracy 99.5000% >= the threshold 99.00%; no champion yet"),
    (0.995, 0.996, False, "99.5000% >= the threshold 99.00%; below champion version 4's 99.6000%"),
    (0.985, 0.980, False, "98.5000% is below the threshold 99.00%; >= champion version 4's 98.0000%"),
    (0.996, 0.996, True, ">= champion version 4's 99.6000% on the same validation data"),
])
def test_the_gate_needs_the_threshold_and_the_champion(accuracy, champion_accuracy, passed, words):
    from components.evaluate import decide

    comparison = None if champion_accuracy is None else {
        "champion_version": "4", "champion_accuracy": champion_accuracy, "difference": accuracy - champion_accuracy,
        "ci95": [-0.01, 0.01], "p_value": 0.5}
    gate = decide(accuracy, 0.99, comparison)
    assert gate["passed"] is passed and words in gate["reason"]
    assert gate["champion_version"] == ("4" if comparison else None)


def test_the_paired_comparison_counts_and_tests_the_images_the_two_disagree_on():
    from scipy.stats import binomtest

    from components.evaluate import compare

    labels = np.arange(200) % 10
    candidate, champion = labels.copy(), labels.copy()
    candidate[:3] = (labels[:3] + 1) % 10  # 3 images only the champion gets right
    champion[3:15] = (labels[3:15] + 1) % 10  # 12 only the candidate gets right
    champion[15:20] = candidate[15:20] = (labels[15:20] + 2) % 10  # 5 both get wrong
    found = compare(labels, candidate, champion)
    assert (found["both_right"], found["candidate_only_right"], found["champion_only_right"],
            found["both_wrong"]) == (180, 12, 3, 5)
    assert found["difference"] == pytest.approx(9 / 200) and found["p_value"] == pytest.approx(
        binomtest(3, 15, 0.5).pvalue)
    low, high = found["ci95"]
    assert low < found["difference"] < high and high - low == pytest.approx(2 * 1.959964 * np.sqrt(15 - 81 / 200) / 200)
    same = compare(labels, labels, labels)
    assert same["p_value"] == 1.0 and same["ci95"] == [0.0, 0.0]


@pytest.mark.parametrize("policy, difference, p_value, passed", [
    ("at-least-champion", 0.0, 1.0, True), ("at-least-champion", -0.001, 0.9, False),
    ("significantly-better", 0.004, 0.3, False), ("significantly-better", 0.02, 0.01, True),
    ("not-significantly-worse", -0.004, 0.3, True), ("not-significantly-worse", -0.02, 0.01, False),
])
def test_each_promotion_policy(policy, difference, p_value, passed):
    from components.evaluate import decide
    from schemas.config import PromoteWhen

    comparison = {"champion_version": "2", "champion_accuracy": 0.99 - difference, "difference": difference,
                  "ci95": [difference - 0.01, difference + 0.01], "p_value": p_value}
    gate = decide(0.99, 0.9, comparison, PromoteWhen(policy), alpha=0.05)
    assert gate["passed"] is passed and f"{policy}: {'met' if passed else 'not met'}" in gate["reason"]


def test_equal_models_do_not_swap_the_champion_when_it_must_be_significantly_better(home, kaggle_data):
    first, config = _trained_run(kaggle_data, *STRONG, "seed=1")
    assert _evaluate_and_register(first, config)[2]
    twin, config = _trained_run(kaggle_data, *STRONG, "seed=2", "evaluate.promote_when=significantly-better")
    evaluation, version, promoted = _evaluate_and_register(twin, config)
    comparison = evaluation.comparison
    assert comparison["champion_version"] == "1" and comparison["p_value"] > 0.05
    assert sum(comparison[k] for k in ("both_right", "candidate_only_right", "champion_only_right", "both_wrong")) == 100
    assert not evaluation.passed and (version, promoted) == (None, False)
    assert "significantly-better: not met" in evaluation.reason
    assert stages.registry().champion("digits-kaggle").version == "1"
    report = (twin.stage_dir("evaluate") / "report.html").read_text()
    assert "Against champion version 1" in report and "McNemar" in report


def test_a_clearly_worse_model_is_refused_under_every_policy(home, kaggle_data, cli):
    strong, config = _trained_run(kaggle_data, *STRONG)
    assert _evaluate_and_register(strong, config)[2]
    weak, _ = _trained_run(kaggle_data, *WEAK)
    for policy in ("at-least-champion", "significantly-better", "not-significantly-worse"):
        result = cli("evaluate", "--run", weak.run_id, "--set", f"evaluate.promote_when={policy}")
        assert result.code == 0, result.err
        metrics = json.loads((weak.stage_dir("evaluate") / "metrics.json").read_text())
        assert not metrics["gate"]["passed"] and metrics["gate"]["policy"] == policy
        assert metrics["comparison"]["p_value"] < 1e-6 and metrics["comparison"]["ci95"][1] < 0
    versions = stages.registry().versions("digits-kaggle")
    assert [v.version for v in versions] == ["1"] and versions[0].champion


def test_the_calibration_error_is_the_gap_between_confidence_and_accuracy():
    from components.evaluate import calibration

    labels = np.zeros(100, int)
    confident = np.full((100, 10), 0.1 / 9)
    confident[:, 0] = 0.9  # every top probability 0.9 ...
    right_90 = confident.copy()
    right_90[90:] = np.roll(right_90[90:], 1, axis=1)  # ... and 90 of 100 right: calibrated
    assert calibration(labels, right_90)["ece"] == pytest.approx(0.0, abs=1e-9)
    right_60 = confident.copy()
    right_60[60:] = np.roll(right_60[60:], 1, axis=1)  # 60 of 100 right at 0.9: over-confident by 0.3
    found = calibration(labels, right_60)
    assert found["ece"] == pytest.approx(0.3) and len(found["reliability"]) == 1
    assert found["reliability"][0]["images"] == 100 and found["reliability"][0]["accuracy"] == pytest.approx(0.6)


def test_batched_scoring_gives_what_keras_predict_gives_for_one_output_and_several():
    """components.keras_layers.predict (evaluate, export, `digits predict`, an ensemble's members) scores
    chunk by chunk; the numbers must be Keras' own, with a last chunk shorter than the others and none at all."""
    from components.keras_layers import predict
    from components.tensorflow_runtime import import_tensorflow
    from components.train import models
    from schemas.config import TrainConfig

    import_tensorflow()
    import keras

    model = models.build(TrainConfig(model="baseline", augment=False), keras)
    images = np.random.default_rng(0).integers(0, 256, (2_500, 28, 28, 1), dtype=np.uint8)
    assert np.allclose(predict(model, images), model.predict(images, batch_size=1024, verbose=0), atol=1e-6)
    assert predict(model, images[:0]).shape == (0, 10)
    image = keras.Input((28, 28, 1))
    two = keras.Model(image, [model(image), model(image[:, ::-1])])
    ours, keras_own = predict(two, images, batch_size=700), two.predict(images, verbose=0)
    assert len(ours) == 2 and all(np.allclose(a, b, atol=1e-6) for a, b in zip(ours, keras_own))
    assert [a.shape for a in predict(two, images[:0])] == [(0, 10), (0, 10)]


def test_the_robustness_sweep_scores_the_unperturbed_images_once_and_its_numbers_do_not_change(monkeypatch):
    from components import evaluate
    from components.evaluate import NOISE, ROTATIONS, SHIFTS, robustness_sweep

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 300)
    calls = []

    def predict(batch):  # a fixed "model": the class is the image's mean ink, binned
        calls.append(batch)
        return np.eye(10)[(batch.reshape(len(batch), -1).mean(axis=1) * 10 / 256).astype(int) % 10]

    alone = robustness_sweep(predict, images, labels)
    assert len(calls) == len(ROTATIONS) + len(SHIFTS) + len(NOISE) - 2  # the images as they are: once
    calls.clear()
    given = robustness_sweep(predict, images, labels, probabilities=predict(images))
    assert len(calls) == 1 + len(ROTATIONS) + len(SHIFTS) + len(NOISE) - 3 and given == alone
    clean = float((predict(images).argmax(1) == labels).mean())
    assert alone["rotation_degrees"]["0"] == alone["shift_pixels"]["0"] == alone["noise_sigma"]["0.0"] == clean
    assert any(alone["noise_sigma"][str(sigma)] != clean for sigma in NOISE[1:])
    # perturbed a few rows at a time (memory holds one chunk's float copies), the same numbers, noise included
    monkeypatch.setattr(evaluate, "ROBUSTNESS_CHUNK", 7)
    assert robustness_sweep(predict, images, labels) == alone


def _image_set(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


def test_a_fine_tuned_model_is_refused_when_its_base_saw_its_val_images_and_warned_of_seen_test_rows(
        home, kaggle_data, tmp_path, cli):
    """Lineage of seen images: the base's training images travel through transfer; a val split holding some
    of them refuses the gate with the count; test rows it saw are a warning, listed next to the submission."""
    from components import records
    from runs import output

    base, config = _trained_run(kaggle_data, *STRONG)
    assert _evaluate_and_register(base, config)[1:] == ("1", True)
    labels, train = datagen.digits(1000, 0)  # kaggle_data's own train rows: 800 as train, 20 others as test
    reused = tmp_path / "kaggle-again"
    datagen.write_kaggle_arrays(reused, labels[:800], train[:800], train[800:820])
    folder, config = validated_kaggle_run(reused, "evaluate.threshold=0.2", "seed=7", "train.model=baseline",
                                          "train.epochs=1", "train.augment=false", "transfer.mode=full",
                                          "transfer.base=models:/digits-kaggle/1")
    converted = make(folder, config, "converted")
    make(folder, config, "model")

    # what the base trained on (its train split) against this run's val and test images, counted by bytes
    base_seen = _image_set(records.load(output(base, "converted").files("train")).images)
    own_seen = _image_set(records.load(converted.files("train")).images)
    val, test = records.load(converted.files("val")), records.load(converted.files("test"))
    expected_val = sum(image.tobytes() in base_seen | own_seen for image in val.images)
    expected_test = sorted(int(i) for i, image in zip(test.ids, test.images) if image.tobytes() in base_seen | own_seen)
    assert 0 < expected_val < len(val.ids) and 0 < len(expected_test) < 20

    evaluation = make(folder, config, "evaluation")
    assert not evaluation.passed and evaluation.seen_val == expected_val
    assert evaluation.reason.startswith(f"the val split holds {expected_val:,} images this model (or a model it was "
                                        "fine-tuned from) was trained on: its val score is contaminated")
    assert evaluation.seen_test == len(expected_test)
    metrics = json.loads((folder.stage_dir("evaluate") / "metrics.json").read_text())
    chain = metrics["lineage"]["chain"]
    assert [link.get("model") for link in chain] == [None, "models:/digits-kaggle/1"] and metrics["lineage"]["complete"]
    assert [link["images"] for link in chain] == [len(own_seen), len(base_seen)]
    record = json.loads(folder.path.read_text())
    assert any(f"{len(expected_test)} of 20 test images were seen in training" in w for w in record["warnings"])
    assert "Seen images" in (folder.stage_dir("evaluate") / "report.html").read_text()
    registration = make(folder, config, "registration")
    assert registration.version is None and "contaminated" in registration.reason

    exported = make(folder, config, "exported")
    with (folder.stage_dir("export") / "seen-test-images.csv").open() as handle:
        listed = [int(line.split(",")[0]) for line in handle.read().splitlines()[1:]]
    assert listed == expected_test and exported.seen_test == len(expected_test)

    # the override: recorded, and the seen images no longer refuse (the champion comparison still applies)
    result = cli("evaluate", "--run", folder.run_id, "--set", "evaluate.allow_seen_val=true",
                 "--set", "evaluate.promote_when=not-significantly-worse")
    assert result.code == 0, result.err
    gate = json.loads((folder.stage_dir("evaluate") / "metrics.json").read_text())["gate"]
    assert gate["allow_seen_val"] and "(allowed by evaluate.allow_seen_val=true)" in gate["reason"]
    assert "contaminated" not in gate["reason"]


def test_temperature_scaling_recovers_a_known_over_confidence():
    """Labels drawn from softmax(z); the model says softmax(2 z): the fitted temperature is about 2 and the
    calibration error falls, on images the temperature was not fitted on too (cross-fitted)."""
    from components import calibrate
    from components.evaluate import calibration

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, (20_000, 10))
    truth = calibrate.scaled(np.exp(logits), 1.0)
    labels = np.array([rng.choice(10, p=p) for p in truth])
    over_confident = calibrate.scaled(np.exp(logits), 0.5)
    temperature = calibrate.fit_temperature(over_confident, labels)
    assert abs(temperature - 2.0) < 0.1
    before = calibration(labels, over_confident)["ece"]
    after = calibration(labels, calibrate.scaled(over_confident, temperature))["ece"]
    assert after < before / 5 and calibrate.cross_fitted_ece(over_confident, labels) < before / 5
    assert (calibrate.scaled(over_confident, temperature).argmax(1) == over_confident.argmax(1)).all()


def test_a_calibrated_model_keeps_its_temperature_everywhere_it_goes(home, kaggle_data, cli, tmp_path):
    """evaluate.calibrate=true: the calibrate stage puts the temperature inside the model; evaluate reports
    ECE before and after with the accuracy unchanged; the registry's model (what predict and transfer load,
    in safe mode) gives the scaled probabilities; the export serves them."""
    from components import calibrate, records
    from components.evaluate import load_predict
    from flows import runner
    from runs import output

    folder, config = _trained_run(kaggle_data, *STRONG, "evaluate.calibrate=true")
    trained = runner.output_of(folder, "train")
    calibrated = output(folder, "model")  # the last producer of the model: calibrate
    assert calibrated.dir.name == "calibrate" and calibrated.temperature is not None
    evaluation, version, promoted = _evaluate_and_register(folder, config)
    assert (version, promoted) == ("1", True)
    scaling = json.loads((folder.stage_dir("evaluate") / "metrics.json").read_text())["calibration"]["scaling"]
    assert scaling["temperature"] == calibrated.temperature and scaling["ece_after"] < scaling["ece_before"]
    val = records.load(output(folder, "converted").files("val"))
    raw = load_predict(trained.path, trained.hashes[trained.file])(val.images)
    assert evaluation.val_accuracy == float((raw.argmax(1) == val.labels).mean())  # argmax unchanged

    with __import__("tempfile").TemporaryDirectory() as scratch:
        reg = stages.registry()
        registered = reg.download(reg.resolve("models:/digits-kaggle@champion"), Path(scratch))
        served = load_predict(registered, reg.resolve("models:/digits-kaggle/1").tags["digits.model_sha256"])(val.images)
    np.testing.assert_allclose(served, calibrate.scaled(raw, calibrated.temperature), atol=1e-4)
    assert "Temperature-scaled" in (folder.stage_dir("evaluate") / "report.html").read_text()

    exported = make(folder, config, "exported")
    assert exported.infra_rows > 0 and exported.max_probability_diff < 1e-4  # the SavedModel, in a process of its own
    record = json.loads(folder.path.read_text())
    assert list(record["stages"]) == ["ingest", "validate", "convert", "train", "calibrate", "evaluate", "register",
                                      "export"]
