"""Deployments for real: `prefect server start`, `prefect deploy` from infra/prefect.yaml, a process
worker, `prefect deployment run digits/train-noisy`, then `digits serve` instead of the worker — every
process started here stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import datagen
import pytest
from runs import make, validated_kaggle_run

from flows import deployments, stages
from flows.local_api import free_port
from schemas.runs import list_runs

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


class Server:
    def __init__(self, port: int, env: dict[str, str]) -> None:
        self.api, self.env = f"http://127.0.0.1:{port}/api", env

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.api}{path}", timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(f"{self.api}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def prefect(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, "--no-prompt", *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=180)

    def wait_for_final_state(self, flow_run_id: str, timeout: float = 420) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s: {run['state']}")

    def task_states(self, flow_run_id: str) -> dict[str, dict]:
        found = self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        return {t["name"].rsplit("-", 1)[0]: t for t in found}


def _stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _seconds(run_or_task: dict) -> float:
    start, end = (datetime.fromisoformat(run_or_task[k]) for k in ("start_time", "end_time"))
    return (end - start).total_seconds()


def test_train_noisy_deployment_runs_on_a_worker_and_caches_its_data_stages(home, tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "DIGITS_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    server = Server(port, env)
    started: list[tuple[subprocess.Popen, int]] = []
    log = (tmp_path / "server.log").open("w")
    try:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append((proc, signal.SIGTERM))

        # while the server starts: a champion to fine-tune, a tiny train-kaggle run registered in this DIGITS_HOME
        datagen.write_kaggle(tmp_path / "kaggle", n_train=300, n_test=10)
        folder, config = validated_kaggle_run(tmp_path / "kaggle", "train.epochs=1", "evaluate.threshold=0")
        make(folder, config, "converted")
        make(folder, config, "model")
        make(folder, config, "evaluation")
        assert make(folder, config, "registration").promoted
        datagen.write_noisy(tmp_path / "noisy", n_train=300, n_test=20)

        deadline = time.monotonic() + 120
        while True:
            try:
                server.get("/health")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "prefect server did not start"
                time.sleep(0.5)

        assert server.prefect("work-pool", "create", "digits-process", "--type", "process").returncode == 0
        worker_log = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "digits-process", "--type", "process"],
                                  cwd=ROOT, env=env, stdout=worker_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        started.append((worker, signal.SIGINT))  # stopped before the server (reversed order below)
        deployed = server.prefect("deploy", "--all", "--prefect-file", "infra/prefect.yaml")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr

        params = {"config": {"pipeline": "train-noisy", "ingest": {"data": str(tmp_path / "noisy")},
                             "validate": {"min_rows": 10}, "train": {"epochs": 1}, "evaluate": {"threshold": 0},
                             "transfer": {"base": "models:/digits-kaggle@champion"}}}
        runs = []
        for attempt in range(2):
            triggered = server.prefect("deployment", "run", "digits/train-noisy", "--params", json.dumps(params))
            assert triggered.returncode == 0, triggered.stdout + triggered.stderr
            flow_run_id = next(line.split()[-1] for line in triggered.stdout.splitlines() if "UUID" in line)
            if attempt == 0:  # while the worker runs it: the schedule is there, a wrong type is refused
                inspected = server.prefect("deployment", "inspect", "digits/train-noisy")
                assert inspected.returncode == 0 and "0 4 * * 1" in inspected.stdout
                wrong = server.prefect("deployment", "run", "digits/train-noisy", "--params",
                                       json.dumps({"config": {"pipeline": "train-noisy", "train": {"epochs": "many"}}}))
                assert wrong.returncode != 0 and "epochs" in (wrong.stdout + wrong.stderr)
            run = server.wait_for_final_state(flow_run_id)
            assert run["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
            runs.append((run, server.task_states(flow_run_id)))

        (first, first_tasks), (second, second_tasks) = runs
        data_stages = ("ingest", "validate", "convert")
        assert [first_tasks[s]["state"]["name"] for s in data_stages] == ["Completed"] * 3
        assert [second_tasks[s]["state"]["name"] for s in data_stages] == ["Cached"] * 3
        assert second_tasks["transfer"]["state"]["name"] == "Completed"
        first_data = sum(_seconds(first_tasks[s]) for s in data_stages)
        second_data = sum(_seconds(second_tasks[s]) for s in data_stages)
        print(f"\ndata stages: first run {first_data:.2f} s, cached re-run {second_data:.2f} s; "
              f"flow runs {_seconds(first):.1f} s and {_seconds(second):.1f} s")
        assert second_data < first_data

        # the run folders: one per flow run, the second's data stages hard-linked from the first's
        folders = [f for f in list_runs() if f.load().prefect_flow_run_id in (first["id"], second["id"])]
        assert len(folders) == 2
        records = {f.load().prefect_flow_run_id: f.load() for f in folders}
        first_record, second_record = records[first["id"]], records[second["id"]]
        assert first_record.status == second_record.status == "completed"
        assert second_record.stages["convert"].outputs["cached_from"].startswith(str(home / "runs" / first_record.run_id))
        assert second_record.stages["transfer"].outputs["base"] == "models:/digits-kaggle/1"
        second_folder = next(f for f in folders if f.run_id == second_record.run_id)
        assert (second_folder.stage_dir("export") / "submission.csv").is_file()
        versions = stages.registry().versions("digits-noisy")
        assert sorted(v.tags["digits.run_id"] for v in versions) == sorted([first_record.run_id, second_record.run_id])
        assert sum(v.champion for v in versions) == 1

        # no worker: `digits serve` registers the same three deployments (schedules from infra/prefect.yaml,
        # no work pool) and runs a triggered flow run itself
        _stop(worker, signal.SIGINT)
        for deployment in server.post("/deployments/filter", {}):  # a user has one or the other
            urllib.request.urlopen(urllib.request.Request(f"{server.api}/deployments/{deployment['id']}",
                                                          method="DELETE"), timeout=10).close()
        serve_log = (tmp_path / "serve.log").open("w")
        served = subprocess.Popen([str(Path(sys.executable).with_name("digits")), "serve"], cwd=ROOT,
                                  env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, stdout=serve_log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        started.append((served, signal.SIGINT))
        expected = {spec["name"]: [s["cron"] for s in spec["schedules"]] for spec in deployments.definitions()}
        deadline = time.monotonic() + 120
        while True:
            found = {d["name"]: d for d in server.post("/deployments/filter", {})}
            if all(name in found for name in expected):
                break
            assert served.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        assert {name: [s["schedule"]["cron"] for s in found[name]["schedules"]] for name in expected} == expected
        assert all(found[name]["work_pool_name"] is None for name in expected)
        triggered = server.prefect("deployment", "run", "digits/train-noisy", "--params", json.dumps(params))
        assert triggered.returncode == 0, triggered.stdout + triggered.stderr
        run = server.wait_for_final_state(next(line.split()[-1] for line in triggered.stdout.splitlines() if "UUID" in line))
        assert run["state"]["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert run["work_pool_name"] is None and len(stages.registry().versions("digits-noisy")) == 3
    finally:
        for proc, sig in reversed(started):
            _stop(proc, sig)
        log.close()
    assert all(proc.poll() is not None for proc, _ in started)
