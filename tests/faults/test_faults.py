"""Fault injection: what a damaged file, a hostile model, a full disk or a broken home does to a run.

Each case: the damage, the command a user types, its exit code, its one line, no traceback, run.json's
final status, and nothing damaged consumed (no promotion, no stage built on it). Hostile model files
must not execute anything: each plants code that would create a sentinel file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import datagen
from conftest import CliResult

KAGGLE = ("--set", "validate.min_rows=10", "--set", "train.epochs=1", "--set", "train.model=baseline",
          "--set", "evaluate.threshold=0")


def _one_line(result, code: int, *words: str) -> str:
    assert result.code == code, (result.code, result.err)
    (line,) = result.err.strip().splitlines()
    assert line.startswith("digits: error: ") and "Traceback" not in result.out, line
    for word in words:
        assert word in line, line
    return line


def _record(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A home with one complete train-kaggle run (registered champion, exported), made once per module."""
    from flows import runner, stages
    from runs import make
    from schemas.config import apply_overrides, default_config

    root = tmp_path_factory.mktemp("pristine")
    datagen.write_kaggle(root / "kaggle", n_train=120, n_test=20)
    home = root / "home"
    saved = os.environ.get("DIGITS_HOME")
    os.environ["DIGITS_HOME"] = str(home)
    try:
        config = apply_overrides(default_config("train-kaggle"), [
            f"ingest.data={root / 'kaggle'}", "validate.min_rows=10", "train.epochs=1", "train.model=baseline",
            "evaluate.threshold=0"])
        folder = stages.start_run(config)
        for artifact in ("examples", "validation", "converted", "model", "evaluation", "registration", "exported"):
            make(folder, config, artifact)
        runner.finish_run(folder)
    finally:
        if saved is None:
            os.environ.pop("DIGITS_HOME")
        else:
            os.environ["DIGITS_HOME"] = saved
    return home


@pytest.fixture
def run(pristine, home) -> Path:
    """A copy of the pristine home as this test's $DIGITS_HOME (the registry's paths moved with it);
    returns its run folder."""
    shutil.copytree(pristine, home, symlinks=True, dirs_exist_ok=True)  # over the `home` fixture's empty store
    _relocate(home, str(pristine), str(home))
    (found,) = (home / "runs").iterdir()
    return found


def _relocate(home: Path, old: str, new: str) -> None:
    """Point the copied MLflow database and registry ledger at the copy's own files."""
    import sqlite3

    with sqlite3.connect(home / "mlflow.db") as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in db.execute(f"PRAGMA table_info('{table}')").fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT")):
                    db.execute(f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?)', (old, new))
    ledger = home / "registry-ledger.json"
    ledger.write_text(ledger.read_text().replace(old, new))


def _digit_png(path: Path) -> Path:
    _, images = datagen.digits(1, seed=3)
    Image.fromarray(images[0]).resize((56, 56)).save(path)
    return path


# --- hostile model files ------------------------------------------------------------------------------

class _Plant:
    """Pickled, it runs `touch SENTINEL` when unpickled."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_a_joblib_file_given_to_predict_is_not_unpickled(cli, home, tmp_path):
    import joblib

    sentinel = tmp_path / "pwned"
    joblib.dump(_Plant(sentinel), tmp_path / "evil.joblib")
    result = cli("predict", tmp_path / "evil.joblib", _digit_png(tmp_path / "one.png"))
    _one_line(result, 2, "evil.joblib: a .joblib model is a pickle and loading it runs code")
    assert not sentinel.exists()


def test_a_file_dropped_beside_the_champion_is_never_loaded_and_a_swapped_one_is_refused(cli, run, tmp_path):
    import joblib

    sentinel = tmp_path / "pwned"
    model_dirs = list((run.parent.parent / "mlartifacts").rglob("model"))  # the copy's own (relocated)
    champion_dir = next(d for d in model_dirs if (d / "model.keras").is_file())
    joblib.dump(_Plant(sentinel), champion_dir / "a-model.joblib")  # sorts before model.keras
    image = _digit_png(tmp_path / "one.png")
    result = cli("predict", "models:/digits-kaggle@champion", image)
    assert result.code == 0, result.err
    assert not sentinel.exists()  # the registered model.keras was loaded, nothing else

    (champion_dir / "model.keras").write_bytes((run / "train/model.keras").read_bytes()[:-10] + b"0123456789")
    result = cli("predict", "models:/digits-kaggle@champion", image)
    _one_line(result, 2, "model.keras", "is not the one registered (its sha256 differs)")


def test_a_lambda_layer_in_a_keras_file_does_not_run(cli, home, tmp_path):
    import keras

    sentinel = tmp_path / "pwned"
    inputs = keras.Input((28, 28, 1))
    hostile = keras.layers.Lambda(eval(f"lambda x: x + __import__('os').system('touch {sentinel}') * 0"))
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(hostile(inputs)))).save(tmp_path / "evil.keras")
    sentinel.unlink(missing_ok=True)  # building the model ran the lambda once, here in the test
    result = cli("predict", tmp_path / "evil.keras", _digit_png(tmp_path / "one.png"))
    _one_line(result, 2, "evil.keras: not a loadable Keras model", "safe_mode")
    assert not sentinel.exists()


def _writing_saved_model(path: Path, sentinel: Path) -> None:
    """A SavedModel with digits' signature whose serving function writes a file."""
    from components.tensorflow_runtime import import_tensorflow

    tf = import_tensorflow()

    class Hostile(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8, name="images")])
        def serve(self, images):
            tf.io.write_file(str(sentinel), "written by a model")
            probabilities = tf.one_hot(tf.zeros(tf.shape(images)[:1], tf.int32), 10)
            return {"label": tf.argmax(probabilities, axis=1), "probabilities": probabilities}

    module = Hostile()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def test_a_saved_model_runs_only_as_its_run_exported_it(cli, run, tmp_path):
    sentinel = tmp_path / "pwned"
    image = _digit_png(tmp_path / "one.png")
    _writing_saved_model(tmp_path / "elsewhere" / "saved_model", sentinel)
    result = cli("predict", tmp_path / "elsewhere" / "saved_model", image)
    _one_line(result, 2, "a SavedModel is a TensorFlow program")
    assert not sentinel.exists()

    assert cli("predict", run / "export/saved_model", image).code == 0  # the run's own export: verified, loads
    shutil.rmtree(run / "export/saved_model")
    _writing_saved_model(run / "export/saved_model", sentinel)  # swapped inside a real run
    result = cli("predict", run / "export/saved_model", image)
    _one_line(result, 2, "refusing to load")
    assert not sentinel.exists()


# --- damaged stage outputs ----------------------------------------------------------------------------

def _rewrite_shard(shard: Path, keep: int | None = None, truncate: bool = False) -> None:
    data = shard.read_bytes()
    if truncate:
        shard.write_bytes(data[: len(data) // 2])
        return
    from components import records  # a valid gzip TFRecord holding fewer of the same records
    from components.tensorflow_runtime import import_tensorflow

    tf = import_tensorflow()
    serialized = [r.numpy() for r in tf.data.TFRecordDataset([str(shard)], compression_type="GZIP")][:keep]
    with tf.io.TFRecordWriter(str(shard), options="GZIP") as writer:
        for record in serialized:
            writer.write(record)
    assert len(records.load([shard]).ids) == keep


@pytest.mark.parametrize("damage", ["fewer-records", "truncated"])
def test_a_damaged_val_shard_stops_evaluate_and_nothing_is_registered(cli, run, damage):
    from flows import stages

    (shard,) = (run / "convert").glob("val-*.tfrecord.gz")
    _rewrite_shard(shard, keep=3, truncate=damage == "truncated")
    before = [v.version for v in stages.registry().versions("digits-kaggle")]
    result = cli("evaluate", "--run", run.name, "--set", "evaluate.threshold=0.01")  # a new gate: evaluate again
    _one_line(result, 2, f"{shard}: damaged: it is not the file its stage wrote", f"digits resume {run.name}")
    assert [v.version for v in stages.registry().versions("digits-kaggle")] == before
    record = _record(run)
    assert record["status"] == "failed" and record["stages"]["convert"]["status"] == "stale"
    assert record["stages"]["evaluate"]["status"] == "completed"  # the earlier, good evaluation stays


def test_a_short_train_shard_is_not_trained_on(cli, run):
    (shard,) = (run / "convert").glob("train-*.tfrecord.gz")
    _rewrite_shard(shard, keep=10)
    _one_line(cli("train", "--run", run.name, "--set", "train.epochs=2"), 2, f"{shard}: damaged")
    assert _record(run)["stages"]["train"]["outputs"]["epochs"] == 1  # the model of the good data stays


@pytest.mark.parametrize("damage", ["footer", "truncated", "deleted"])
def test_a_damaged_parquet_file_is_one_line_and_resume_makes_it_again(cli, run, damage):
    parquet = run / "ingest/train.parquet"
    data = parquet.read_bytes()
    if damage == "footer":
        parquet.write_bytes(data[:-12] + b"\0" * 12)
    elif damage == "truncated":
        parquet.write_bytes(data[: len(data) // 3])
    else:
        parquet.unlink()
    words = "missing" if damage == "deleted" else "damaged"
    _one_line(cli("convert", "--run", run.name, "--set", "seed=7"), 2, f"{parquet}: {words}")
    assert _record(run)["stages"]["ingest"]["status"] == "stale"
    assert cli("resume", run.name).code == 0  # ingest made again from the source, the rest follows
    record = _record(run)
    assert record["status"] == "completed" and all(s["status"] == "completed" for s in record["stages"].values())


def test_a_garbage_model_file_stops_evaluate_and_export(cli, run):
    model = run / "calibrate/model.keras"  # the model evaluate and export read: train's, calibrated
    model.write_bytes(b"not a zip at all")
    for command, setting in (("evaluate", "evaluate.threshold=0.01"), ("export", "seed=3")):  # settings: run again
        _one_line(cli(command, "--run", run.name, "--set", setting), 2, f"{model}: damaged")
    assert _record(run)["stages"]["calibrate"]["status"] == "stale"


# --- errors that are one line -------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"{", b"{}", b"\x00\xff garbage"])
def test_a_damaged_run_json_is_listed_as_damaged_and_skipped(cli, run, home, tmp_path, content):
    datagen.write_kaggle(tmp_path / "k", n_train=20, n_test=5)
    assert cli("ingest", "--source", "kaggle", "--data", tmp_path / "k").code == 0
    newer = max(p for p in (home / "runs").iterdir() if p != run)
    (newer / "run.json").write_bytes(content)
    listed = cli("reports")
    assert listed.code == 0 and run.name in listed.out
    assert any(newer.name in line and "damaged" in line for line in listed.out.splitlines())
    _one_line(cli("reports", newer.name), 2, f"{newer / 'run.json'}: damaged run record")
    _one_line(cli("resume", newer.name), 2, "damaged run record")
    export = cli("export")  # no --run: the newest readable run, the damaged one skipped
    assert export.code == 0 and run.name in export.out, export.err


def test_a_malformed_keras_config_is_one_line(cli, home, run, tmp_path):
    import zipfile

    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(run / "train/model.keras") as source, zipfile.ZipFile(bad, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["layers"][1]["config"] = {"units": "many"}
                data = json.dumps(config).encode()
            target.writestr(item, data)
    _one_line(cli("predict", bad, _digit_png(tmp_path / "one.png")), 2, "bad.keras: not a loadable Keras model")


def test_a_decompression_bomb_png_is_one_line(cli, home, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (12_000, 12_000)).save(bomb)  # 144 megapixels, 140 KB of PNG
    _one_line(cli("predict", "models:/digits-kaggle@champion", bomb), 2, "image too large (12000 x 12000 pixels")


def _digits(home: Path, *args: str) -> CliResult:
    """The installed console script in its own process: MLflow keeps a database's engine for the life of a
    process, and a user's every command is a new one."""
    done = subprocess.run([str(Path(sys.executable).with_name("digits")), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DIGITS_HOME": str(home)})
    return CliResult(done.returncode, done.stdout, done.stderr)


def test_registry_errors_are_one_line(cli, run, home):
    _one_line(cli("registry", "show", "nosuch"), 2, "no registered model 'nosuch'")
    (home / "mlflow.db").write_bytes(b"garbage " * 100)
    _one_line(_digits(home, "registry", "list"), 2, f"{home / 'mlflow.db'}: not a readable MLflow database")
    (home / "mlflow.db").unlink()  # deleted: MLflow silently starts an empty one
    listed = _digits(home, "registry", "list")
    assert listed.code == 0 and "a new or empty registry" in listed.out and "digits-kaggle" in listed.out
    refused = _digits(home, "evaluate", "--run", run.name, "--set", "evaluate.threshold=0.01")  # evaluate again
    _one_line(refused, 2, "has no digits-kaggle, but this home registered version 1 of it there")
    assert "a new or empty registry" in _digits(home, "registry", "list").out  # nothing registered there
    allowed = _digits(home, "evaluate", "--run", run.name, "--set", "evaluate.allow_new_registry=true")
    assert allowed.code == 0, allowed.err
    shown = _digits(home, "registry", "show", "digits-kaggle", "1").out  # its files stay in the home
    assert f"model card: {(home / 'mlartifacts').as_uri()}/" in shown, shown


# --- the home -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("run_id", ["../../x", "/elsewhere/run", "..", "20261202T000000-x/../../y"])
def test_run_ids_stay_inside_the_home(cli, run, tmp_path, run_id):
    outside = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, outside)
    before = sorted((p.relative_to(outside), p.stat().st_mtime_ns) for p in outside.rglob("*"))
    _one_line(cli("validate", "--run", run_id, "--set", "validate.min_rows=11"), 2, "is not a run id")
    assert sorted((p.relative_to(outside), p.stat().st_mtime_ns) for p in outside.rglob("*")) == before


def test_an_empty_digits_home_means_the_default(cli, tmp_path, monkeypatch):
    datagen.write_kaggle(tmp_path / "k", n_train=20, n_test=5)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIGITS_HOME", "")
    assert cli("ingest", "--source", "kaggle", "--data", tmp_path / "k").code == 0
    assert len(list((tmp_path / ".digits" / "runs").iterdir())) == 1


def test_a_setting_that_fails_its_stage_is_not_kept(cli, run):
    before = _record(run)
    # a new seed, so convert runs (the runner alone does not change its output, and it would be reused)
    _one_line(cli("convert", "--run", run.name, "--set", "seed=5", "--set", "convert.beam_args=--runner=DataflowRunner"),
              2, "convert.beam_args sets the runner", "convert.runner")
    _one_line(cli("convert", "--run", run.name, "--set", "seed=5", "--set", "convert.runner=NoSuchRunner"), 2,
              "NoSuchRunner")
    after = _record(run)
    assert after["config"] == before["config"]
    assert after["stages"]["convert"]["status"] == "completed"
    assert "a later attempt failed" in after["stages"]["convert"]["error"]
    assert cli("train", "--run", run.name).code == 0  # the good convert/ is still used
    _one_line(cli("convert", "--run", run.name, "--set", "pipeline=train-mnist"), 2, "the pipeline is not a setting")


def test_a_killed_run_is_shown_as_interrupted(cli, home, tmp_path):
    datagen.write_kaggle(tmp_path / "kaggle", n_train=3000, n_test=500)
    command = [str(Path(sys.executable).with_name("digits")), "ingest", "--source", "kaggle", "--data",
               str(tmp_path / "kaggle")]
    proc = subprocess.Popen(command, env={**os.environ, "DIGITS_HOME": str(home)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(home.glob("runs/*/.ingest.tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = cli("reports")
    assert "interrupted" in listed.out and "ingest:running" in listed.out


def test_a_run_whose_prefect_api_is_down_is_one_line_and_marked_failed(home, tmp_path):
    """The failure is outside every stage (the flow cannot start): the run must not stay `running`."""
    from flows.local_api import free_port

    datagen.write_kaggle(tmp_path / "kaggle", n_train=20, n_test=5)
    dead = f"http://127.0.0.1:{free_port()}/api"
    done = subprocess.run([str(Path(sys.executable).with_name("digits")), "run", "train-kaggle", "--data",
                           str(tmp_path / "kaggle"), *KAGGLE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DIGITS_HOME": str(home), "PREFECT_API_URL": dead,
                               "PREFECT_CLIENT_MAX_RETRIES": "0"})
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"digits: error: Prefect API {dead} unreachable") and "digits resume" in line
    (run,) = (home / "runs").iterdir()
    record = _record(run)
    assert record["status"] == "failed" and "failed outside its stages" in record["warnings"][0]


# --- a full disk --------------------------------------------------------------------------------------

def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_disk_that_fills_during_ingest_leaves_no_parquet(cli, tmp_path, monkeypatch):
    """Ingest streams each split's Parquet as it reads: a disk that fills midway is one line, the run failed, and no
    Parquet file (whole or partial) or temp folder is left for a later stage to pick up."""
    home = tmp_path / "small"
    if not _mount_tmpfs(home, "8m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        monkeypatch.setenv("DIGITS_HOME", str(home))
        datagen.write_kaggle(tmp_path / "kaggle", n_train=3000, n_test=500)  # ~780 kB of Parquet
        (home / "runs").mkdir()
        with (home / "filler").open("wb") as fh:
            fh.write(b"\0" * (shutil.disk_usage(home).free - 192 * 1024))  # leave 192 KiB: less than the Parquet
        result = cli("ingest", "--source", "kaggle", "--data", tmp_path / "kaggle")
        _one_line(result, 1, "no space left", "ingest")
        (run,) = (home / "runs").iterdir()
        assert _record(run)["status"] == "failed" and _record(run)["stages"]["ingest"]["status"] == "failed"
        assert not list(home.rglob("*.parquet")) and not list(run.glob(".ingest*")) and not (run / "ingest").exists()
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)


@pytest.mark.e2e
def test_a_full_disk_is_one_line_and_resume_completes_once_space_is_freed(cli, tmp_path, monkeypatch):
    home = tmp_path / "small"
    if not _mount_tmpfs(home, "64m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        monkeypatch.setenv("DIGITS_HOME", str(home))
        datagen.write_kaggle(tmp_path / "kaggle", n_train=3000, n_test=500)
        # the run's settings (kept in its config): one short epoch of the small model for the rest of the pipeline
        assert cli("ingest", "--source", "kaggle", "--data", tmp_path / "kaggle", *KAGGLE).code == 0
        assert cli("validate").code == 0
        free = shutil.disk_usage(home).free
        filler = home / "filler"
        with filler.open("wb") as fh:
            fh.write(b"\0" * (free - 256 * 1024))  # leave 256 KiB: less than the shards need
        (run,) = (home / "runs").iterdir()
        result = cli("convert")
        _one_line(result, 1, "no space left", "convert")
        record = _record(run)
        assert record["status"] == "failed" and record["stages"]["convert"]["status"] == "failed"
        assert not (run / "convert").exists() and not list(run.glob(".convert*"))
        filler.unlink()
        resumed = cli("resume", run.name, *[])
        assert resumed.code == 0, resumed.err
        assert _record(run)["status"] == "completed"
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)


@pytest.mark.e2e
def test_two_runs_started_at_once_on_a_new_prefect_home_both_complete(tmp_path):
    """Their local Prefect API servers take turns creating the new database (one crashed mid-migration)."""
    datagen.write_kaggle(tmp_path / "kaggle", n_train=60, n_test=10)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "new-prefect-home"), DIGITS_HOME=str(tmp_path / "home"))
    command = [str(Path(sys.executable).with_name("digits")), "run", "train-kaggle", "--data",
               str(tmp_path / "kaggle"), *KAGGLE]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [err for _, err in outputs] == ["", ""]
    runs = list((tmp_path / "home" / "runs").iterdir())
    assert len(runs) == 2 and all(_record(run)["status"] == "completed" for run in runs)


def test_a_run_record_is_still_written_on_a_disk_with_no_space_left(tmp_path, monkeypatch):
    """The failure handler's own write must not fail on a full disk: run.json is rewritten in place,
    compactly, into the blocks it already holds."""
    from schemas.config import default_config
    from schemas.runs import RunFolder

    home = tmp_path / "tiny"
    if not _mount_tmpfs(home, "1m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        folder = RunFolder.create("train-kaggle", default_config("train-kaggle").model_dump(mode="json"), home)
        with (home / "filler").open("wb", buffering=0) as fh:  # every block taken
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        with pytest.raises(OSError):
            (home / "probe").write_bytes(b"x" * 8192)
        folder.update(lambda record: setattr(record, "status", "failed"))
        assert folder.load().status == "failed"
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)
