"""Team mode for real: the services of infra/compose.yaml started as processes on 127.0.0.1 (no Docker) —
PostgreSQL (a cluster made here with initdb), a Prefect server and an MLflow server on it, a Dask scheduler
with two workers, a Prefect process worker — each from its compose command and environment, host names and
ports replaced by free ones here; every process stopped by PID.

The scenario: train-mnist then train-noisy as deployment runs (convert on the Dask cluster, ensemble members
on it, a Dask worker SIGKILLed mid-convert, PostgreSQL restarted between the two), two train-kaggle at once,
`digits serve` in place of the worker running a triggered flow run, the MLflow server stopped while that run
trains and `digits resume` after it is back, and the two pages people
open (a Prefect flow run, an MLflow registered model) rendered in headless Chromium.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import datagen
import pytest
import yaml

from flows import deployments, stages
from flows.local_api import free_port
from schemas.runs import RunFolder, list_runs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((ROOT / "infra/compose.yaml").read_text())["services"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


PG_BIN = _postgres_bin()
pytestmark = [pytest.mark.e2e, pytest.mark.shared_data,
              pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL is not installed (Debian package: postgresql)")]
# processes whose environment must not leak in from the test process
_OWN = ("PREFECT_API_URL", "PREFECT_UI_URL", "MLFLOW_TRACKING_URI", "DASK_SCHEDULER_ADDRESS", "DIGITS_HOME")


class Team:
    """The compose services as local processes: `start(service)` runs its compose command with its compose
    environment, with the compose host names, ports and volume paths replaced by this machine's."""

    def __init__(self, tmp: Path, home: Path) -> None:
        self.tmp, self.home = tmp, home
        self.ports = {name: free_port() for name in ("postgres", "prefect-server", "mlflow", "dask-scheduler",
                                                     "model-server")}
        compose_port = {"postgres": 5432, "prefect-server": 4200, "mlflow": 5000, "dask-scheduler": 8786,
                        "model-server": 8765}
        self.replace = {f"{host}:{compose_port[host]}": f"127.0.0.1:{port}" for host, port in self.ports.items()}
        self.replace.update({f"--port {compose_port[host]}": f"--port {port}" for host, port in self.ports.items()})
        self.replace.update({"localhost:4200": f"127.0.0.1:{self.ports['prefect-server']}", "0.0.0.0": "127.0.0.1",
                             "/digits-home": str(home), "/mlflow-artifacts": str(tmp / "mlflow-artifacts")})
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = tmp / "logs"
        self.logs.mkdir()
        # PostgreSQL refuses to run as root: its folder belongs to the postgres user, outside pytest's 0700 tmp
        self.pg_dir = Path(tempfile.mkdtemp(prefix="digits-team-pg-"))
        self.pg_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.pg_user:
            shutil.chown(self.pg_dir, "postgres")
        self.base_env = {k: v for k, v in os.environ.items() if k not in _OWN}
        self.base_env.update({"PREFECT_HOME": str(tmp / "prefect-home"), "TF_CPP_MIN_LOG_LEVEL": "2",
                              "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})

    def sub(self, text: str) -> str:
        for old, new in self.replace.items():
            text = text.replace(old, new)
        return text

    def env(self, service: str) -> dict[str, str]:
        return {**self.base_env, **{k: self.sub(str(v)) for k, v in COMPOSE[service].get("environment", {}).items()}}

    @property
    def optuna_url(self) -> str:
        """The tune stage's study storage on the team's PostgreSQL (infra/postgres-init.sql creates `optuna`)."""
        env = COMPOSE["postgres"]["environment"]
        return (f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@127.0.0.1:"
                f"{self.ports['postgres']}/optuna")

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def start(self, service: str) -> subprocess.Popen:
        command = shlex.split(self.sub(COMPOSE[service]["command"]))
        return self._popen(service, command, self.env(service))

    def _popen(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("a")
        self.procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()
        return self.procs[name]

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    # PostgreSQL: the postgres image's entrypoint (initdb, the init script), done by hand
    def init_postgres(self) -> None:
        password = self.pg_dir / "password"
        password.write_text(COMPOSE["postgres"]["environment"]["POSTGRES_PASSWORD"] + "\n")
        if self.pg_user:
            shutil.chown(password, "postgres")
        subprocess.run([*self.pg_user, str(PG_BIN / "initdb"), "-D", str(self.pg_dir / "data"),
                        "-U", COMPOSE["postgres"]["environment"]["POSTGRES_USER"], f"--pwfile={password}",
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        self.start_postgres()
        self.psql("-f", str(ROOT / "infra/postgres-init.sql"))

    def start_postgres(self) -> None:
        self._popen("postgres", [*self.pg_user, str(PG_BIN / "postgres"), "-D", str(self.pg_dir / "data"),
                                 "-p", str(self.ports["postgres"]), "-k", str(self.pg_dir),
                                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"], self.base_env)
        wait_for(lambda: self.psql("-c", "SELECT 1", check=False).returncode == 0, 60, "PostgreSQL",
                 self.procs["postgres"], lambda: self.log("postgres"))

    def psql(self, *args: str, database: str = "postgres", check: bool = True) -> subprocess.CompletedProcess:
        env = self.base_env | {"PGPASSWORD": COMPOSE["postgres"]["environment"]["POSTGRES_PASSWORD"]}
        return subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.ports["postgres"]), "-U",
                               COMPOSE["postgres"]["environment"]["POSTGRES_USER"], "-d", database, "-v",
                               "ON_ERROR_STOP=1", *args], env=env, capture_output=True, text=True, timeout=60,
                              check=check)

    def cleanup(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name, signal.SIGINT if name in ("worker", "postgres") else signal.SIGTERM)
        shutil.rmtree(self.pg_dir, ignore_errors=True)

    # the APIs
    def get(self, service: str, path: str):
        with urllib.request.urlopen(f"{self.url(service)}{path}", timeout=10) as response:
            return json.loads(response.read())

    def post(self, service: str, path: str, body: dict, timeout: float = 10):
        request = urllib.request.Request(f"{self.url(service)}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def up(self, service: str, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url(service)}{path}", timeout=10) as response:
                return response.status == 200
        except OSError:
            return False

    def prefect(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT, env=self.env("worker"),
                              capture_output=True, text=True, timeout=180)

    def run_deployment(self, name: str, config: dict) -> str:
        done = self.prefect("deployment", "run", f"digits/{name}", "--params", json.dumps({"config": config}))
        assert done.returncode == 0, done.stdout + done.stderr
        return next(line.split()[-1] for line in done.stdout.splitlines() if "UUID" in line)

    def flow_run(self, flow_run_id: str) -> dict:
        return self.get("prefect-server", f"/api/flow_runs/{flow_run_id}")

    def stage_started(self, flow_run_id: str, stage: str, timeout: float = 300, runner: str = "worker") -> str | None:
        """The stage's status once it has one (or None when the flow run ended first); runner: the process that
        runs flow runs (the Prefect worker, or `digits serve`)."""
        final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        wait_for(lambda: stage_status(flow_run_id, stage) is not None
                 or self.flow_run(flow_run_id)["state"]["type"] in final, timeout, f"{stage} of {flow_run_id}",
                 self.procs[runner], lambda: self.log(runner))
        return stage_status(flow_run_id, stage)

    def busy_dask_worker(self, timeout: float = 120) -> str:
        """The name of a Dask worker the moment it is processing a task."""
        from distributed import Client

        deadline = time.monotonic() + timeout
        with Client(f"tcp://127.0.0.1:{self.ports['dask-scheduler']}", timeout=30) as client:
            while time.monotonic() < deadline:
                processing = {address: tasks for address, tasks in client.processing().items() if tasks}
                if processing:
                    return client.scheduler_info()["workers"][next(iter(processing))]["name"]
                time.sleep(0.02)
        raise AssertionError(f"no Dask worker got a task in {timeout} s\n{self.log('worker')[-3000:]}")

    def finished(self, flow_run_id: str, timeout: float = 600, runner: str = "worker") -> dict:
        final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        wait_for(lambda: self.flow_run(flow_run_id)["state"]["type"] in final, timeout, f"flow run {flow_run_id}",
                 self.procs[runner], lambda: self.log(runner))
        return self.flow_run(flow_run_id)

    def why_not_completed(self, flow_run_ids: list[str], log: str = "worker") -> str:
        """For an assertion message: each flow run that did not complete, its state and message (the error
        that ended it), then the log's error lines and its end (runs at once interleave their lines)."""
        states = {i: self.flow_run(i)["state"] for i in flow_run_ids}
        ended = [f"{i}: {s['type']}: {s.get('message')}" for i, s in states.items() if s["type"] != "COMPLETED"]
        text = self.log(log)
        errors = [line for line in text.splitlines() if "ERROR" in line or "Error" in line][-30:]
        return "\n".join([*ended, "--- error lines:", *errors, "--- the log's end:", text[-3000:]])


def wait_for(ready, timeout: float, what: str, proc: subprocess.Popen | None = None, log=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc is None or proc.poll() is None, f"{what}: its process ended\n{log()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not ready after {timeout} s\n{log()[-3000:]}"
        time.sleep(0.5)


def run_of(flow_run_id: str) -> RunFolder | None:
    return next((f for f in list_runs() if f.load().prefect_flow_run_id == flow_run_id), None)


def stage_status(flow_run_id: str, stage: str) -> str | None:
    folder = run_of(flow_run_id)
    record = folder.load().stages.get(stage) if folder else None
    return record.status if record else None


def pages(team: Team, flow_run_id: str, out: Path, version_run: tuple[str, str]) -> dict[str, str]:
    """The flow run's page in the Prefect UI (its Artifacts tab), digits-noisy's page, its version 1's page (the
    signature, opened) and that version's MLflow run (experiment id, run id) in the MLflow UI, as rendered text;
    each saved as a screenshot in `out`."""
    from playwright.sync_api import sync_playwright

    shown = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS[1:], headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{team.url('prefect-server')}/runs/flow-run/{flow_run_id}")
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("evaluation-summary").first.wait_for(timeout=60_000)
        page.screenshot(path=out / "prefect-flow-run.png", full_page=True)
        shown["prefect"] = page.inner_text("body")
        page.goto(f"{team.url('mlflow')}/#/models/digits-noisy")
        page.get_by_text(re.compile(r"^\W*champion$")).first.wait_for(timeout=60_000)  # the alias, in the versions table
        page.screenshot(path=out / "mlflow-registered-model.png", full_page=True)
        shown["mlflow"] = page.inner_text("body")
        page.goto(f"{team.url('mlflow')}/#/models/digits-noisy/versions/1")
        page.get_by_text("Outputs (4)").first.wait_for(timeout=60_000)  # the signature: 1 input, 4 outputs
        page.get_by_text("Outputs (4)").first.click()
        page.get_by_text("Inputs (1)").first.click()
        page.get_by_text("probabilities").first.wait_for(timeout=30_000)
        page.screenshot(path=out / "mlflow-version.png", full_page=True)
        shown["version"] = page.inner_text("body")
        experiment, run_id = version_run
        page.goto(f"{team.url('mlflow')}/#/experiments/{experiment}/runs/{run_id}")
        page.get_by_text("eval_val_accuracy").first.wait_for(timeout=60_000)
        page.screenshot(path=out / "mlflow-version-run.png", full_page=True)
        shown["run"] = page.inner_text("body")
        browser.close()
    return shown


def test_team_mode_on_postgres_prefect_mlflow_and_dask(home, tmp_path, prepared_tfds):
    tfds_dir, _ = prepared_tfds
    team = Team(tmp_path, home)
    try:
        team.init_postgres()
        for service in ("prefect-server", "mlflow", "dask-scheduler"):
            team.start(service)
        # while they start: the data of the three pipelines
        datagen.write_kaggle(tmp_path / "kaggle", n_train=300, n_test=20)
        datagen.write_noisy(tmp_path / "noisy", n_train=300, n_test=20)
        wait_for(lambda: team.up("prefect-server", "/api/health"), 180, "prefect server",
                 team.procs["prefect-server"], lambda: team.log("prefect-server"))
        wait_for(lambda: team.up("mlflow", "/health"), 180, "mlflow server", team.procs["mlflow"],
                 lambda: team.log("mlflow"))
        for service in ("dask-worker-1", "dask-worker-2", "worker"):
            team.start(service)
        wait_for(lambda: team.up("prefect-server", "/api/work_pools/digits-process"), 120,  # REST: no CLI per poll
                 "the worker's work pool", team.procs["worker"], lambda: team.log("worker"))
        deployed = team.prefect("deploy", "--all", "--prefect-file", "infra/prefect.yaml")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr

        # Prefect 3 wants FLOW/DEPLOYMENT: the bare deployment name is refused (the README shows its message)
        bare = team.prefect("deployment", "run", "train-noisy")
        assert bare.returncode != 0 and "Invalid deployment name format: train-noisy. Expected format: " \
            "<FLOW_NAME>/<DEPLOYMENT_NAME>" in bare.stdout + bare.stderr
        inspected = team.prefect("deployment", "inspect", "digits/train-noisy")  # its schedule, from prefect.yaml
        assert inspected.returncode == 0 and "0 4 * * 1" in inspected.stdout
        wrong = team.prefect("deployment", "run", "digits/train-noisy", "--params",
                             json.dumps({"config": {"pipeline": "train-noisy", "train": {"epochs": "many"}}}))
        assert wrong.returncode != 0 and "epochs" in wrong.stdout + wrong.stderr  # the server validates parameters

        small = {"validate": {"min_rows": 10}, "evaluate": {"threshold": 0}}
        # 1. train-mnist: convert on the cluster's DaskRunner, one Dask worker SIGKILLed while it converts
        # (300 rows: their label shares stray from MNIST's more than validation allows, a warning here)
        mnist_id = team.run_deployment("train-mnist", {"pipeline": "train-mnist", **small,
                                                       "validate": {"min_rows": 10, "fail_on": "warn"},
                                                       "ingest": {"data": str(tfds_dir), "limit": 300},
                                                       "train": {"epochs": 1},
                                                       # two trials on the cluster, sharing a study on PostgreSQL
                                                       "tune": {"trials": 2, "epochs": 1, "pruner": "off",
                                                                "space": {"width": "choice 0.25 0.5"},
                                                                "storage": team.optuna_url}})
        assert team.stage_started(mnist_id, "convert") == "running"
        busy = team.busy_dask_worker()  # the first worker the Beam job gives a task to
        team.stop(busy, signal.SIGKILL)
        killed_at = time.monotonic()
        team.start(busy)  # a supervisor's restart; the stage does not wait for it
        mnist = team.finished(mnist_id)
        assert mnist["state"]["type"] == "COMPLETED", team.why_not_completed([mnist_id])
        record = run_of(mnist_id).load()
        print(f"train-mnist completed {time.monotonic() - killed_at:.0f} s after a Dask worker was killed mid-convert")
        assert record.stages["convert"].outputs["runner"] == "DaskRunner"
        assert record.stages["convert"].outputs["counts"] == {"train": 270, "val": 30, "test": 300}
        assert record.config["dask"]["address"] == f"tcp://127.0.0.1:{team.ports['dask-scheduler']}"
        tuned = record.stages["tune"].outputs
        assert (tuned["trials"], tuned["complete"]) == (2, 2) and tuned["storage"].startswith("postgresql+psycopg://")
        assert "digits:digits@" not in tuned["storage"]  # run.json does not keep the database password
        with (run_of(mnist_id).stage_dir("tune") / "trials.csv").open() as f:
            workers = [row["worker"].split()[0] for row in csv.DictReader(f)]
        assert len(workers) == 2 and set(workers) <= {"dask-worker-1", "dask-worker-2"}, workers
        in_db = team.psql("-tAc", "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'",
                          database="optuna")
        assert in_db.stdout.strip() == "2", in_db.stdout + in_db.stderr

        # 2. PostgreSQL restarted between two runs: both servers carry on
        team.stop("postgres", signal.SIGINT)
        team.start_postgres()

        # 3. train-noisy fine-tunes the champion train-mnist registered: two members, one on each Dask worker
        # (the killed worker is back: a supervisor restarted it above)
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{team.ports['dask-scheduler']}", timeout=30) as client:
            client.wait_for_workers(2, timeout=120)
        noisy_id = team.run_deployment("train-noisy", {"pipeline": "train-noisy", **small,
                                                       "ingest": {"data": str(tmp_path / "noisy")},
                                                       "train": {"epochs": 1, "members": 2}})
        noisy = team.finished(noisy_id)
        assert noisy["state"]["type"] == "COMPLETED", team.why_not_completed([noisy_id])
        members = run_of(noisy_id).load().stages["transfer"].outputs["members"]
        assert len(members) == 2 and sorted(m["worker"].split()[0] for m in members) == ["dask-worker-1", "dask-worker-2"], members

        # the champion served (compose's model-server, `digits app`): a digit posted is answered by digits-mnist
        # version 1; another version promoted, the next answer comes from it
        team.start("model-server")
        wait_for(lambda: team.up("model-server", "/api/model"), 180, "the model server", team.procs["model-server"],
                 lambda: team.log("model-server"))
        _, pixels = datagen.digits(3, seed=5)
        answer = team.post("model-server", "/api/predict", {"images": pixels.tolist()}, timeout=120)
        assert answer["model"]["version"] == "1" and len(answer["predictions"]) == 3, answer
        # and by MLflow's own server, on the model the registry on PostgreSQL holds
        team.ports["mlflow-serve"] = free_port()
        team._popen("mlflow-serve", [str(BIN / "mlflow"), "models", "serve", "-m", "models:/digits-mnist@champion",
                                     "--env-manager", "local", "-h", "127.0.0.1", "-p", str(team.ports["mlflow-serve"])],
                    team.env("worker"))
        wait_for(lambda: team.up("mlflow-serve", "/ping"), 180, "mlflow models serve", team.procs["mlflow-serve"],
                 lambda: team.log("mlflow-serve"))
        served = team.post("mlflow-serve", "/invocations", {"inputs": pixels.reshape(3, 784).tolist()},
                           timeout=120)
        assert [p["digit"] for p in served["predictions"]] == [p["digit"] for p in answer["predictions"]], served
        team.stop("mlflow-serve")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", team.url("mlflow"))
            reg = stages.registry()
            model_file = reg.download(reg.champion("digits-mnist"), tmp_path / "champion")
            second, _ = reg.register("digits-mnist", model_file, {"digits.run_id": "team-test"}, lambda current: False)
        promoted = subprocess.run([str(BIN / "digits"), "registry", "promote", "digits-mnist", second.version],
                                  cwd=ROOT, env=team.env("worker"), capture_output=True, text=True, timeout=120)
        assert promoted.returncode == 0, promoted.stderr
        answer = team.post("model-server", "/api/predict", {"images": pixels.tolist()}, timeout=120)
        assert answer["model"]["version"] == second.version, answer

        # the registry, through MLflow's REST API: both models, their champions, the noisy one's lineage
        models = {m["name"]: m for m in team.get("mlflow", "/api/2.0/mlflow/registered-models/search")["registered_models"]}
        assert {"digits-mnist", "digits-noisy"} <= set(models)
        for name in ("digits-mnist", "digits-noisy"):
            assert [a["alias"] for a in models[name].get("aliases", [])] == ["champion"]
        champion = team.get("mlflow", "/api/2.0/mlflow/registered-models/alias?name=digits-noisy&alias=champion")
        tags = {t["key"]: t["value"] for t in champion["model_version"]["tags"]}
        assert tags["digits.base"] == "models:/digits-mnist/1" and tags["digits.run_id"] == run_of(noisy_id).run_id
        assert champion["model_version"]["source"].startswith("mlflow-artifacts:")  # files held by the server
        # Prefect's API: each run's artifacts
        for flow_run_id in (mnist_id, noisy_id):
            found = team.post("prefect-server", "/api/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
            keys = {a["key"] for a in found}
            assert {"validation-results", "validation-report", "evaluation-summary", "registry-version"} <= keys, keys
            (version_link,) = [a["data"] for a in found if a["key"] == "registry-version"]  # a page, not models:/
            assert f"{team.url('mlflow')}/#/models/" in version_link, version_link

        # 4. two train-kaggle at once: both register, exactly one champion
        # one epoch on 270 images: a run (the resumed one below) may land a few of the 30 val images below the
        # champion from thread-order differences alone; the test is about registering, not about that gate
        kaggle = {"pipeline": "train-kaggle", **small, "ingest": {"data": str(tmp_path / "kaggle")},
                  "train": {"epochs": 1}, "evaluate": {"threshold": 0, "promote_when": "not-significantly-worse"}}
        kaggle_ids = [team.run_deployment("train-kaggle", kaggle) for _ in range(2)]
        assert all(team.finished(i)["state"]["type"] == "COMPLETED" for i in kaggle_ids), team.why_not_completed(kaggle_ids)
        folders = [run_of(i) for i in kaggle_ids]
        assert len({f.root for f in folders}) == 2
        for flow_run_id, folder in zip(kaggle_ids, folders):
            record = folder.load()
            assert record.prefect_flow_run_id == flow_run_id and record.status == "completed"
            for stage in record.stages.values():  # nothing in a run's record points into another run's folder
                paths = [v for k, v in stage.outputs.items() if k != "cached_from" and isinstance(v, str)
                         and str(home / "runs") in v]
                assert all(p.startswith(str(folder.root)) for p in paths), (folder.run_id, paths)
        found = team.get("mlflow", "/api/2.0/mlflow/model-versions/search?filter=name%3D%27digits-kaggle%27")
        runs_of_versions = sorted({t["key"]: t["value"] for t in v["tags"]}["digits.run_id"]
                                  for v in found["model_versions"])
        assert runs_of_versions == sorted(f.run_id for f in folders)
        ledger = json.loads((home / "registry-ledger.json").read_text())  # each run's version, none lost
        assert sorted(next(iter(ledger.values()))["digits-kaggle"]) == ["1", "2"], ledger
        kaggle_model = team.get("mlflow", "/api/2.0/mlflow/registered-models/get?name=digits-kaggle")["registered_model"]
        assert [a["alias"] for a in kaggle_model.get("aliases", [])] == ["champion"]

        # 5. no worker: `digits serve` registers the same deployments (schedules from infra/prefect.yaml, no work
        # pool) and runs a triggered flow run itself
        team.stop("worker", signal.SIGINT)
        for deployment in team.post("prefect-server", "/api/deployments/filter", {}):  # a team has one or the other
            urllib.request.urlopen(urllib.request.Request(f"{team.url('prefect-server')}/api/deployments/"
                                                          f"{deployment['id']}", method="DELETE"), timeout=10).close()
        served = team._popen("serve", [str(BIN / "digits"), "serve"],
                             {**team.env("worker"), "PREFECT_RUNNER_POLL_FREQUENCY": "1"})
        expected = {spec["name"]: [s["cron"] for s in spec["schedules"]] for spec in deployments.definitions()}

        def served_all() -> dict | None:
            found = {d["name"]: d for d in team.post("prefect-server", "/api/deployments/filter", {})}
            return found if set(expected) <= set(found) else None
        wait_for(served_all, 120, "digits serve's deployments", served, lambda: team.log("serve"))
        found = served_all()
        assert {name: [s["schedule"]["cron"] for s in found[name]["schedules"]] for name in expected} == expected
        assert all(found[name]["work_pool_name"] is None for name in expected)
        # and the schedules run: Prefect's scheduler makes their next flow runs (it made none on SQLAlchemy 2.1)
        scheduled_ids = [found[name]["id"] for name, crons in expected.items() if crons]

        def scheduled() -> list:
            return team.post("prefect-server", "/api/flow_runs/filter", {
                "deployments": {"id": {"any_": scheduled_ids}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        wait_for(lambda: scheduled(), 90, "the served deployments' scheduled flow runs", team.procs["prefect-server"],
                 lambda: team.log("prefect-server"))
        assert "Can't evaluate bulk DML" not in team.log("prefect-server")

        # 6. the MLflow server stops while that served run trains: the run fails with one line; back up,
        # `digits resume` completes it
        again_id = team.run_deployment("train-kaggle", kaggle)
        assert team.stage_started(again_id, "train", runner="serve") == "running"
        team.stop("mlflow")
        failed = team.finished(again_id, runner="serve")
        assert failed["state"]["type"] == "FAILED", team.why_not_completed([again_id], "serve")
        assert again_id in team.log("serve")  # run by `digits serve` itself
        folder = run_of(again_id)
        record = folder.load()
        (error,) = [stage.error for stage in record.stages.values() if stage.status == "failed"]
        assert record.status == "failed" and error.startswith("MLflow tracking server http://127.0.0.1:") \
            and "unreachable (connection refused)" in error and "\n" not in error, error
        print(f"the run without MLflow: {error}")
        data_stages = ("ingest", "validate", "convert")
        assert all(record.stages[s].outputs.get("cached_from") for s in data_stages)  # reused from an earlier run
        tasks = {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in
                 team.post("prefect-server", "/api/task_runs/filter", {"flow_runs": {"id": {"any_": [again_id]}}})}
        assert [tasks[s] for s in data_stages] == ["Cached"] * 3, tasks
        team.start("mlflow")
        wait_for(lambda: team.up("mlflow", "/health"), 180, "mlflow server, again", team.procs["mlflow"],
                 lambda: team.log("mlflow"))
        resumed = subprocess.run([str(BIN / "digits"), "resume", folder.run_id], cwd=ROOT, env=team.env("worker"),
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert folder.load().status == "completed" and folder.load().registry_version == 3

        # 7. the pages people open, in headless Chromium (Playwright drives it: the Artifacts tab is a click)
        if CHROMIUM is not None:
            version = team.get("mlflow", "/api/2.0/mlflow/model-versions/get?name=digits-noisy&version=1")["model_version"]
            run = team.get("mlflow", f"/api/2.0/mlflow/runs/get?run_id={version['run_id']}")["run"]
            shown = pages(team, noisy_id, tmp_path, (run["info"]["experiment_id"], version["run_id"]))
            assert "float32" in shown["version"] and "champion: " in shown["version"]  # schema, why promoted
            assert "eval_val_accuracy" in shown["run"] and "eval_ece" in shown["run"]  # what decided it
            assert {"evaluation-summary", "registry-version", "validation-results"} <= set(shown["prefect"].split()), \
                shown["prefect"]
            assert "digits-noisy" in shown["mlflow"] and "Version 1" in shown["mlflow"], shown["mlflow"]
            print(f"screenshots: {tmp_path / 'prefect-flow-run.png'}, {tmp_path / 'mlflow-registered-model.png'}")
    finally:
        team.cleanup()
    assert all(proc.poll() is not None for proc in team.procs.values())
