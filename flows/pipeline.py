"""The Prefect flow `digits`: one task per stage of schemas.stages.GRAPH, in pipeline order, each
handed the artifacts it consumes by name.

Every task runs its stage through the stage runner (flows.runner) — the same calls the CLI's per-stage
commands make — so a Prefect run and a direct run write identical run folders, reuse the same outputs
(a reused stage shows as `Cached` in Prefect), and publish what each artifact declares as Prefect
artifacts (the validation table and Data Docs link, the evaluation summary, the registry version, the
submission).
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral API's first start in a fresh PREFECT_HOME (database migrations) took 8-19 s on a busy
# 2-core machine here, against Prefect's default limit of 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed  # noqa: E402

import schemas.stages  # noqa: E402
from flows import runner, stages  # noqa: E402
from schemas.artifacts import Artifact  # noqa: E402
from schemas.config import PipelineConfig  # noqa: E402
from schemas.errors import DigitsInputError, OutOfSpace, ServiceUnavailable  # noqa: E402
from schemas.runs import RunFolder, digits_home  # noqa: E402
from schemas.stages import Stage  # noqa: E402


def _transient(task, task_run, state) -> bool:
    """Retry only what may pass on a second try: not bad input, which fails the same way again."""
    try:
        state.result()
    except DigitsInputError:
        return False
    except Exception:  # a network share, a download, a registry server: may recover
        return True
    return False


def _publish(artifact: Artifact) -> None:
    """The artifact's publications as Prefect artifacts of the running task."""
    for item in artifact.publications():
        _PUBLISHERS[item.kind](item)


_PUBLISHERS = {
    "table": lambda p: create_table_artifact(key=p.key, table=p.content, description=p.description),
    "link": lambda p: create_link_artifact(key=p.key, link=p.content, link_text=p.link_text,
                                           description=p.description),
    "markdown": lambda p: create_markdown_artifact(key=p.key, markdown=p.content, description=p.description),
}


def _stage_task(stage: Stage):
    """The Prefect task of a stage: the stage runner's call, its reuse shown as the state `Cached`."""
    def run_stage(run_id: str, config: PipelineConfig, inputs: dict[str, Artifact]) -> Artifact:
        logger = get_run_logger()
        folder = RunFolder.open(run_id, digits_home())
        outcome = runner.run_stage(folder, stage, config, inputs, progress=logger.info, on_output=_publish)
        logger.info("%s: %s", stage.name, outcome.artifact.describe())
        if outcome.how == "ran":
            return outcome.artifact
        message = ("already completed in this run" if outcome.how == "skipped"
                   else f"reused from {outcome.source}")
        return Completed(data=outcome.artifact, name="Cached", message=message)

    run_stage.__doc__ = stage.help
    return task(run_stage, name=stage.name, cache_policy=NO_CACHE, retries=stage.retries, retry_delay_seconds=5,
                retry_condition_fn=_transient)


@flow(name="digits", log_prints=True)
def digits(config: PipelineConfig, run_id: str | None = None) -> str:
    """Run the pipeline `config.pipeline` end to end; returns the run id.

    run_id names a run folder already created for this run (the CLI creates it to print its path
    first, `digits resume` passes an earlier one); None: the folder of this Prefect flow run (a retried
    flow run resumes in the folder of its first attempt), or a new one.

    Each stage is handed the artifacts it consumes (schemas.stages.GRAPH). Stages this run already
    completed are skipped, so a failed run re-run after its cause is fixed resumes at the failed stage
    (training at its last checkpoint); ingest, validate and convert are reused across runs when their
    inputs, settings and code are the same.
    """
    from prefect.runtime import flow_run

    folder = RunFolder.open(run_id, digits_home()) if run_id else stages.run_for_flow_run(config, flow_run.id)
    if folder.load().prefect_flow_run_id is None and flow_run.id:
        folder.update(lambda record: setattr(record, "prefect_flow_run_id", flow_run.id))
    get_run_logger().info("run %s in %s", folder.run_id, folder.root)
    artifacts: dict[str, Artifact] = {}
    try:
        graph = schemas.stages.GRAPH
        for stage in graph.plan(config):
            artifacts[stage.produces] = _stage_task(stage)(folder.run_id, config,
                                                           {name: artifacts[name] for name in graph.consumed(stage, config)})
    except BaseException as exc:  # a failed stage recorded itself; whatever else failed, the run is not running
        runner.fail_run(folder, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    runner.finish_run(folder)
    return folder.run_id


class _NoInputErrorTraceback(logging.Filter):
    """A DigitsInputError is the user's to fix, a ServiceUnavailable names the server: log the message,
    not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (DigitsInputError, ServiceUnavailable, OutOfSpace)):
            record.exc_info, record.exc_text = None, None
        return True


def _one_line_input_errors(filterer: logging.Filterer) -> None:
    """Put the no-traceback filter on a logger or handler, once."""
    if not any(isinstance(f, _NoInputErrorTraceback) for f in filterer.filters):
        filterer.addFilter(_NoInputErrorTraceback())


# A flow run outside the CLI (a Prefect worker's flow-run process imports this module to load the flow) logs
# its failure through these loggers, to the console and to the API: the user's errors in one line there too.
for _name in ("prefect.flow_runs", "prefect.task_runs"):
    _one_line_input_errors(logging.getLogger(_name))


class _CurrentStdout:
    """Writes to whatever sys.stdout is at the time of writing (callers and tests may swap it)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return sys.stdout.isatty()


def console_logs_to_stdout() -> None:
    """Send Prefect's console log lines to stdout (they are progress), keeping stderr for errors."""
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler":
            stream = _CurrentStdout()
            handler.setStream(stream)
            handler.console.file = stream
            _one_line_input_errors(handler)
