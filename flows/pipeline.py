"""The Prefect flow `digits`: one task per stage, chained in pipeline order.

Tasks wrap the same stage calls the CLI's per-stage commands use (flows.stages), so a Prefect run
and a direct run write identical run folders.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral API's first start in a fresh PREFECT_HOME (database migrations) took 8-19 s on a busy
# 2-core machine here, against Prefect's default limit of 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE, CachePolicy  # noqa: E402

from flows import stages  # noqa: E402
from schemas.artifacts import Converted, Evaluation, Examples, Exported, Trained, Validation  # noqa: E402
from schemas.config import PipelineConfig  # noqa: E402
from schemas.errors import DigitsInputError, ServiceUnavailable  # noqa: E402
from schemas.runs import RunFolder, digits_home  # noqa: E402


def _folder(run_id: str) -> RunFolder:
    return RunFolder.open(run_id, digits_home())


def _by_cache_key(context, parameters: dict) -> str | None:
    """Cache key of ingest, validate and convert: the `cache_key` argument (see stages.cache_keys)."""
    return parameters.get("cache_key")


_BY_CACHE_KEY = CachePolicy.from_cache_key_fn(_by_cache_key)


def _transient(task, task_run, state) -> bool:
    """Retry only what may pass on a second try: not bad input, which fails the same way again."""
    try:
        state.result()
    except DigitsInputError:
        return False
    except Exception:  # a network share, a download, a registry server: may recover
        return True
    return False


@task(name="ingest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def ingest_task(run_id: str, config: PipelineConfig, cache_key: str | None) -> Examples:
    """Read the source into canonical Parquet (+ EDA). Cached by the input data's content fingerprint."""
    logger = get_run_logger()
    return stages.ingest(_folder(run_id), config, progress=logger.info)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(run_id: str, config: PipelineConfig, examples: Examples, cache_key: str | None) -> Validation:
    """Great Expectations suites, Data Docs, then the gate. Cached by input fingerprint + settings."""
    logger = get_run_logger()
    return stages.validate(_folder(run_id), config, examples, progress=logger.info)


@task(name="convert", cache_policy=NO_CACHE)
def convert_task(run_id: str, config: PipelineConfig, validation: Validation, cache_key: str | None) -> Converted:
    """Beam: stratified train/val split + test, sharded gzip TFRecords with a manifest. Cached likewise."""
    logger = get_run_logger()
    return stages.convert(_folder(run_id), config, progress=logger.info)


def _cached_stage(task_, stage: str, kind, folder: RunFolder, key: str | None, *args):
    """Run a cacheable stage's task: a run that already completed the stage skips it; otherwise the
    task runs with the cache key, and an output cached by another run (Prefect state Cached) is
    adopted into this run (hard links). Results persist under $DIGITS_HOME/prefect-results."""
    logger = get_run_logger()
    done = _skip_if_done(folder, stage, kind)
    if done is not None:
        return done
    cached = task_.with_options(cache_policy=_BY_CACHE_KEY, persist_result=True,
                                result_storage=digits_home() / "prefect-results")
    try:
        return stages.adopt(folder, stage, cached(folder.run_id, *args, key))
    except stages.StaleCache as gone:
        logger.info("%s: the cached output's folder is gone (%s); running it again", stage, gone)
        return stages.adopt(folder, stage, cached.with_options(refresh_cache=True)(folder.run_id, *args, key))


@task(name="train", cache_policy=NO_CACHE)
def train_task(run_id: str, config: PipelineConfig, converted: Converted) -> Trained:
    """Keras training with per-epoch checkpoints; a re-run of a killed flow resumes at the next epoch."""
    logger = get_run_logger()
    return stages.train(_folder(run_id), config, progress=logger.info)


@task(name="transfer", cache_policy=NO_CACHE)
def transfer_task(run_id: str, config: PipelineConfig, converted: Converted) -> Trained:
    """Fine-tune transfer.base (train-noisy: the clean-MNIST champion) with per-epoch checkpoints."""
    logger = get_run_logger()
    return stages.transfer(_folder(run_id), config, progress=logger.info)


@task(name="export", cache_policy=NO_CACHE)
def export_task(run_id: str, config: PipelineConfig, trained: Trained) -> Exported:
    """Submission CSV, SavedModel + .keras, infra-validated in a fresh process; links the submission."""
    logger = get_run_logger()
    exported = stages.export(_folder(run_id), config, progress=logger.info)
    create_link_artifact(key="submission", link=exported.submission_path.as_uri(), link_text="submission.csv",
                         description=f"{exported.test_rows:,} test rows, ImageId,Label (run {run_id})")
    return exported


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(run_id: str, config: PipelineConfig, trained: Trained) -> Evaluation:
    """Metrics, pictures, robustness and the gate against the champion; publishes a markdown summary."""
    logger = get_run_logger()
    evaluation = stages.evaluate(_folder(run_id), config, progress=logger.info)
    champion = (f"champion version {evaluation.champion_version}: {evaluation.champion_val_accuracy:.4%} on the same data"
                if evaluation.champion_version else "no champion yet")
    create_markdown_artifact(key="evaluation-summary", description=f"evaluation of run {run_id}", markdown=(
        f"## Evaluation of run `{run_id}`\n\n| | |\n|---|---|\n| model | `{trained.model}` |\n"
        f"| val_accuracy | **{evaluation.val_accuracy:.4%}** |\n| threshold | {evaluation.threshold:.2%} |\n"
        f"| champion | {champion} |\n| gate | **{'passed' if evaluation.passed else 'refused'}** |\n\n"
        f"{evaluation.reason}\n\nReport: `{evaluation.report}`\n"))
    return evaluation


@task(name="register", cache_policy=NO_CACHE)
def register_task(run_id: str, config: PipelineConfig, evaluation: Evaluation) -> tuple[str | None, bool]:
    """Registry push: a new version of digits-<source> when the gate passed, champion when it still wins."""
    logger = get_run_logger()
    version, promoted = stages.register(_folder(run_id), config, evaluation, progress=logger.info)
    if version:
        create_link_artifact(key="registry-version", link=f"models:/digits-{config.source.value}/{version}",
                             link_text=f"digits-{config.source.value} version {version}",
                             description="champion" if promoted else "registered, not champion")
    return version, promoted


def _publish_validation(folder: RunFolder) -> None:
    results = folder.stage_dir("validate") / "results.json"
    if not results.is_file():
        return
    report = json.loads(results.read_text())
    create_table_artifact(
        key="validation-results", description=f"Great Expectations results of run {folder.run_id}",
        table=[{k: str(r[k]) for k in ("batch", "expectation", "column", "success", "observed", "intent")}
               for r in report["results"]])
    create_link_artifact(key="validation-report", link=(folder.stage_dir("validate") / "index.html").as_uri(),
                         link_text="Data Docs", description=f"validation report of run {folder.run_id}")


@flow(name="digits", log_prints=True)
def digits(config: PipelineConfig, run_id: str | None = None) -> str:
    """Run the pipeline `config.pipeline` end to end; returns the run id.

    run_id names a run folder already created for this run (the CLI creates it to print its path
    first, `digits resume` passes an earlier one); None: the folder of this Prefect flow run (a retried
    flow run resumes in the folder of its first attempt), or a new one.

    Stages this run already completed are skipped, so a failed run re-run after its cause is fixed
    resumes at the failed stage (training at its last checkpoint). Ingest, validate and convert are
    also cached across runs by the input data's content fingerprint and their settings.
    """
    from prefect.runtime import flow_run

    folder = _folder(run_id) if run_id else stages.run_for_flow_run(config, flow_run.id)
    if folder.load().prefect_flow_run_id is None and flow_run.id:
        folder.update(lambda record: setattr(record, "prefect_flow_run_id", flow_run.id))
    logger = get_run_logger()
    logger.info("run %s in %s", folder.run_id, folder.root)
    keys = stages.cache_keys(config)
    examples = _cached_stage(ingest_task, "ingest", Examples, folder, keys["ingest"], config)
    logger.info("ingested %s", ", ".join(f"{split} {n:,} rows" for split, n in examples.counts.items()))
    try:
        validation = _cached_stage(validate_task, "validate", Validation, folder, keys["validate"], config, examples)
    finally:
        _publish_validation(folder)
    logger.info("validation %s: %s", "passed" if validation.passed else "failed (warn)", validation.report)
    converted = _cached_stage(convert_task, "convert", Converted, folder, keys["convert"], config, validation)
    logger.info("converted %s into %s", ", ".join(f"{s} {n:,}" for s, n in converted.counts.items()), converted.dir)

    stage = stages.model_stage(config)
    trained = _skip_if_done(folder, stage, Trained) or (transfer_task if stage == "transfer" else train_task)(
        folder.run_id, config, converted)
    logger.info("trained %s%s: val_accuracy %.2f%% (%s)", trained.model,
                f" from {trained.base} ({trained.transfer_mode})" if trained.base else "",
                100 * trained.val_accuracy, trained.path)
    evaluation = _skip_if_done(folder, "evaluate", Evaluation) or evaluate_task(folder.run_id, config, trained)
    record = folder.load()
    if record.promotion_reason is not None:
        version, promoted = (str(record.registry_version) if record.registry_version else None), bool(record.promoted)
    else:
        version, promoted = register_task(folder.run_id, config, evaluation)
    logger.info("gate %s: %s", "passed" if evaluation.passed else "refused", evaluation.reason)
    if version:
        logger.info("registered digits-%s version %s%s", config.source.value, version, " (champion)" if promoted else "")
    exported = _skip_if_done(folder, "export", Exported) or export_task(folder.run_id, config, trained)
    logger.info("exported %s (%s test rows) and %s", exported.submission_path, f"{exported.test_rows:,}",
                exported.dir / exported.model)
    stages.finish_run(folder)
    return folder.run_id


def _skip_if_done(folder: RunFolder, stage: str, kind):
    done = stages.completed(folder, stage, kind)
    if done is not None:
        get_run_logger().info("%s: already completed in this run, skipped", stage)
    return done


class _NoInputErrorTraceback(logging.Filter):
    """A DigitsInputError is the user's to fix, a ServiceUnavailable names the server: log the message,
    not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (DigitsInputError, ServiceUnavailable)):
            record.exc_info, record.exc_text = None, None
        return True


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
            if not any(isinstance(f, _NoInputErrorTraceback) for f in handler.filters):
                handler.addFilter(_NoInputErrorTraceback())
