"""The Prefect flow `digits` and the console script, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import datagen


def _runs(home: Path) -> list[Path]:
    return sorted((home / "runs").iterdir())


def test_run_chains_the_stages_through_prefect(cli, home, tmp_path):
    datagen.write_kaggle(tmp_path / "kaggle", n_train=40, n_test=10)
    result = cli("run", "train-kaggle", "--data", tmp_path / "kaggle", "--set", "ingest.limit=30",
                 "--set", "validate.min_rows=10", "--set", "train.epochs=1")
    assert result.code == 0, result.err
    (run,) = _runs(home)
    assert run.name in result.out and str(run) in result.out
    assert "Flow run" in result.out  # Prefect's progress lines
    assert "Starting temporary server" not in result.out  # the API `digits run` launched first, not Prefect's own
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["pipeline"] == "train-kaggle"
    assert record["config"]["ingest"]["limit"] == 30
    assert record["stages"]["ingest"]["status"] == "completed" and record["stages"]["ingest"]["seconds"] > 0
    assert record["package_versions"]["prefect"] == "3.8.8"
    assert pq.read_table(run / "ingest/train.parquet").num_rows == 30
    assert record["stages"]["validate"]["status"] == "completed"
    assert (run / "validate/index.html").is_file() and (run / "validate/results.json").is_file()
    assert record["stages"]["convert"]["status"] == "completed"
    assert record["stages"]["convert"]["outputs"]["counts"] == {"train": 20, "val": 10, "test": 10}
    assert json.loads((run / "convert/manifest.json").read_text())["counts"]["val"] == 10
    assert record["stages"]["train"]["status"] == "completed" and (run / "train/model.keras").is_file()
    assert "epoch 1/1" in result.out
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["validation-results", "validation-report"])))
    # the Prefect home is shared by the session's flow runs: find this run's among them
    reports = [str(a.data) for a in found if a.key == "validation-report"]
    assert any((run / "validate/report.html").as_uri() in data for data in reports)
    assert any("border_mean" in str(a.data) for a in found if a.key == "validation-results")
    assert not list(run.glob(".*tmp-*"))


def test_run_with_bad_data_fails_in_one_line_and_marks_the_run(cli, home, tmp_path):
    datagen.write_kaggle(tmp_path / "kaggle", n_train=10, n_test=5)
    train = tmp_path / "kaggle/train.csv"
    lines = train.read_text().splitlines()
    lines[3] = lines[3] + ",7"
    train.write_text("\n".join(lines) + "\n")
    result = cli("run", "train-kaggle", "--data", tmp_path / "kaggle")
    assert result.code == 2
    (message,) = result.err.strip().splitlines()
    assert "train.csv, line 4, column 786: too many fields" in message
    (run,) = _runs(home)
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "ingest").exists()


@pytest.mark.parametrize("args, words", [
    (["ingest", "--source", "kaggle", "--data", ".", "--set", "ingest.bogus=1"], "unknown config key 'ingest.bogus'"),
    (["ingest", "--source", "kaggle", "--data", ".", "--set", "ingest.limit=many"], "invalid value for 'ingest.limit'"),
    (["ingest", "--source", "kaggle", "--data", ".", "--set", "limit"], "--set expects key=value"),
    (["ingest", "--source", "noisy"], "needs --data"),
    (["reports", "no-such-run"], "'no-such-run' is not a run id"),
    (["reports", "20261202T000000-train-kaggle-abcdef"], "no run '20261202T000000-train-kaggle-abcdef'"),
    # click's own usage errors too (typer draws them in a box over several lines by default)
    (["run"], "Missing argument 'pipeline'. Choose from: train-kaggle, train-mnist, train-noisy, train-folder (see `digits "
                "run --help`)"),
    (["run", "train-everything"], "'train-everything' is not one of 'train-kaggle', 'train-mnist', 'train-noisy', 'train-folder'"),
    (["run", "train-mnist", "--epochs", "3"], "No such option: --epochs"),
    (["frobnicate"], "No such command 'frobnicate'. (see `digits --help`)"),
])
def test_usage_errors_are_one_line_with_exit_2(cli, home, args, words):
    result = cli(*args)
    assert result.code == 2
    (message,) = result.err.strip().splitlines()
    assert words in message


def test_reports_lists_runs_and_points_at_their_files(cli, home, tmp_path):
    datagen.write_kaggle(tmp_path / "k", n_train=20, n_test=5)
    assert cli("ingest", "--source", "kaggle", "--data", tmp_path / "k").code == 0
    (run,) = _runs(home)
    listing = cli("reports")
    assert listing.code == 0 and run.name in listing.out and "ingest:completed" in listing.out
    detail = cli("reports", run.name)
    assert str(run / "ingest" / "eda" / "index.html") in detail.out and str(run / "run.json") in detail.out


_LOCAL_API = """
import os, sys, time
from flows.local_api import LocalAPI
api = LocalAPI.launch()
print(api.process.pid, flush=True)
api.connect()
print(os.environ.get("PREFECT_API_URL"), api.process and api.process.pid, flush=True)
if sys.argv[1] == "hang":
    time.sleep(600)
"""


def _local_api(mode: str, tmp_path: Path, **env: str) -> subprocess.Popen:
    """A process that launches and connects digits' local Prefect API the way `digits run` does."""
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
           "PREFECT_HOME": str(tmp_path / "prefect-home"), **env}
    return subprocess.Popen([sys.executable, "-c", _LOCAL_API, mode], stdout=subprocess.PIPE, text=True, env=env)


def _gone(pid: int, within: float = 20) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # exited but not reaped by its (dead) parent yet: a zombie is gone too
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_the_local_prefect_api_serves_the_process_and_stops_with_it(tmp_path):
    """`digits run`'s API server answers, is stopped when the command ends, and dies with a killed command."""
    ended = _local_api("exit", tmp_path)
    server = int(ended.stdout.readline())
    url, _ = ended.stdout.readline().split()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    assert ended.wait(timeout=60) == 0
    assert _gone(server, within=1)  # stopped at exit, not left behind

    killed = _local_api("hang", tmp_path)
    server = int(killed.stdout.readline())
    try:
        killed.stdout.readline()  # connected: the server answered
        killed.kill()  # SIGKILL: no atexit runs
        killed.wait()
        assert _gone(server), "the API server outlived the killed digits process"
    finally:
        if not _gone(server, within=0):
            os.kill(server, signal.SIGKILL)


def test_a_prefect_server_named_by_the_users_profile_is_used_instead(tmp_path):
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n')
    proc = _local_api("exit", tmp_path, PREFECT_PROFILES_PATH=str(profiles))
    server = int(proc.stdout.readline())
    assert proc.stdout.readline().split() == ["None", "None"]  # not pointed at ours, which was stopped
    assert proc.wait(timeout=60) == 0 and _gone(server, within=1)


def _console_script(*args: str, home: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("digits")
    env = {**os.environ, "DIGITS_HOME": str(home)}
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_flow_run_outside_the_cli_logs_bad_input_in_one_line_without_a_traceback(tmp_path):
    """What a Prefect worker's flow-run process does: import the flow from its entrypoint and call it, with
    none of the CLI's log set-up. Its log (the worker's output, the UI's flow-run log) holds the one line."""
    datagen.write_noisy(tmp_path / "noisy", "amat", n_train=10, n_test=5)
    path = tmp_path / "noisy/mnist_background_random_train.amat"
    rows = path.read_text().splitlines()
    rows[6] = rows[6].replace(rows[6].split(" ")[0], "x", 1)
    path.write_text("\n".join(rows) + "\n")
    script = ("from flows.pipeline import digits\n"
              "from schemas.config import apply_overrides, default_config\n"
              "from schemas.errors import DigitsInputError\n"
              f"config = apply_overrides(default_config('train-noisy'), ['ingest.data={tmp_path / 'noisy'}'])\n"
              "try:\n    digits(config)\nexcept DigitsInputError:\n    pass\n")
    env = {**os.environ, "DIGITS_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert f"{path}, line 7, column 1:" in log and "Traceback" not in log


@pytest.mark.skipif(not shutil.which("digits", path=str(Path(sys.executable).parent)),
                    reason="the digits console script is not installed in this environment")
@pytest.mark.parametrize("command", ["ingest", "run"])
def test_console_script_prints_one_line_and_no_traceback(tmp_path, command):
    """The installed `digits` script, through Prefect for `run`: stderr holds the one error line only."""
    datagen.write_noisy(tmp_path / "noisy", "amat", n_train=10, n_test=5)
    path = tmp_path / "noisy/mnist_background_random_train.amat"
    rows = path.read_text().splitlines()
    fields = rows[6].split(" ")
    fields[99] = "2.0"
    rows[6] = " ".join(fields)
    path.write_text("\n".join(rows) + "\n")
    args = ["ingest", "--source", "noisy"] if command == "ingest" else ["run", "train-noisy"]
    proc = _console_script(*args, "--data", str(tmp_path / "noisy"), home=tmp_path / "home")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"digits: error: {path}, line 7, column 100: pixel 2 out of range; expected pixel in 0..1"]
    assert "Traceback" not in proc.stdout


def test_a_failed_run_resumes_at_the_failed_stage(cli, home, tmp_path, monkeypatch):
    """The tracking server goes down after the run started: the run fails at train. Once it is back,
    `digits resume` skips ingest, validate and convert and finishes the run in the same folder."""
    import socket
    import threading

    datagen.write_kaggle(tmp_path / "kaggle", n_train=200, n_test=10)
    listener = socket.create_server(("127.0.0.1", 0))
    dead = listener.getsockname()[1]

    def up_for_one_connection() -> None:  # the CLI's check before the run finds it up; then it is gone
        connection, _ = listener.accept()
        connection.close()
        listener.close()

    threading.Thread(target=up_for_one_connection, daemon=True).start()
    with monkeypatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{dead}")
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        failed = cli("run", "train-kaggle", "--data", tmp_path / "kaggle", "--set", "validate.min_rows=10",
                     "--set", "train.epochs=1", "--set", "evaluate.threshold=0")
    (run,) = _runs(home)
    assert failed.code == 1 and failed.err.strip().splitlines() == [
        f"digits: error: MLflow tracking server http://127.0.0.1:{dead} unreachable (connection refused): start "
        f"it, or unset MLFLOW_TRACKING_URI to track in SQLite under $DIGITS_HOME; then `digits resume {run.name}`"]
    assert "Traceback" not in failed.out
    # the run's end says what happened: the stage, its reason, what to do next, where to look
    assert f"train-kaggle run {run.name}: failed" in failed.out
    assert f"failed at stage train: MLflow tracking server http://127.0.0.1:{dead} unreachable" in failed.out
    assert f"fix the cause, then continue it: digits resume {run.name}" in failed.out
    assert f"run page: {(run / 'index.html').as_uri()}" in failed.out
    before = json.loads((run / "run.json").read_text())
    assert before["status"] == "failed" and before["stages"]["train"]["status"] == "failed"
    assert not (run / "train").exists()

    result = cli("resume", run.name)
    assert result.code == 0, result.err
    for stage in ("ingest", "validate", "convert"):
        assert f"{stage}: already completed in this run, skipped" in result.out
    after = json.loads((run / "run.json").read_text())
    assert after["status"] == "completed" and _runs(home) == [run]
    for stage in ("ingest", "validate", "convert"):
        assert after["stages"][stage] == before["stages"][stage]  # not run again
    assert [after["stages"][s]["status"] for s in ("train", "evaluate", "export")] == ["completed"] * 3
    assert after["promoted"] is True
    summary = result.out[result.out.index(f"train-kaggle run {run.name}: completed"):].splitlines()
    val = after["stages"]["evaluate"]["outputs"]["val_accuracy"]
    assert summary[1] == f"val accuracy {val:.2%}"  # Kaggle's test split has no labels: no test accuracy
    assert summary[2].startswith("gate passed: ")
    assert summary[3] == "registry: digits-kaggle version 1, now champion (models:/digits-kaggle@champion)"
    assert summary[-1] == f"run page: {(run / 'index.html').as_uri()}"
