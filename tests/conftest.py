"""Shared test fixtures: an isolated $DIGITS_HOME and Prefect home, and the CLI run in-process."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# Prefect reads its settings when first imported: isolate it before any test imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="digits-test-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `make test` runs two xdist workers on CI's two cores: one TensorFlow thread per pool in each of them (and in the
# processes they start: `digits` commands, Dask workers, servers) rather than a pool per core in each, whose threads
# spin waiting on one another (the suite ran 12 % faster here, 1,687 against 1,916 worker-seconds)
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
from flows import setup as _setup  # noqa: E402  (imports no Prefect)

_setup.environment()  # what the CLI sets first: the local API's start-up limit for tests that run flows directly


# absl (imported with TensorFlow) keeps the sys.stderr of its import time in its handler, and closes it
# when logging is reconfigured (Prefect's dictConfig closes every handler ever made) unless it is the
# sys.stderr of that moment. Under pytest those are different capture streams: one test importing
# TensorFlow and a later one starting Prefect under capsys would close pytest's own capture file.
from absl import logging as _absl_logging  # noqa: E402

_absl_logging.get_absl_handler().python_handler.stream = _setup.CurrentStream("stderr")

@pytest.fixture(scope="session")
def prepared_tfds(tmp_path_factory) -> tuple[Path, dict]:
    """TFDS mnist prepared from the shared idx files once for the whole session (about 15 s; the xdist workers
    share it: the first prepares it under a lock, the others read it), and its splits as read. Tests read it."""
    import datagen
    from components.ingest import mnist as reader
    from components.ingest.splits import ReadOptions, collect
    from schemas.runs import locked

    mnist = datagen.shared_data("mnist")
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each xdist worker's own
    tfds_dir = shared / "tfds-mnist"
    with locked(tfds_dir):  # held while the first worker prepares
        parts, _ = reader.read(mnist, ReadOptions(tfds_dir=tfds_dir))
        splits = {split: collect(part) for split, part in parts.items()}  # read here, in TFDS's pieces
    return tfds_dir, splits


@pytest.fixture(scope="module")
def kaggle_data(request, tmp_path_factory) -> Path:
    """A Kaggle-layout folder (train.csv + test.csv of datagen digits) for a module's tests to read: the sizes its
    KAGGLE_ROWS = (train rows, test rows) names (400, 50 without one). Tests read it, never write into it."""
    import datagen

    n_train, n_test = getattr(request.module, "KAGGLE_ROWS", (400, 50))
    folder = tmp_path_factory.mktemp(f"kaggle-{n_train}-{n_test}")
    datagen.write_kaggle(folder, n_train=n_train, n_test=n_test)
    return folder


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made, once for the session (the xdist workers share it, made under a
    lock by the first): MLflow makes a new store by running its ~60 alembic migrations, ~2 s each time, and the
    tests' homes number in the hundreds. Each `home` starts with a copy. Creating a store stays tested where a
    home is made without this fixture (tests/test_infra.py, the fault tests' own homes, two runs at once on a
    new home)."""
    from components.tracking import mlflow_client, sqlite_uri
    from schemas.runs import locked

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each xdist worker's own
    store = shared / "empty-mlflow" / "mlflow.db"
    with locked(store):
        if not store.is_file():
            made = store.with_name("making.db")
            made.unlink(missing_ok=True)
            mlflow_client(sqlite_uri(made))
            made.rename(store)
    return store


@pytest.fixture
def home(tmp_path, monkeypatch, empty_mlflow_store) -> Path:
    """A fresh $DIGITS_HOME for one test, its MLflow store empty."""
    import shutil

    path = tmp_path / "home"
    path.mkdir()
    shutil.copyfile(empty_mlflow_store, path / "mlflow.db")
    monkeypatch.setenv("DIGITS_HOME", str(path))
    return path


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(home, capsys, monkeypatch):
    """Run the `digits` console-script entry point in-process: cli("ingest", "--source", ...)."""
    from flows.cli import main

    def invoke(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["digits", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


# `make test` runs two pytest-xdist workers (`--dist load`: tests handed out in collection order). The team-mode
# test (minutes, mostly waiting on its servers and flow runs) goes first, so the other worker's tests fill its
# waits. (`--dist loadfile` would not do: it hands out files with the most tests first, so the team test ran last.)
FIRST = ("test_team.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: the rest keep their order


def pytest_report_header(config):
    """The machine under the numbers: benchmarks (and CI logs) say which CPU they ran on, since times and a
    seed's last digits differ between machines (README)."""
    from components.train import processor_name

    return f"processor: {processor_name() or 'unknown'}, {os.cpu_count()} CPUs"
