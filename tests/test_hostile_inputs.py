"""Defects a hostile but fair probe found in the folder source and `digits predict` (issue 37): phone photos
read sideways, 16-bit scans refused as blank, FIFOs that hang, models that are not digit classifiers, file
names that are not UTF-8, deep trees, and one bad file that stopped a whole batch or folder."""

from __future__ import annotations

import json
import os
import re
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datagen
from components.files import walk_files
from components.predict import prepare, read
from strokes import draw_digit
from test_ingest_folder import write_folder


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block takes longer than seconds: a FIFO read blocks forever."""
    def expired(*_):
        raise AssertionError(f"still running after {seconds} s: blocked on a read?")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def folder_data(tmp_path) -> Path:
    labels, images = datagen.digits(40, seed=5)
    return write_folder(tmp_path / "digits", labels, images)


@pytest.fixture
def untrained(tmp_path) -> Path:
    """A digits model with random weights: a real classifier (10 probabilities) whose labels mean nothing."""
    import keras

    from components.train import models
    from schemas.config import TrainConfig

    path = tmp_path / "untrained.keras"
    models.build(TrainConfig(model="baseline", augment=False), keras).save(path)
    return path


def _one_line(result) -> str:
    (line,) = result.err.strip().splitlines()
    assert "Traceback" not in result.err
    return line


def test_a_phone_photo_stored_sideways_is_read_upright(tmp_path):
    """EXIF Orientation=6 (the camera was turned; the viewer rotates 90 degrees clockwise): read as shown."""
    upright = Image.open(draw_digit(7, tmp_path / "seven.png", size=120, offset=(20, 10))).convert("RGB")
    upright.save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    expected = prepare(read(tmp_path / "upright.jpg")).astype(int)
    assert np.abs(prepare(read(tmp_path / "sideways.jpg")).astype(int) - expected).mean() < 3
    ignoring_exif = prepare(np.asarray(Image.open(tmp_path / "sideways.jpg").convert("L"), np.float32) / 255)
    assert np.abs(ignoring_exif.astype(int) - expected).mean() > 20  # the tag is what makes the difference


@pytest.mark.parametrize("top", [65535, 4000])
def test_a_16_bit_scan_is_scaled_by_its_own_range(tmp_path, top):
    eight = np.asarray(Image.open(draw_digit(3, tmp_path / "three.png")).convert("L"), np.float64)
    wide = (eight / 255 * top).round().astype(np.uint16)  # dark ink on light paper, 16 bits deep
    Image.fromarray(wide).save(tmp_path / "three-16.png")
    assert Image.open(tmp_path / "three-16.png").mode.startswith("I;16")
    assert np.abs(prepare(read(tmp_path / "three-16.png")).astype(int) - prepare(eight / 255).astype(int)).max() <= 2


def test_a_fifo_named_like_an_image_is_one_line_not_a_hang(cli, home, tmp_path, folder_data, untrained):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    with deadline(60):
        result = cli("predict", untrained, pipe)
    assert result.code == 2 and _one_line(result) == f"digits: error: {pipe}: a FIFO (named pipe), not a regular " \
                                                      "file (only regular files are read)"
    os.mkfifo(folder_data / "train/3/pipe.png")
    with deadline(60):
        result = cli("ingest", "--source", "folder", "--data", folder_data)
    assert result.code == 2 and "pipe.png: a FIFO (named pipe)" in _one_line(result)
    assert not (home / "runs").exists()  # found from the listing, before a run folder is made


def test_a_model_that_is_not_a_digit_classifier_is_one_line(cli, tmp_path):
    import keras

    digit = draw_digit(4, tmp_path / "four.png")

    def saved(name, inputs, outputs):
        keras.Model(inputs, outputs).save(tmp_path / name)
        return tmp_path / name

    image = keras.Input((28, 28, 1))
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(image))
    wide = keras.Input((32, 32, 1))
    cases = {
        saved("wide.keras", wide, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(wide))):
            "does not take canonical digit images",
        saved("five.keras", image, keras.layers.Dense(5, activation="softmax")(flat)):
            "does not end in 10 class probabilities (one output of shape (10,)); it gives (5,)",
        saved("logits.keras", image, keras.layers.Dense(10, kernel_initializer="ones")(flat)):
            "its outputs range",
    }
    for model, words in cases.items():
        result = cli("predict", model, digit, "--min-confidence", "0.99")
        assert result.code == 2 and words in _one_line(result), result.err
        assert result.out == ""


def test_predict_reads_folders_and_keeps_going_past_a_bad_image(cli, tmp_path, untrained):
    images = tmp_path / "images"
    images.mkdir()
    for digit in (1, 7):
        draw_digit(digit, images / f"digit-{digit}.png")
    Image.new("L", (50, 50), 255).save(images / "blank.png")
    (images / "notes.txt").write_text("not an image, and not an image name: left out")
    result = cli("predict", untrained, images)
    assert result.code == 1
    assert _one_line(result) == f"digits: error: {images / 'blank.png'}: no digit found (the image is blank or has " \
                                "no contrast)"
    header, *lines = result.out.strip().splitlines()  # piped: a header line, then a line per image
    assert header.split("\t")[:2] == ["image", "label"]
    assert [Path(line.split("\t")[0]).name for line in lines] == ["digit-1.png", "digit-7.png"]
    result = cli("predict", untrained, images / "blank.png")  # nothing could be predicted: bad input
    assert result.code == 2 and result.out == ""


def test_non_image_files_in_class_folders_are_skipped_and_counted(cli, home, folder_data):
    (folder_data / "train/2/Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 a Windows thumbnail cache")
    (folder_data / "train/notes.txt").write_text("where these came from")
    result = cli("ingest", "--source", "folder", "--data", folder_data)
    assert result.code == 0, result.err
    assert "train 40 (2 non-image files skipped)" in result.out
    (run,) = (home / "runs").iterdir()
    assert json.loads((run / "run.json").read_text())["stages"]["ingest"]["outputs"]["skipped"] == {"train": 2}


def test_a_file_name_that_is_not_utf8_is_one_line(cli, home, folder_data):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1, as an old camera or zip tool may write it
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(folder_data / "train/1" / name)
    result = cli("ingest", "--source", "folder", "--data", folder_data)
    assert result.code == 2
    assert _one_line(result) == f"digits: error: {folder_data / 'train/1'}: a file name that is not valid UTF-8: " \
                                "b'caf\\xe9.png'; rename it (or move it out)"
    assert not (home / "runs").exists()


def test_a_tree_1500_folders_deep_is_walked_without_recursion(cli, home, tmp_path):
    deep = tmp_path / "deep"
    leaf = deep
    deep.mkdir()
    for _ in range(1500):  # one level at a time: pathlib's and os' makedirs recurse themselves
        leaf = leaf / "d"
        leaf.mkdir()
    (leaf / "x.bin").write_bytes(b"x")
    (deep / "top.bin").write_bytes(b"t")
    os.symlink(deep, leaf / "loop")  # a symlink loop is walked once
    try:
        assert [p.name for p in walk_files(deep)] == ["x.bin", "top.bin"]
        # beside a source's files, a deep tree is neither read nor fingerprinted
        data = tmp_path / "kaggle"
        datagen.write_kaggle(data, n_train=30, n_test=10)
        (data / "extra").symlink_to(deep)
        result = cli("ingest", "--source", "kaggle", "--data", data)
        assert result.code == 0, result.err
    finally:  # bottom up, one level at a time: shutil.rmtree (pytest's clean-up) recurses as deep as the tree
        (leaf / "x.bin").unlink()
        (leaf / "loop").unlink()
        while leaf != deep:
            leaf.rmdir()
            leaf = leaf.parent


def test_a_source_that_fails_while_its_stage_is_keyed_leaves_the_run_failed(home, tmp_path):
    """A config that skipped the CLI's check (a deployment's parameters): the failure is the stage's."""
    from flows import runner, stages
    from schemas.config import apply_overrides, default_config
    from schemas.errors import DigitsInputError
    from schemas.stages import GRAPH

    config = apply_overrides(default_config("train-kaggle"), [f"ingest.data={tmp_path}"])
    folder = stages.start_run(config)
    with pytest.raises(DigitsInputError, match="train.csv: missing"):
        runner.run_stage(folder, GRAPH.stage("ingest"), config, {})
    record = folder.load()
    assert record.status == "failed" and "train.csv: missing" in record.stages["ingest"].error


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections to it are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("home_name", ["p%20q", "a?b", "c#d"])
def test_a_home_whose_path_is_uri_syntax_is_one_line_and_nothing_is_written_outside_it(cli, tmp_path, monkeypatch,
                                                                                     home_name):
    home = tmp_path / "homes" / home_name
    monkeypatch.setenv("DIGITS_HOME", str(home))
    data = tmp_path / "kaggle"
    datagen.write_kaggle(data, n_train=30, n_test=10)
    for command in (["registry", "list"], ["run", "train-kaggle", "--data", data], ["ingest", "--source", "kaggle",
                                                                                    "--data", data]):
        result = cli(*command)
        assert result.code == 2, result.err
        assert _one_line(result).startswith(f"digits: error: {home}: a folder whose path holds ")
    assert not (tmp_path / "homes").exists()  # neither the home nor another folder (`p q/`, `a`) was made


@pytest.mark.parametrize("where", ["under-a-file", "dev-null"])
def test_a_home_that_cannot_be_a_folder_is_one_line(cli, tmp_path, monkeypatch, where):
    (tmp_path / "file").write_text("a file, not a folder")
    home = tmp_path / "file" / "home" if where == "under-a-file" else Path("/dev/null")
    monkeypatch.setenv("DIGITS_HOME", str(home))
    data = tmp_path / "kaggle"
    datagen.write_kaggle(data, n_train=30, n_test=10)
    for command in (["registry", "list"], ["reports"], ["ingest", "--source", "kaggle", "--data", data]):
        result = cli(*command)
        assert result.code == 2 and _one_line(result).startswith(f"digits: error: DIGITS_HOME {home} cannot be a "
                                                                 "folder: "), result.err


def test_a_dead_tracking_server_or_dask_scheduler_is_one_line_within_seconds(cli, home, tmp_path, monkeypatch):
    import time

    from runs import converted_kaggle_run
    from schemas.config import apply_overrides

    data = tmp_path / "kaggle"
    datagen.write_kaggle(data, n_train=60, n_test=10)
    folder, config = converted_kaggle_run(data, "train.epochs=1")
    record = folder.load()
    dead = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    expected = f"digits: error: MLflow tracking server {dead} unreachable (connection refused): start it, or unset " \
               "MLFLOW_TRACKING_URI to track in SQLite under $DIGITS_HOME"
    for command in (["registry", "list"], ["train", "--run", folder.run_id], ["run", "train-kaggle", "--data", data]):
        started = time.monotonic()
        result = cli(*command)
        assert result.code == 1 and _one_line(result) == expected
        assert time.monotonic() - started < 15  # MLflow's own retries took about four minutes
    assert folder.load() == record  # checked before any stage started: the run is as it was
    assert len(list((home / "runs").iterdir())) == 1  # and `digits run` made no run folder

    # a server that went away after the run started (a deployment's parameters skip the CLI's check): the stage
    # that needs it fails in seconds with the same line, and the run ends failed
    record = _train_fails_within_seconds(folder, config, f"MLflow tracking server {dead} unreachable")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    scheduler = f"tcp://127.0.0.1:{_closed_port()}"
    expected = f"digits: error: Dask scheduler {scheduler} unreachable (connection refused): start it"
    for command in (["train", "--run", folder.run_id, "--set", "train.members=2", "--set", "train.epochs=1",
                     "--set", f"dask.address={scheduler}"],
                    ["run", "train-kaggle", "--data", data, "--set", "train.members=2",
                     "--set", f"dask.address={scheduler}"]):
        started = time.monotonic()
        result = cli(*command)
        assert result.code == 1 and _one_line(result).startswith(expected), result.err
        assert time.monotonic() - started < 15  # Dask's client waited about 5 1/2 minutes, then tracebacks
    assert folder.load() == record
    assert len(list((home / "runs").iterdir())) == 1

    _train_fails_within_seconds(folder, apply_overrides(config, ["train.members=2", f"dask.address={scheduler}"]),
                                f"Dask scheduler {scheduler} unreachable")


def _train_fails_within_seconds(folder, config, words: str):
    """The train stage of folder's run fails with ServiceUnavailable saying `words` within 15 s, and the run ends
    failed with that reason; returns its record."""
    import time

    from runs import make
    from schemas.errors import ServiceUnavailable

    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=re.escape(words)):
        make(folder, config, "model")
    assert time.monotonic() - started < 15
    record = folder.load()
    assert record.status == "failed" and words in record.stages["train"].error
    return record


@pytest.mark.parametrize("space, words", [
    ("width=float -3 -1", "-3.0 is not a value of train.width (input should be greater than 0)"),
    ("batch_size=choice 0", "'0' is not a value of train.batch_size (input should be greater than 0)"),
    ("model=choice nosuchnet", "'nosuchnet' is not a value of train.model (input should be 'digits-net'"),
    ("augment=choice maybe", "'maybe' is not a value of train.augment (input should be a valid boolean"),
    ("batch_size=float 1.5 2.5", "train.batch_size takes 'int LOW HIGH' or 'choice A B ...'"),
    ("learning_rate=log -inf 1", "LOW and HIGH must be finite numbers"),
])
def test_a_tune_space_outside_a_settings_domain_is_one_line_before_any_trial(cli, home, tmp_path, space, words):
    data = tmp_path / "kaggle"
    datagen.write_kaggle(data, n_train=30, n_test=10)
    result = cli("run", "train-kaggle", "--data", data, "--set", "tune.trials=2", "--set", f"tune.space={space}")
    assert result.code == 2 and words in _one_line(result) and "tune.space" in result.err
    assert not (home / "runs").exists()


def test_a_tune_storage_that_is_malformed_or_unreachable_is_one_line(cli, home, tmp_path):
    data = tmp_path / "kaggle"
    datagen.write_kaggle(data, n_train=30, n_test=10)
    result = cli("run", "train-kaggle", "--data", data, "--set", "tune.trials=2", "--set", "tune.storage=notaurl")
    assert result.code == 2 and "invalid value for 'tune.storage': expected a SQLAlchemy database URL" in \
        _one_line(result)
    port = _closed_port()
    result = cli("run", "train-kaggle", "--data", data, "--set", "tune.trials=2",
                 "--set", f"tune.storage=postgresql+psycopg://digits:secret@127.0.0.1:{port}/optuna")
    assert result.code == 1 and _one_line(result) == (
        f"digits: error: tune.storage postgresql+psycopg://digits:***@127.0.0.1:{port}/optuna unreachable (connection "
        "refused): start its database server, or leave tune.storage unset for SQLite under $DIGITS_HOME/tune")
    assert not (home / "runs").exists()


def test_the_tune_stage_says_it_is_off_without_trials(cli, home, tmp_path):
    from runs import converted_kaggle_run

    data = tmp_path / "kaggle"
    datagen.write_kaggle(data, n_train=60, n_test=10)
    folder, _ = converted_kaggle_run(data)
    result = cli("tune", "--run", folder.run_id)
    assert result.code == 0 and "tune is off for this run (tune.trials=0)" in result.out
    assert "tune" not in folder.load().stages


@pytest.mark.parametrize("args, words", [
    (["registry", "promote", "digits-mnist", "abc"], "'abc' is not a version number"),
    (["registry", "show", "digits-mnist", "0"], "'0' is not a version number"),
    (["registry", "promote", "../x", "1"], "'../x' is not a model name"),
    (["registry", "show", "cham pion"], "'cham pion' is not a model name"),
    (["registry", "show", "%00"], "'%00' is not a model name"),
    (["registry", "rollback", "champion@x"], "'champion@x' is not a model name"),
    (["registry", "show", "x'; DROP"], "is not a model name"),
    (["predict", "models:/digits-mnist@cham pion", "missing.png"], "'cham pion' is not an alias"),
    (["predict", "models:/digits-mnist@champion@x", "missing.png"], "'champion@x' is not an alias"),
    (["predict", "models:/digits-mnist@latest", "missing.png"], "'latest' is not an alias"),
])
def test_registry_names_versions_and_aliases_with_odd_characters_are_one_line(cli, home, args, words):
    result = cli(*args)
    assert result.code == 2 and words in _one_line(result), result.err
    assert not list(home.glob("*/**/.registry-*")) and not list(home.parent.glob(".registry-*"))


def test_a_registered_model_without_versions_is_shown_as_such(cli, home):
    from components.tracking import mlflow_client, tracking_uri

    mlflow_client(tracking_uri(home)).create_registered_model("digits-folder")  # its versions deleted, say
    listed = cli("registry", "list")
    assert listed.code == 0 and listed.out.splitlines() == ["model\tchampion\tversions", "digits-folder\t-\t0"]
    shown = cli("registry", "show", "digits-folder")
    assert shown.code == 0 and "digits-folder is registered but has no versions" in shown.out


def test_a_csv_with_bare_cr_lines_or_semicolons_is_diagnosed_as_such(cli, home, tmp_path):
    for name, change in (("cr", lambda text: text.replace("\n", "\r")), ("semicolon", lambda t: t.replace(",", ";"))):
        data = tmp_path / name
        datagen.write_kaggle(data, n_train=30, n_test=10)
        for file in ("train.csv", "test.csv"):
            (data / file).write_bytes(change((data / file).read_text()).encode())
        result = cli("ingest", "--source", "kaggle", "--data", data)
        line = _one_line(result)
        assert result.code == 2 and len(line) < 300, line  # the semicolon header was quoted whole: 7,139 characters
        assert line == (f"digits: error: {data / 'train.csv'}, line 1, column 1: lines end in a bare CR (classic Mac "
                        "OS line endings) where LF or CRLF was expected; save the file with LF or CRLF line endings"
                        if name == "cr" else
                        f"digits: error: {data / 'train.csv'}, line 1, column 1: columns separated by ';', where a "
                        "Kaggle CSV separates them by ',' (header: label;pixel0;pixel1;pixel2;pixel3;pix...); save "
                        "it as comma-separated")


def test_a_read_only_home_is_one_line(tmp_path):
    """A read-only bind mount in a mount namespace of its own (root bypasses file modes); skipped where the
    machine allows none."""
    import subprocess
    import sys

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here (unshare -m)")
    digits = Path(sys.executable).with_name("digits")
    data = tmp_path / "kaggle"
    datagen.write_kaggle(data, n_train=30, n_test=10)
    for command in (f"{digits} registry list", f"{digits} ingest --source kaggle --data {data}"):
        script = f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && DIGITS_HOME={ro}/home {command}"
        result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line == f"digits: error: {ro}/home: read-only file system: digits writes its runs and registry under " \
                       "DIGITS_HOME, which must be a folder it can write"


def test_the_layout_is_checked_before_any_byte_is_hashed_and_only_what_is_read_is_hashed(cli, tmp_path):
    """A 2.9 GB folder was hashed whole (20 s) before 'missing train.csv'; files ingest does not read change
    nothing."""
    from components.ingest import source_fingerprint
    from schemas.config import IngestConfig
    from schemas.sources import Source

    data = tmp_path / "kaggle"
    datagen.write_kaggle(data, n_train=30, n_test=10)
    before = source_fingerprint(Source.kaggle, IngestConfig(data=str(data)))
    with (data / "photos.tar").open("wb") as fh:  # 8 GB, sparse: reading it would take minutes
        fh.truncate(8 << 30)
    assert source_fingerprint(Source.kaggle, IngestConfig(data=str(data))) == before
    (data / "train.csv").unlink()
    result = cli("run", "train-kaggle", "--data", data)
    assert result.code == 2 and _one_line(result) == f"digits: error: {data / 'train.csv'}: missing: a Kaggle folder " \
                                                     "holds train.csv and test.csv"
