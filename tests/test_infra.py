"""infra/: the deployments file and the team compose file, checked without a Docker engine."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from prefect import Flow

from flows import deployments
from schemas.config import PipelineConfig
from schemas.sources import SOURCES

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_defines_a_scheduled_deployment_of_flow_digits_per_pipeline():
    found = {d["name"]: d for d in deployments.definitions()}
    assert set(found) == {spec.pipeline for spec in SOURCES}
    for name, spec in found.items():
        # a module path, not a file path: Prefect then imports flows.pipeline under its own name, so what a flow
        # run sends to Dask workers (its context holds the flow) unpickles there (a file would be module `pipeline`)
        module, flow_name = spec["entrypoint"].split(":")
        assert isinstance(getattr(importlib.import_module(module), flow_name), Flow)
        assert spec["work_pool"]["name"] == "digits-process"
        assert spec["schedules"] and all(len(s["cron"].split()) == 5 for s in spec["schedules"])
        config = PipelineConfig.model_validate(spec["parameters"]["config"])
        assert config.pipeline.value == name
    for fine_tuned in ("train-noisy", "train-folder"):
        assert PipelineConfig.model_validate(found[fine_tuned]["parameters"]["config"]).transfer.base \
            == "models:/digits-mnist@champion"


def test_compose_file_wires_the_team_services_on_one_postgres():
    """What compose.yaml says is what tests/test_team.py starts (it reads the commands and environments from
    it); here, the wiring that a file alone can show."""
    spec = yaml.safe_load((ROOT / "infra/compose.yaml").read_text())
    services = spec["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow", "dask-scheduler", "dask-worker-1",
                             "dask-worker-2", "worker", "model-server"}
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"] \
        == "postgresql+asyncpg://digits:digits@postgres:5432/prefect"
    assert "--backend-store-uri postgresql+psycopg://digits:digits@postgres:5432/mlflow" in services["mlflow"]["command"]
    assert "--serve-artifacts" in services["mlflow"]["command"]  # clients need no disk the server sees
    databases = (ROOT / "infra/postgres-init.sql").read_text()
    assert all(f"CREATE DATABASE {name};" in databases for name in ("prefect", "mlflow", "optuna"))
    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["environment"]["DASK_SCHEDULER_ADDRESS"] == "tcp://dask-scheduler:8786"
    assert "digits-process" in worker["command"]
    for name in ("dask-worker-1", "dask-worker-2"):  # the same $DIGITS_HOME as the worker, at the same path
        assert services[name]["command"].startswith("dask worker tcp://dask-scheduler:8786 ")
        assert services[name]["environment"]["DIGITS_HOME"] == worker["environment"]["DIGITS_HOME"]
        assert "digits-home:/digits-home" in services[name]["volumes"]
    for name, service in services.items():
        if name != "postgres":  # one image: this checkout and its locked dependencies
            assert service["image"] == "digits-worker" and service["build"]["dockerfile"] == "infra/worker.Dockerfile"
            assert (ROOT / "infra" / service["build"]["context"]).resolve() == ROOT
        assert set(service.get("depends_on", {})) <= set(services)
        for volume in service.get("volumes", []):  # every named volume is declared
            source = volume.split(":")[0]
            assert source.startswith(".") or source in spec["volumes"]


def test_a_worker_environment_naming_a_dask_cluster_sends_the_distributed_work_there(monkeypatch):
    """DASK_SCHEDULER_ADDRESS (Dask's own variable; compose sets it on the worker) becomes dask.address and
    convert.runner=dask, unless the config says otherwise; a recorded config (resume) is never changed."""
    from schemas.config import apply_overrides, default_config

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    plain = default_config("train-kaggle")
    assert (plain.dask.address, plain.convert.runner) == (None, "direct")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://scheduler:8786")
    team = default_config("train-kaggle")
    assert (team.dask.address, team.convert.runner) == ("tcp://scheduler:8786", "dask")
    given = PipelineConfig.model_validate({"pipeline": "train-noisy", "convert": {"runner": "direct"}})
    assert (given.dask.address, given.convert.runner) == ("tcp://scheduler:8786", "direct")
    elsewhere = apply_overrides(plain, ["dask.address=tcp://other:8786"])
    assert (elsewhere.dask.address, elsewhere.convert.runner) == ("tcp://other:8786", "direct")
    recorded = PipelineConfig.model_validate(plain.model_dump(mode="json"))
    assert (recorded.dask.address, recorded.convert.runner) == (None, "direct")


def test_experiments_keep_their_files_under_the_home_or_on_the_tracking_server(tmp_path):
    from components.tracking import artifact_location

    assert artifact_location(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "mlartifacts") \
        == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://mlflow:5000", tmp_path / "mlartifacts") is None  # the server's default


def test_runs_started_at_once_share_the_experiment_the_first_of_them_created(tmp_path):
    """Three deployments started together on a new tracking server each find experiment digits-kaggle
    missing; the ones that lose the race to create it use the winner's (they failed the run before)."""
    from components.tracking import experiment_id, mlflow_client

    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")

    class LostTheRace:  # the state a run is in when another created the experiment after its lookup
        def __init__(self, client):
            self.client, self.looked = client, False

        def __getattr__(self, name):
            return getattr(self.client, name)

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                return None
            return self.client.get_experiment_by_name(name)

    first = experiment_id(client, "digits-kaggle", (tmp_path / "mlartifacts").as_uri())
    assert experiment_id(LostTheRace(client), "digits-kaggle", (tmp_path / "mlartifacts").as_uri()) == first
    assert [e.name for e in client.search_experiments()].count("digits-kaggle") == 1
