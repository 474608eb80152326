"""The transfer stage (full / frozen / gradual fine-tuning of a registered model) and the export stage
(submission.csv, SavedModel, infra-validation in a process of its own)."""

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

from flows import runner, stages
from runs import make, output
from schemas.config import apply_overrides, default_config

NOISY = ("validate.min_rows=10", "train.epochs=1", "evaluate.threshold=0")


KAGGLE_ROWS = (400, 37)  # the kaggle_data fixture's train and test rows (conftest)


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("noisy")
    datagen.write_noisy(folder, n_train=300, n_test=23)
    return folder


def _submission(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def _check_submission(path: Path, test_rows: int) -> None:
    rows = _submission(path)
    assert rows[0] == ["ImageId", "Label"]  # exactly Kaggle's header
    assert [int(r[0]) for r in rows[1:]] == list(range(1, test_rows + 1))
    assert {int(r[1]) for r in rows[1:]} <= set(range(10)) and all(len(r) == 2 for r in rows)


@pytest.mark.e2e
def test_kaggle_then_noisy_through_the_cli_write_submissions_and_fine_tune_the_champion(cli, home, kaggle_data,
                                                                                       noisy_data):
    """train-kaggle registers a champion; train-noisy fine-tunes it (transfer) and both export a submission."""
    first = cli("run", "train-kaggle", "--data", kaggle_data, "--set", "validate.min_rows=10",
                "--set", "train.epochs=1", "--set", "evaluate.threshold=0")
    assert first.code == 0, first.err
    kaggle_run = sorted((home / "runs").iterdir())[-1]
    _check_submission(kaggle_run / "export/submission.csv", 37)
    assert (kaggle_run / "export/saved_model/saved_model.pb").is_file() and (kaggle_run / "export/model.keras").is_file()
    infra = json.loads((kaggle_run / "export/infra_validation.json").read_text())
    assert infra["rows"] == 37 and infra["disagreements"] == 0

    result = cli("run", "train-noisy", "--data", noisy_data, *[a for s in NOISY for a in ("--set", s)],
                 "--set", "transfer.base=models:/digits-kaggle@champion", "--set", "transfer.mode=full")
    assert result.code == 0, result.err
    run = sorted((home / "runs").iterdir())[-1]
    record = json.loads((run / "run.json").read_text())
    assert list(record["stages"]) == ["ingest", "validate", "convert", "transfer", "calibrate", "evaluate", "register",
                                      "export"]
    transfer = record["stages"]["transfer"]["outputs"]
    assert (transfer["base"], transfer["transfer_mode"]) == ("models:/digits-kaggle/1", "full")
    # train-noisy's default rehearses every image the base was trained on, drawn on noise backgrounds
    kaggle_train = json.loads((kaggle_run / "run.json").read_text())["stages"]["convert"]["outputs"]["counts"]["train"]
    assert {k: transfer["rehearsal"][k] for k in ("run", "share", "noise_background", "rows")} == {
        "run": kaggle_run.name, "share": 1.0, "noise_background": True, "rows": kaggle_train}
    assert transfer["train_rows"] == record["stages"]["convert"]["outputs"]["counts"]["train"] + kaggle_train
    assert (run / "transfer/model.keras").is_file() and (run / "transfer/base.keras").is_file()
    _check_submission(run / "export/submission.csv", 23)  # the noisy test rows, in order
    assert record["registry_version"] == 1 and record["promoted"]
    version = stages.registry().resolve("models:/digits-noisy@champion")
    assert version.tags["digits.base"] == "models:/digits-kaggle/1" and version.tags["digits.run_id"] == run.name

    kaggle_run.rename(kaggle_run.with_name("elsewhere"))  # the base's run folder is gone (deleted, another home's)
    again = cli("run", "train-noisy", "--data", noisy_data, *[a for s in NOISY for a in ("--set", s)],
                "--set", "transfer.base=models:/digits-kaggle@champion")
    assert again.code == 2 and f"trained by run {kaggle_run.name}, which is not under" in again.err \
        and "--set transfer.rehearse=0" in again.err and len(again.err.strip().splitlines()) == 1


def test_without_a_champion_train_noisy_says_what_to_do_in_one_line(cli, home, noisy_data):
    result = cli("run", "train-noisy", "--data", noisy_data, *[a for s in NOISY for a in ("--set", s)])
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "digits run train-mnist" in line and "transfer.base=scratch" in line and "Traceback" not in result.out
    run = sorted((home / "runs").iterdir())[-1]
    assert not (run / "transfer").exists()


def _noisy_run(noisy_data: Path, *overrides: str):
    """A converted train-noisy run; its transfer fine-tunes .keras files, which name no run to rehearse."""
    config = apply_overrides(default_config("train-noisy"), [f"ingest.data={noisy_data}", *NOISY,
                                                             "transfer.rehearse=0", *overrides])
    folder = stages.start_run(config)
    make(folder, config, "examples")
    make(folder, config, "validation")
    make(folder, config, "converted")
    return folder, config


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, kaggle_data) -> Path:
    """A digits-net trained on the clean synthetic Kaggle digits, as a .keras file."""
    home = tmp_path_factory.mktemp("base-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIGITS_HOME", str(home))
        from runs import validated_kaggle_run

        folder, config = validated_kaggle_run(kaggle_data, "train.epochs=1")
        make(folder, config, "converted")
        return make(folder, config, "model").path


def _weights(model, keras) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.array(w) for w in layer.weights] for layer in model.layers
            if layer.weights and not isinstance(layer, keras.Sequential)}


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def noisy_converted(tmp_path_factory, noisy_data):
    """A train-noisy run ingested, validated and converted (in a home of its own), for the mode tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIGITS_HOME", str(tmp_path_factory.mktemp("noisy-home")))
        folder, config = _noisy_run(noisy_data)
    return folder, config


@pytest.mark.parametrize("mode", ["full", "frozen", "gradual"])
def test_each_mode_trains_what_it_promises(home, noisy_converted, base_model, mode):
    import keras

    folder, config = noisy_converted
    config = apply_overrides(config, [f"transfer.base={base_model}", f"transfer.mode={mode}", "train.epochs=2",
                                      "transfer.head_epochs=1"])
    trained = make(folder, config, "model")  # the model stage: transfer, since transfer.base is set
    assert (trained.base, trained.transfer_mode, trained.epochs) == (str(base_model.resolve()), mode, 2)
    base = _weights(keras.models.load_model(base_model, safe_mode=True), keras)
    tuned = _weights(keras.models.load_model(trained.path, safe_mode=True), keras)
    convs = [n for n in base if n.startswith("conv2d")]
    norms = [n for n in base if n.startswith("batch_normalization")]
    assert convs and norms
    if mode == "full":  # every weight moved, BatchNorm statistics re-estimated on the noisy images
        assert not any(_same(base[n], tuned[n]) for n in convs + norms)
        assert "probabilities" in tuned
    elif mode == "frozen":  # the extractor is untouched, BatchNorm statistics included; a new head
        assert all(_same(base[n], tuned[n]) for n in convs + norms)
        assert "new_probabilities" in tuned and "probabilities" not in tuned
    else:  # head first, then every layer but BatchNorm (still in inference mode: statistics unchanged)
        assert not any(_same(base[n], tuned[n]) for n in convs)
        assert all(_same(base[n], tuned[n]) for n in norms)
        assert "new_probabilities" in tuned


def test_a_killed_gradual_transfer_resumes_in_the_right_phase(home, noisy_data, base_model):
    """kill -9 after the head-only epoch: the re-run unfreezes at its next epoch, not from scratch."""
    import keras

    folder, _ = _noisy_run(noisy_data)
    command = [str(Path(sys.executable).with_name("digits")), "train", "--run", folder.run_id,
               "--set", f"transfer.base={base_model}", "--set", "transfer.mode=gradual",
               "--set", "train.epochs=3", "--set", "transfer.head_epochs=1"]
    env = {**os.environ, "DIGITS_HOME": str(home)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state = folder.root / ".transfer.inprogress/checkpoints/state.json"
    deadline = time.monotonic() + 180
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["epoch"]
    assert not (folder.root / "transfer").exists()

    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming at epoch {done + 1} of 3" in result.stdout
    trained = runner.output_of(folder, "transfer")  # `digits train` runs transfer; calibrate is evaluate's
    assert trained.resumed_at_epoch == done + 1 and trained.epochs == 3
    base = _weights(keras.models.load_model(base_model, safe_mode=True), keras)
    tuned = _weights(keras.models.load_model(trained.path, safe_mode=True), keras)
    assert not any(_same(base[n], tuned[n]) for n in base if n.startswith("conv2d"))  # phase 2 ran
    assert all(_same(base[n], tuned[n]) for n in base if n.startswith("batch_normalization"))
    with (folder.stage_dir("transfer") / "history.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1, 2]


def test_a_base_that_is_not_a_digits_model_is_refused_in_one_line(cli, home, noisy_data, tmp_path):
    import keras

    inputs = keras.Input((32, 32, 3))
    other = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(inputs)))
    other.save(tmp_path / "cifar.keras")
    folder, _ = _noisy_run(noisy_data)
    result = cli("train", "--run", folder.run_id, "--set", f"transfer.base={tmp_path / 'cifar.keras'}")
    assert result.code == 2 and "does not take canonical digit images" in result.err
    assert len(result.err.strip().splitlines()) == 1
    digits = keras.Input((28, 28, 1))  # digit images, but a branched graph: a skip joined by Concatenate
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(digits))
    hidden = keras.layers.Dense(16, activation="relu")(flat)
    joined = keras.layers.Concatenate()([flat, hidden])
    keras.Model(digits, keras.layers.Dense(10, activation="softmax")(joined)).save(tmp_path / "skip.keras")
    result = cli("train", "--run", folder.run_id, "--set", f"transfer.base={tmp_path / 'skip.keras'}")
    assert result.code == 2 and "is not a single chain of layers" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
    result = cli("train", "--run", folder.run_id, "--set", f"transfer.base={tmp_path / 'cifar.keras'}",
                 "--set", "transfer.rehearse=1")  # a file names no run whose images could be rehearsed
    assert result.code == 2 and "does not say which run trained it" in result.err \
        and "--set transfer.rehearse=0" in result.err and len(result.err.strip().splitlines()) == 1
    result = cli("train", "--run", folder.run_id, "--set", "transfer.base=models:/nope")
    assert result.code == 2 and "not a registry URI" in result.err


def test_rehearsal_draws_the_bases_training_images_on_noise_backgrounds_and_refuses_damaged_ones(home, kaggle_data):
    from components import records
    from components.train.rehearsal import Rehearsal
    from runs import validated_kaggle_run
    from schemas.errors import DamagedArtifact

    folder, config = validated_kaggle_run(kaggle_data)
    converted = make(folder, config, "converted")
    clean = records.load(converted.files("train"))
    half = Rehearsal(converted, 0.5, noise_background=True, run_id=folder.run_id)
    drawn = half.arrays(seed=3)
    assert len(drawn.ids) == half.rows == round(len(clean.ids) / 2) and (drawn.ids < 0).all()
    rows = -1 - drawn.ids
    assert np.array_equal(drawn.labels, clean.labels[rows])
    ink = clean.images[rows] > 0
    assert np.array_equal(drawn.images[ink], clean.images[rows][ink])  # the digit as the base learnt it
    background = drawn.images[~ink].astype(float)  # make_noisy's recipe: uniform noise over 0..255
    assert 117 < background.mean() < 138 and 66 < background.std() < 81
    assert all(np.array_equal(a, b) for a, b in zip(drawn, half.arrays(seed=3)))  # a resumed run sees the same
    assert not np.array_equal(drawn.ids, half.arrays(seed=4).ids)
    every = Rehearsal(converted, 1.0, noise_background=False, run_id=folder.run_id).arrays(seed=3)
    assert np.array_equal(-1 - every.ids, np.arange(len(clean.ids))) and np.array_equal(every.images, clean.images)

    shard = converted.files("train")[0]
    shard.write_bytes(shard.read_bytes()[:-9])  # the base run's shard changed since it was recorded
    with pytest.raises(DamagedArtifact, match=shard.name):
        half.arrays(seed=3)


def test_an_export_that_disagrees_in_a_fresh_process_leaves_no_export(home, kaggle_data, monkeypatch):
    """Infra-validation: a SavedModel that predicts differently from the model that made the submission
    fails the stage, and no export/ folder (no submission) is left for anyone to pick up."""
    import keras
    import tensorflow as tf
    from runs import validated_kaggle_run

    from components import export as export_component
    from components import records

    folder, config = validated_kaggle_run(kaggle_data, "train.epochs=1", "train.model=baseline")
    make(folder, config, "converted")
    make(folder, config, "model")
    broken = keras.models.load_model(output(folder, "model").path, safe_mode=True)
    rng = np.random.default_rng(1)
    for layer in broken.layers:  # a faulty export: same architecture, other weights
        layer.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in layer.get_weights()])
    broken.save(folder.root.parent / "broken.keras")
    real_export = export_component.export_saved_model
    with monkeypatch.context() as patch:
        patch.setattr(export_component, "export_saved_model",
                      lambda _model, target: real_export(folder.root.parent / "broken.keras", target))
        with pytest.raises(RuntimeError, match="infra-validation failed"):
            make(folder, config, "exported")
    assert not (folder.root / "export").exists() and not list(folder.root.glob(".export.*"))
    assert folder.load().stages["export"].status == "failed"

    exported = make(folder, config, "exported")  # the real export passes and serves what the flow predicted
    images = records.load(output(folder, "converted").files("test")).images
    serving = tf.saved_model.load(str(exported.dir / "saved_model")).signatures["serving_default"]
    outputs = serving(images=tf.constant(images))
    assert outputs["probabilities"].shape == (37, 10) and outputs["label"].dtype == tf.int64
    assert json.loads((exported.dir / "infra_validation.json").read_text())["disagreements"] == 0


def test_the_checking_process_is_kept_refuses_what_does_not_load_and_comes_back_when_killed(tmp_path):
    """Infra-validation's process of its own: a SavedModel that does not load is one line from it; it stays up
    for the next export of this process; killed, the next export starts another."""
    from components import export as export_component

    garbage = tmp_path / "saved_model"
    garbage.mkdir()
    (garbage / "saved_model.pb").write_bytes(b"not a protocol buffer")
    images = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(RuntimeError, match="did not load and predict in a process of its own: ") as failed:
        export_component.infra_validate(garbage, images, np.full((2, 10), 0.1), tmp_path)
    assert "\n" not in str(failed.value)
    checker = export_component._CHECKER._proc
    assert checker is not None and checker.poll() is None  # still up after a request that failed
    with pytest.raises(RuntimeError, match="did not load"):
        export_component.infra_validate(garbage, images, np.full((2, 10), 0.1), tmp_path)
    assert export_component._CHECKER._proc.pid == checker.pid  # the same process answered
    checker.kill()
    checker.wait()
    with pytest.raises(RuntimeError, match="did not load"):
        export_component.infra_validate(garbage, images, np.full((2, 10), 0.1), tmp_path)
    assert export_component._CHECKER._proc.pid != checker.pid  # a new one, started for it
    assert not list(tmp_path.glob(".infra-sample*"))
