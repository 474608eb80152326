"""Runs prepared through the real stages, for tests of the stages after them."""

from __future__ import annotations

from pathlib import Path

from flows import stages
from schemas.config import PipelineConfig, apply_overrides, default_config
from schemas.runs import RunFolder


def validated_kaggle_run(data: Path, *overrides: str) -> tuple[RunFolder, PipelineConfig]:
    """A train-kaggle run on the Kaggle folder `data`, ingested and validated (row counts of any size)."""
    config = apply_overrides(default_config("train-kaggle"),
                             [f"ingest.data={data}", "validate.min_rows=10", *overrides])
    folder = stages.start_run(config)
    stages.validate(folder, config, stages.ingest(folder, config))
    return folder, config
