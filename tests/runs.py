"""Runs prepared through the real stages, for tests of the stages after them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import schemas.stages
from flows import runner, stages
from schemas.artifacts import Artifact
from schemas.config import PipelineConfig, apply_overrides, default_config
from schemas.runs import RunFolder


def make(folder: RunFolder, config: PipelineConfig, artifact: str) -> Artifact:
    """Run the stages of this pipeline that produce `artifact` ("examples", "converted", "model", ...; the
    model's are train or transfer, then calibrate when it applies) on the run's upstream outputs, through
    the stage runner, as their per-stage command does. Returns the last one's artifact."""
    made = None
    for stage in schemas.stages.GRAPH.plan(config):
        if stage.produces == artifact:
            made = runner.run_stage(folder, stage, config, runner.inputs_of(folder, stage, config)).artifact
    return made


def output(folder: RunFolder, artifact: str) -> Artifact:
    """The run's completed output named `artifact`, as a later stage's command reads it."""
    stage = schemas.stages.GRAPH.producer(artifact, stages.config_of(folder))
    return runner.output_of(folder, stage.name)


def validated_kaggle_run(data: Path, *overrides: str) -> tuple[RunFolder, PipelineConfig]:
    """A train-kaggle run on the Kaggle folder `data`, ingested and validated (row counts of any size)."""
    config = apply_overrides(default_config("train-kaggle"),
                             [f"ingest.data={data}", "validate.min_rows=10", *overrides])
    folder = stages.start_run(config)
    make(folder, config, "examples")
    make(folder, config, "validation")
    return folder, config


def converted_kaggle_run(data: Path, *overrides: str) -> tuple[RunFolder, PipelineConfig]:
    """validated_kaggle_run, converted too: a run ready for the model stages."""
    folder, config = validated_kaggle_run(data, *overrides)
    make(folder, config, "converted")
    return folder, config


def kill_when(command: list[str], env: dict[str, str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start `command` in a session of its own and `kill -9` its whole process group the moment ready() holds
    (as a crash or an impatient user would); fails if the command ends first."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, f"{command[1]} ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
