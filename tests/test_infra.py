"""infra/: the deployments file and the team compose file, checked without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from flows import deployments
from schemas.config import PipelineConfig
from schemas.sources import SOURCES

ROOT = Path(__file__).resolve().parents[1]


def _locked(package: str) -> str:
    return re.search(rf"^{package}==(\S+)", (ROOT / "requirements.lock").read_text(), re.M).group(1)


def test_prefect_yaml_defines_a_scheduled_deployment_of_flow_digits_per_pipeline():
    found = {d["name"]: d for d in deployments.definitions()}
    assert set(found) == {spec.pipeline for spec in SOURCES}
    for name, spec in found.items():
        path, flow_name = spec["entrypoint"].split(":")
        assert (ROOT / path).is_file() and f"def {flow_name}(" in (ROOT / path).read_text()
        assert spec["work_pool"]["name"] == "digits-process"
        assert spec["schedules"] and all(len(s["cron"].split()) == 5 for s in spec["schedules"])
        config = PipelineConfig.model_validate(spec["parameters"]["config"])
        assert config.pipeline.value == name
    for fine_tuned in ("train-noisy", "train-folder"):
        assert PipelineConfig.model_validate(found[fine_tuned]["parameters"]["config"]).transfer.base \
            == "models:/digits-mnist@champion"


def test_compose_file_wires_prefect_on_postgres_mlflow_and_a_worker():
    spec = yaml.safe_load((ROOT / "infra/compose.yaml").read_text())
    services = spec["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow", "worker"}
    assert "postgres:5432" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["prefect-server"]["image"].startswith(f"prefecthq/prefect:{_locked('prefect')}-")
    assert services["mlflow"]["image"].endswith(f":v{_locked('mlflow')}")
    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "digits-process" in worker["command"]
    context = (ROOT / "infra" / worker["build"]["context"]).resolve()
    assert context == ROOT and (context / worker["build"]["dockerfile"]).is_file()
    for service in services.values():  # every dependency names a defined service, every volume is declared
        assert set(service.get("depends_on", {})) <= set(services)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(".") or source in spec["volumes"]
