"""The Prefect flow `digits`: one task per stage of schemas.stages.GRAPH, in pipeline order, each
handed the artifacts it consumes by name.

Every task runs its stage through the stage runner (flows.runner) — the same calls the CLI's per-stage
commands make — so a Prefect run and a direct run write identical run folders, reuse the same outputs
(a reused stage shows as `Cached` in Prefect), and publish what each artifact declares as Prefect
artifacts (the validation table and Data Docs link, the evaluation summary, the registry version, the
submission).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

import schemas.stages
from flows import runner, setup, stages
from schemas.artifacts import Artifact
from schemas.config import PipelineConfig
from schemas.errors import DigitsInputError
from schemas.runs import RunFolder, digits_home
from schemas.stages import Stage


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
    """The artifact's publications as Prefect artifacts of the running task; a link to what a registry version keeps
    goes to the version's page in the MLflow UI when a tracking server is configured."""
    import dataclasses

    from components.tracking import tracking_uri, ui_link

    for item in artifact.publications():
        page = ui_link(tracking_uri(digits_home()), item.registry_uri) if item.registry_uri else None
        _PUBLISHERS[item.kind](dataclasses.replace(item, content=page) if page else item)


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

    setup.one_line_errors()
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
        _publish_summary(folder)
        raise
    runner.finish_run(folder)
    _publish_summary(folder)
    return folder.run_id


def _publish_summary(folder: RunFolder) -> None:
    """The run's summary (components.run_page.summary) as the flow run's markdown artifact `run-summary`."""
    from components import run_page

    try:
        lines = run_page.summary(folder)
        create_markdown_artifact(key="run-summary", markdown="\n".join(f"- {line}" for line in lines),
                                 description=f"what run {folder.run_id} did")
    except Exception as exc:  # the summary never fails a run, nor hides why it failed
        get_run_logger().warning("no run summary: %s", exc)
