"""The deployments of infra/prefect.yaml, read once for `digits serve` (the file is the single source of
names, schedules and default parameters; `prefect deploy` reads the same file for work pools)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.config import PipelineConfig
from schemas.errors import DigitsInputError

PREFECT_YAML = Path(__file__).resolve().parents[1] / "infra" / "prefect.yaml"


def definitions(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries, each parameter set validated against the flow's config model."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DigitsInputError(f"{path}: cannot read the deployments: {exc}") from None
    found = spec.get("deployments") or []
    for deployment in found:
        try:
            PipelineConfig.model_validate(deployment.get("parameters", {}).get("config", {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise DigitsInputError(f"{path}: deployment {deployment.get('name')}: config."
                                   f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return found


def serve(path: Path = PREFECT_YAML) -> None:
    """Serve every deployment of `path` from this process (schedules included), until interrupted."""
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import digits

    deployments = [digits.to_deployment(
        name=spec["name"], description=spec.get("description"), tags=spec.get("tags"),
        parameters=spec.get("parameters", {}), entrypoint_type=EntrypointType.MODULE_PATH,  # as infra/prefect.yaml
        schedules=[Cron(s["cron"], timezone=s.get("timezone")) for s in spec.get("schedules") or [] if "cron" in s])
        for spec in definitions(path)]
    prefect_serve(*deployments)
