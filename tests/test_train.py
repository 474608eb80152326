"""The train stage: the model zoo, checkpoints, resume after kill -9, MLflow and TensorBoard logs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import datagen
import numpy as np
import pytest
from runs import converted_kaggle_run, kill_when, make, output

from components import records
from flows import runner
from components.tracking import tracking_uri
from components.train import processor_name
from schemas.config import ModelName, TrainConfig
from schemas.errors import DigitsInputError


def test_one_short_epoch_writes_model_checkpoints_logs_and_mlflow_metrics(home, kaggle_data):
    folder, config = converted_kaggle_run(kaggle_data, "train.epochs=1", "evaluate.calibrate=false")  # train's model
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
    assert run.data.params["device"] == "CPU" and run.data.params["processor"] == processor_name()
    assert run.data.tags["digits.data_fingerprint"] == output(folder, "converted").fingerprint
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]


def test_killed_training_resumes_at_the_next_epoch(home, tmp_path):
    """kill -9 after the first epoch's checkpoint: no train/ folder; the re-run resumes at epoch 2 of 3."""
    datagen.write_kaggle(tmp_path / "kaggle", n_train=1500, n_test=20)
    folder, _ = converted_kaggle_run(tmp_path / "kaggle")
    command = [str(Path(sys.executable).with_name("digits")), "train", "--run", folder.run_id,
               "--set", "train.epochs=3"]
    env = {**os.environ, "DIGITS_HOME": str(home)}
    state = folder.root / ".train.inprogress/checkpoints/state.json"
    kill_when(command, env, state.is_file)
    assert json.loads(state.read_text())["epoch"] == 1, "killed too late: a second epoch had completed"
    assert not folder.stage_dir("train").exists()
    with pytest.raises(DigitsInputError, match="no completed train stage"):
        runner.output_of(folder, "train")

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming at epoch 2 of 3" in done.stdout
    assert "epoch 1/3" not in done.stdout and "epoch 3/3" in done.stdout
    trained = runner.output_of(folder, "train")  # `digits train` runs train; calibrate is evaluate's
    assert (trained.epochs, trained.resumed_at_epoch) == (3, 2)
    with (folder.stage_dir("train") / "history.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1, 2]  # one row per epoch, none twice
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri(home)).get_metric_history(trained.mlflow_run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]  # one MLflow run across both attempts


class _Interrupted(RuntimeError):
    pass


def test_clean_epochs_train_without_the_augment_block_and_a_resumed_attempt_stays_without_it(home, kaggle_data,
                                                                                             tmp_path):
    """train.clean_epochs: after the augmented epochs, the same layers without `augment`; the checkpoint holds
    that model, so an attempt stopped inside the clean epochs resumes without augmentation."""
    import keras

    from components import train
    from components.keras_layers import load_keras_model

    folder, _ = converted_kaggle_run(kaggle_data)
    converted = output(folder, "converted")
    config = TrainConfig(epochs=1, clean_epochs=2, elastic=36)
    work = tmp_path / "train"

    class StopAfterTheFirstCleanEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:  # runs after digits' own callbacks: epoch 2 is checkpointed
                raise _Interrupted()

    with pytest.raises(_Interrupted):
        train.run(converted, config, 42, work, callbacks=[StopAfterTheFirstCleanEpoch()])

    def layers(path: Path) -> list[str]:
        return [layer.name for layer in load_keras_model(path, compile=False).layers]

    augmented, clean = layers(work / "checkpoints/epoch-001.keras"), layers(work / "checkpoints/epoch-002.keras")
    assert "augment" in augmented and clean == [name for name in augmented if name != "augment"]
    said = []
    trained = train.run(converted, config, 42, work, progress=said.append)
    assert "resuming at epoch 3 of 3 from epoch-002.keras" in said
    assert (trained.epochs, trained.resumed_at_epoch) == (3, 3)
    assert layers(work / "model.keras") == clean  # the same scores at inference: augment is inactive there
    with (work / "history.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1, 2]


def test_the_processor_name_comes_from_cpuinfo_and_falls_back_to_the_platform(tmp_path):
    import platform

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"
                       "\nprocessor\t: 1\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert processor_name(cpuinfo) == "AMD EPYC 9654 96-Core Processor"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: \n")  # blank, as some virtual machines report it
    assert processor_name(cpuinfo) == platform.processor()
    assert processor_name(tmp_path / "missing") == platform.processor()


def test_a_schedule_without_warm_up_starts_at_its_learning_rate():
    from components.train import _optimizer

    assert float(_optimizer(3e-4, 1, 10, 0).learning_rate) == pytest.approx(3e-4)  # clean epochs: no warm-up
    assert float(_optimizer(3e-3, 2, 10, 0.5).learning_rate) == pytest.approx(3e-3 / 20)  # warm-up from lr / 20


def test_an_interrupted_attempt_with_another_config_is_not_resumed(home, kaggle_data):
    folder, config = converted_kaggle_run(kaggle_data, "train.epochs=1")
    leftover = folder.root / ".train.inprogress/checkpoints"
    leftover.mkdir(parents=True)
    (leftover / "epoch-001.keras").write_bytes(b"not a model")
    (leftover / "state.json").write_text(json.dumps({"epoch": 1, "checkpoint": "epoch-001.keras",
                                                     "signature": {"data": "other"}, "mlflow_run_id": None}))
    trained = make(folder, config, "model")
    assert trained.resumed_at_epoch is None and trained.path.is_file()


def test_pca_svm_reference(home, kaggle_data):
    folder, config = converted_kaggle_run(kaggle_data, "train.model=pca-svm")
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


ROBUST = TrainConfig(augment=True, background_noise=1.0, pixel_noise=0.3, occlusion=0.5, contrast=0.3, brightness=0.2)


def _scaled_digits(n: int = 64) -> np.ndarray:
    return (datagen.digits(n, seed=9)[1][..., None] / 255.0).astype("float32")


def test_robustness_augmentation_runs_in_order_and_only_while_training():
    import keras

    from components.train import models

    block = models.augmentation(ROBUST, keras)
    assert [layer.name for layer in block.layers][-4:] == ["occlusion", "contrast_brightness", "background_noise",
                                                           "pixel_noise"]  # after the geometric ones (black fill)
    assert isinstance(block.layers[0], keras.layers.RandomRotation)
    images = _scaled_digits()
    assert np.array_equal(np.asarray(block(images, training=False)), images)  # inference: unchanged
    trained = np.asarray(block(images, training=True))
    assert trained.min() >= 0 and trained.max() <= 1 and not np.allclose(trained, images)
    assert not models.augments(TrainConfig(augment=False))
    assert models.augments(TrainConfig(augment=False, pixel_noise=0.1))


def test_random_backgrounds_fill_only_the_background():
    import keras

    from components.keras_layers import classes

    images = _scaled_digits()
    noisy = np.asarray(classes(keras)["BackgroundNoise"](max_level=1.0, seed=1)(images, training=True))
    background = images < 0.1
    assert np.array_equal(noisy[~background], images[~background])  # the ink is untouched
    assert (noisy[background] > images[background]).mean() > 0.9 and noisy.max() <= 1
    levels = np.array([image[mask].max() for image, mask in zip(noisy, background)])
    assert levels.std() > 0.1  # a level of its own per image


def test_geometric_augmentation_on_noise_backgrounds_keeps_the_noise_with_reflect_and_nearest():
    """Fine-tuning on noisy scans: rotation/shift/zoom with train.fill=reflect and train.interpolation=nearest
    put no black border into a noise background and resample no pixel into a value the image did not have;
    the defaults (black fill, bilinear) do both — what made augmented noisy fine-tuning score worse."""
    import keras

    from components.train import models

    rng = np.random.default_rng(4)
    images = rng.integers(1, 256, (16, 28, 28, 1)).astype("float32") / 255  # noise everywhere, no black pixel
    keep = TrainConfig(rotation_degrees=15, shift=0.15, zoom=0.15, fill="reflect", interpolation="nearest")
    moved = np.asarray(models.augmentation(keep, keras)(images, training=True))
    assert not np.allclose(moved, images)
    for before, after in zip(images, moved):
        assert set(np.unique(after)) <= set(np.unique(before))  # every pixel one of the image's own
    default = np.asarray(models.augmentation(TrainConfig(rotation_degrees=15, shift=0.15, zoom=0.15), keras)(
        images, training=True))
    assert (default == 0).mean() > 0.01  # black fill
    assert any(not set(np.unique(after)) <= set(np.unique(before)) for before, after in zip(images, default))


def test_elastic_distortion_replaces_rotation_shift_and_zoom_with_one_resampling_only_while_training():
    import keras

    from components.train import models

    block = models.augmentation(TrainConfig(elastic=36, elastic_sigma=6), keras)
    assert [layer.name for layer in block.layers] == ["elastic"]  # rotation, shift and zoom folded into it
    assert [layer.rotation for layer in block.layers] == [10.0]
    images = _scaled_digits()
    assert np.array_equal(np.asarray(block(images, training=False)), images)  # inference: unchanged
    bent = np.asarray(block(images, training=True))
    assert bent.min() >= 0 and bent.max() <= 1 + 1e-6 and not np.allclose(bent, images)
    assert bent.sum() == pytest.approx(images.sum(), rel=0.1)  # strokes move, ink is neither made nor lost
    plain = np.asarray(models.augmentation(TrainConfig(), keras)(images, training=True))
    assert (bent > 0.05).sum() < (plain > 0.05).sum()  # one resampling smears ink over fewer pixels than three
    with pytest.raises(ValueError, match="black fill"):  # its fill and resampling are fixed
        TrainConfig(elastic=36, fill="reflect")


def _centres(images: np.ndarray) -> np.ndarray:
    rows, cols = np.mgrid[:images.shape[1], :images.shape[2]]
    ink = images[..., 0].sum(axis=(1, 2))
    return np.stack([(images[..., 0] * rows).sum(axis=(1, 2)) / ink, (images[..., 0] * cols).sum(axis=(1, 2)) / ink], 1)


def test_elastic_distortion_geometry_rotates_about_the_centre_and_shifts_within_bounds():
    import keras

    from components.keras_layers import classes

    distortion = classes(keras)["ElasticDistortion"]
    images = _scaled_digits()
    assert np.array_equal(np.asarray(distortion(alpha=0.0)(images, training=True)), images)  # nothing asked: identity
    rotated = np.asarray(distortion(alpha=0.0, rotation=30, seed=1)(images, training=True))
    assert not np.allclose(rotated, images)
    centred = np.abs(_centres(images) - 13.5).max(axis=1) < 3  # digits whose ink centre is near the image centre
    assert np.abs(_centres(rotated) - _centres(images))[centred].max() < 1.5  # turned about the centre, not moved
    shifted = np.asarray(distortion(alpha=0.0, shift=0.1, seed=2)(images, training=True))
    moved = np.abs(_centres(shifted) - _centres(images)).max(axis=1)
    assert moved.max() <= 0.1 * 28 + 0.5 and (moved > 1).mean() > 0.3  # up to 2.8 px, most by more than 1 px


def test_elastic_field_is_uniform_noise_smoothed_by_a_gaussian_of_sigma_and_scaled_by_alpha():
    """On a horizontal ramp (pixel value = its column) bilinear resampling is exact, so each output pixel reads off
    the column it was moved to: the field itself. Its spread is alpha x the Gaussian's, and it is smooth."""
    import keras
    from scipy.ndimage import gaussian_filter1d

    from components.keras_layers import classes

    distortion = classes(keras)["ElasticDistortion"](alpha=36.0, sigma=6.0, seed=3)
    noise = np.random.default_rng(0).uniform(-1, 1, (28, 28)).astype("float32")
    blur = np.asarray(distortion.blur(28))
    expected = gaussian_filter1d(gaussian_filter1d(noise, 6.0, axis=0, mode="constant", truncate=3.0), 6.0, axis=1,
                                 mode="constant", truncate=3.0)
    assert np.allclose(blur @ noise @ blur.T, expected, atol=1e-6)  # the matrix form is the separable Gaussian

    ramp = np.broadcast_to(np.arange(28, dtype="float32")[None, None, :, None], (256, 28, 28, 1)).copy()
    field = np.asarray(distortion(ramp, training=True))[:, 8:20, 8:20, 0] - np.arange(8, 20)[None, None, :]
    kernel = np.exp(-0.5 * (np.arange(-18, 19) / 6.0) ** 2)
    sigma = 36.0 * np.sqrt(1 / 3) * ((kernel / kernel.sum()) ** 2).sum()  # uniform(-1, 1) through the 2-D kernel
    assert field.std() == pytest.approx(sigma, rel=0.15) and abs(field.mean()) < 0.2
    neighbours = np.corrcoef(field[:, :, :-1].ravel(), field[:, :, 1:].ravel())[0, 1]
    assert neighbours > 0.95  # smooth: a pixel moves with its neighbours


def test_occlusion_erases_a_rectangle_to_background_in_the_chosen_images():
    import keras

    from components.keras_layers import classes

    images = np.ones((32, 28, 28, 1), "float32")
    erased = np.asarray(classes(keras)["Occlusion"](rate=1.0, max_side=0.4, seed=2)(images, training=True))
    for image in erased[..., 0]:
        rows, cols = np.nonzero(image == 0)
        if len(rows):  # a rectangle: every pixel of its bounding box is erased
            assert (image[rows.min():rows.max() + 1, cols.min():cols.max() + 1] == 0).all()
            assert rows.max() - rows.min() < 12 and cols.max() - cols.min() < 12
    assert (erased == 0).any(axis=(1, 2, 3)).mean() > 0.7
    kept = np.asarray(classes(keras)["Occlusion"](rate=0.0, seed=2)(images, training=True))
    assert np.array_equal(kept, images)


def test_a_robust_model_trains_and_reloads_in_safe_mode_scoring_as_before(home, kaggle_data):
    from components.keras_layers import load_keras_model

    folder, config = converted_kaggle_run(kaggle_data, "train.epochs=1", "train.model=baseline", "train.background_noise=1",
                                    "train.pixel_noise=0.3", "train.occlusion=0.5", "train.contrast=0.3",
                                    "train.brightness=0.2", "train.elastic=34")
    trained = make(folder, config, "model")
    model = load_keras_model(trained.path)
    assert {"elastic", "background_noise", "pixel_noise", "occlusion", "contrast_brightness"} <= {
        layer.name for layer in model.get_layer("augment").layers}
    val = records.load(output(folder, "converted").files("val"))
    accuracy = float((model.predict(val.images[..., None], verbose=0).argmax(1) == val.labels).mean())
    assert accuracy == pytest.approx(trained.val_accuracy)


def test_the_robust_preset_sets_the_robustness_augmentation_and_set_still_wins(cli):
    from flows.cli import _config

    config = _config("train-mnist", None, ["train.pixel_noise=0.1"], "robust")
    assert (config.train.background_noise, config.train.pixel_noise, config.train.contrast) == (1.0, 0.1, 0.2)
    assert config.train.augment and config.train.epochs == 12  # on top of rotation, shift and zoom; longer
    best = _config("train-mnist", None, [], "robust-best")  # the robust training, three members of two architectures
    members = {"members", "member_models"}
    assert best.train.model_dump(exclude=members) == _config("train-mnist", None, [], "robust").train.model_dump(
        exclude=members) and best.train.members == 3
    assert [best.train.member(i).model.value for i in range(3)] == ["digits-net", "bn-cnn", "digits-net"]
    most = _config("train-mnist", None, [], "best")  # three digits-net members, elastic distortion, a clean epoch
    assert (most.train.members, most.train.epochs, most.train.elastic, most.train.elastic_sigma,
            most.train.clean_epochs) == (3, 17, 36, 6, 1)
    result = cli("run", "train-mnist", "--preset", "nosuch")
    assert result.code == 2 and result.err.strip() == ("digits: error: unknown preset 'nosuch'; known: fast, default, "
                                                       "best, robust, robust-best")
