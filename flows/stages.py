"""Run a stage into its run folder atomically and record it in run.json. No Prefect here: the CLI's
per-stage commands call these directly; the Prefect tasks in flows.pipeline wrap the same calls.

A stage writes into `<run>/.<stage>.tmp-<id>/` and that folder is renamed to `<run>/<stage>/` only
when the stage returned; a failed or killed stage leaves no `<stage>/` folder a later stage could read.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

from components import convert as convert_component
from components import ingest as ingest_component
from components import validate as validate_component
from components.tracking import Tracking, tracking_uri
from schemas.artifacts import Artifact, Converted, Evaluation, Examples, Exported, Trained, Validation
from schemas.config import CHAMPION_OF_MNIST, SCRATCH, FailOn, PipelineConfig
from schemas.errors import DigitsInputError, ValidationFailed
from schemas.examples import MANIFEST
from schemas.runs import STAGES, RunFolder, RunRecord, StageRecord, digits_home, link_or_copy, list_runs, utc_now

A = TypeVar("A", bound=Artifact)
Progress = Callable[[str], None]


def execute(folder: RunFolder, stage: str, body: Callable[[Path], A], *, resumable: bool = False) -> A:
    """Run body(temp_dir) and rename temp_dir to the stage folder when it returns; record the outcome.

    resumable: the temp folder is `.<stage>.inprogress` and survives a failed or killed attempt, so the
    next attempt's body can continue from what it left (training checkpoints); it is still renamed
    into place only when the body returns, and no later stage reads it.
    """
    final = folder.stage_dir(stage)
    for stale in folder.root.glob(f".{stage}.tmp-*"):  # left by a killed process; never read
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.root / (f".{stage}.inprogress" if resumable else f".{stage}.tmp-{uuid.uuid4().hex[:8]}")
    folder.update(lambda r: _mark(r, stage, StageRecord(status="running", started_at=utc_now())))
    started = time.perf_counter()
    try:
        artifact = body(tmp)
        if final.exists():  # a re-run replaces the old output: move it aside, then swap
            old = folder.root / f".{stage}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        seconds = round(time.perf_counter() - started, 3)

        def failed(record: RunRecord) -> None:
            stage_record = record.stages[stage]
            stage_record.status, stage_record.error = "failed", message
            stage_record.finished_at, stage_record.seconds = utc_now(), seconds
            record.status = "failed"

        folder.update(failed)
        raise
    artifact = artifact.moved_to(final)
    seconds = round(time.perf_counter() - started, 3)

    def completed(record: RunRecord) -> None:
        stage_record = record.stages[stage]
        stage_record.status, stage_record.finished_at, stage_record.seconds = "completed", utc_now(), seconds
        stage_record.outputs = artifact.summary()
        if isinstance(artifact, Examples):
            record.data_fingerprints.update(artifact.fingerprints)
        _stale_after(record, stage)

    folder.update(completed)
    return artifact


def _stale_after(record: RunRecord, stage: str) -> None:
    """A stage run again makes the completed stages after it stale: they were made from its old output.
    Their folders stay (nothing is lost) but no later stage reads them, and a resumed run re-runs them."""
    for later in STAGES[STAGES.index(stage) + 1:]:
        later_record = record.stages.get(later)
        if later_record is not None and later_record.status == "completed":
            later_record.status, later_record.error = "stale", f"{stage} was run again after it"
            if later == "evaluate":  # its gate decision no longer stands: a resumed run decides again
                record.registry_version = record.promoted = record.promotion_reason = None


def _mark(record: RunRecord, stage: str, stage_record: StageRecord) -> None:
    record.stages[stage] = stage_record
    record.status = "running"


def start_run(config: PipelineConfig) -> RunFolder:
    """Create a new run folder with the resolved config recorded."""
    return RunFolder.create(config.pipeline.value, config.model_dump(mode="json"))


def finish_run(folder: RunFolder) -> RunRecord:
    """Mark the run completed (with warnings when a stage recorded any)."""
    def done(record: RunRecord) -> None:
        record.status = "completed_with_warnings" if record.warnings else "completed"
    return folder.update(done)


def config_of(folder: RunFolder) -> PipelineConfig:
    return PipelineConfig.model_validate(folder.load().config)


def ingest(folder: RunFolder, config: PipelineConfig, progress: Progress = lambda _: None) -> Examples:
    """The ingest stage of a run."""
    tfds_dir = Path(config.ingest.tfds_data_dir).expanduser() if config.ingest.tfds_data_dir else digits_home() / "tfds"
    return execute(folder, "ingest", lambda out: ingest_component.run(
        config.source, config.ingest, out, tfds_dir=tfds_dir, progress=progress))


def examples_of(folder: RunFolder) -> Examples:
    """The completed ingest output of a run. Raises DigitsInputError when there is none."""
    return _output_of(folder, "ingest", Examples, "completed ingest")


def _output_of(folder: RunFolder, stage: str, kind: type[A], what: str) -> A:
    """A completed stage's artifact, for a later stage: never one that failed or is half-written."""
    record = folder.load().stages.get(stage)
    if record is not None and record.status == "stale":
        command = "train" if stage == "transfer" else stage  # `digits train` runs transfer too
        raise DigitsInputError(f"run {folder.run_id}'s {stage} stage is stale ({record.error}): run "
                               f"`digits {command} --run {folder.run_id}`, or `digits resume {folder.run_id}`")
    if record is None or record.status != "completed" or not folder.stage_dir(stage).is_dir():
        raise DigitsInputError(f"run {folder.run_id} has no {what} stage")
    return kind.load(folder.stage_dir(stage), record.outputs)


def validate(folder: RunFolder, config: PipelineConfig, examples: Examples,
             progress: Progress = lambda _: None) -> Validation:
    """The validate stage, then its gate: failed expectations stop the run unless validate.fail_on=warn.

    The stage folder (results.json, Data Docs) is kept either way: a failing run's report is the one
    people most need to open.
    """
    validation = execute(folder, "validate", lambda out: validate_component.run(
        examples, config.validate_, out, limit=config.ingest.limit, progress=progress))
    if validation.passed:
        return validation
    summary = f"{len(validation.failures)} of {validation.evaluated} expectations failed"
    if config.validate_.fail_on is FailOn.warn:
        folder.update(lambda r: r.warnings.extend(f"validate: {f}" for f in validation.failures))
        return validation

    def refused(record: RunRecord) -> None:
        record.stages["validate"].status = "failed"
        record.stages["validate"].error = summary
        record.status = "failed"

    folder.update(refused)
    raise ValidationFailed(f"validation failed ({summary}; report: {validation.report}): "
                           + "; ".join(validation.failures))


def validation_of(folder: RunFolder) -> Validation:
    """The validate output of a run that a later stage may use: passed, or let through with warn."""
    return _output_of(folder, "validate", Validation, "passed validate")


def convert(folder: RunFolder, config: PipelineConfig, progress: Progress = lambda _: None) -> Converted:
    """The convert stage: TFRecord shards of a validated dataset.

    Idempotent: when this run, or any other run under the same home, already converted the same
    canonical data with the same split and sharding (equal cache keys), its shards are reused —
    this run's own stage as it is, another run's by hard links — instead of running Beam again.
    """
    examples = examples_of(folder)
    validation_of(folder)  # only data that passed validation (or was let through with warn) is converted
    progress("fingerprinting the canonical data")
    input_fp = convert_component.input_fingerprint(examples)
    key = convert_component.cache_key(input_fp, config.convert, config.seed)
    done = _completed_convert(folder)
    if done is not None and done.cache_key == key:
        progress(f"already converted: {done.dir}")
        return done
    earlier = next((c for c in map(_completed_convert, reversed(list_runs())) if c is not None and c.cache_key == key), None)
    if earlier is not None:
        return execute(folder, "convert", lambda out: convert_component.reuse(earlier, out, progress=progress))
    return execute(folder, "convert", lambda out: convert_component.run(
        examples, config.convert, config.seed, out, input_fp=input_fp, progress=progress))


def _completed_convert(folder: RunFolder) -> Converted | None:
    try:
        converted = converted_of(folder)
    except (DigitsInputError, OSError, ValueError):
        return None
    return converted if (converted.dir / MANIFEST).is_file() else None


def converted_of(folder: RunFolder) -> Converted:
    """The completed TFRecords of a run, for training and evaluation; never a partial conversion."""
    return _output_of(folder, "convert", Converted, "completed convert")


def model_stage(config: PipelineConfig) -> str:
    """The stage that makes a run's model: `train` from scratch, or `transfer` from transfer.base."""
    return "train" if config.transfer.base == SCRATCH else "transfer"


def train(folder: RunFolder, config: PipelineConfig, progress: Progress = lambda _: None) -> Trained:
    """The model stage, resumable: an attempt killed after epoch k continues at epoch k + 1 when run again
    (same data, seed and config); its MLflow run continues too. With transfer.base set (train-noisy's
    default) this is the transfer stage."""
    if model_stage(config) == "transfer":
        return transfer(folder, config, progress)
    from components import train as train_component

    converted = converted_of(folder)
    tracking = _tracking(folder, config, converted, "train")
    return execute(folder, "train", lambda out: train_component.run(
        converted, config.train, config.seed, out, tracking=tracking, progress=progress), resumable=True)


def transfer(folder: RunFolder, config: PipelineConfig, progress: Progress = lambda _: None) -> Trained:
    """The transfer stage: fine-tune transfer.base (default for train-noisy: the clean-MNIST champion)
    on this run's train split; resumable like train."""
    import tempfile

    from components import transfer as transfer_component

    converted = converted_of(folder)
    tracking = _tracking(folder, config, converted, "transfer")
    with tempfile.TemporaryDirectory(prefix="digits-base-") as scratch:
        base_file, base_ref = _base_model(config.transfer.base, Path(scratch), progress)
        return execute(folder, "transfer", lambda out: transfer_component.run(
            converted, config.train, config.transfer, base_file, base_ref, config.seed, out, tracking=tracking,
            progress=progress), resumable=True)


def _base_model(base: str, scratch: Path, progress: Progress) -> tuple[Path, str]:
    """(local .keras file, pinned reference) of transfer.base: a registry URI resolved to its version now."""
    if base.startswith("models:/"):
        reg = registry()
        try:
            version = reg.resolve(base)
        except DigitsInputError as exc:
            hint = ("run `digits run train-mnist` first" if base == CHAMPION_OF_MNIST
                    else "register one or name another model")
            raise DigitsInputError(f"no model to fine-tune: {exc}; {hint}, or set --set transfer.base=scratch "
                                   "to train from random weights") from None
        progress(f"fetching {base}: {version.name} version {version.version}")
        model_file = reg.download(version, scratch)
        if model_file.suffix != ".keras":
            raise DigitsInputError(f"{base} is a {model_file.suffix} model; only Keras models can be fine-tuned")
        return model_file, f"models:/{version.name}/{version.version}"
    path = Path(base).expanduser()
    if path.suffix != ".keras" or not path.is_file():
        raise DigitsInputError(f"transfer.base '{base}': no such .keras file (expected 'scratch', "
                               "models:/NAME@ALIAS, models:/NAME/VERSION or a .keras file)")
    return path, str(path.resolve())


def _tracking(folder: RunFolder, config: PipelineConfig, converted: Converted, stage: str) -> Tracking:
    home = digits_home()
    record = folder.load()
    return Tracking(tracking_uri(home), f"digits-{config.source.value}", folder.run_id,
                    tags={"digits.run_id": folder.run_id, "digits.pipeline": config.pipeline.value,
                          "digits.stage": stage, "digits.code_version": record.code_version,
                          "digits.data_fingerprint": converted.fingerprint},
                    artifact_root=home / "mlartifacts")


def trained_of(folder: RunFolder) -> Trained:
    """The completed model of a run (train or transfer stage); never an interrupted training's checkpoints."""
    stages = folder.load().stages
    done = [name for name in ("train", "transfer") if name in stages and stages[name].status == "completed"]
    stage = done[0] if len(done) == 1 else model_stage(config_of(folder))
    return _output_of(folder, stage, Trained, f"completed {stage}")


def registry() -> "Registry":
    from components.registry import Registry

    home = digits_home()
    return Registry(tracking_uri(home), home)


def evaluate(folder: RunFolder, config: PipelineConfig, progress: Progress = lambda _: None) -> Evaluation:
    """The evaluate stage: metrics, pictures, robustness and the gate, with the registry's current
    champion re-measured on this run's validation split."""
    import tempfile

    from components import evaluate as evaluate_component
    from components.registry import model_name

    trained, converted = trained_of(folder), converted_of(folder)
    name = model_name(config.source.value)
    reg = registry()
    current = reg.champion(name)
    with tempfile.TemporaryDirectory(prefix="digits-champion-") as scratch:
        champion = None
        if current is not None:
            progress(f"fetching the champion, {name} version {current.version}")
            champion = evaluate_component.Champion(current.version, reg.download(current, Path(scratch)))
        evaluation = execute(folder, "evaluate", lambda out: evaluate_component.run(
            trained, converted, out, threshold=config.threshold, champion=champion, progress=progress))

    folder.update(lambda run: run.metrics.update({"val_accuracy": evaluation.val_accuracy,
                                                  "gate_passed": evaluation.passed}))
    return evaluation


def evaluation_of(folder: RunFolder) -> Evaluation:
    return _output_of(folder, "evaluate", Evaluation, "completed evaluate")


def register(folder: RunFolder, config: PipelineConfig, evaluation: Evaluation,
             progress: Progress = lambda _: None) -> tuple[str | None, bool]:
    """Push a gate-passing model to the registry as a new version of digits-<source> and make it champion.

    The champion is read again under the registry lock: when another promotion replaced the one this
    run was measured against, the new champion is measured on this run's validation data first.
    A refused model is logged to its MLflow run only. Returns (version or None, promoted).
    """
    import tempfile

    from components import evaluate as evaluate_component
    from components.registry import model_name

    trained, converted = trained_of(folder), converted_of(folder)
    name = model_name(config.source.value)
    reg = registry()
    if not evaluation.passed:
        progress(f"not registered: {evaluation.reason}")
        if trained.mlflow_run_id:
            reg.log_model(trained.mlflow_run_id, trained.path)
        _record_promotion(folder, None, False, evaluation.reason)
        return None, False
    reason = evaluation.reason

    def gate(current) -> bool:
        nonlocal reason
        if current is None or current.version == evaluation.champion_version:
            return True
        from schemas import examples as ex

        with tempfile.TemporaryDirectory(prefix="digits-champion-") as scratch:
            accuracy = evaluate_component.accuracy_on(reg.download(current, Path(scratch)),
                                                      ex.load(converted.files("val")))
        decision = evaluate_component.decide(evaluation.val_accuracy, config.threshold,
                                             evaluate_component.Champion(current.version, Path()), accuracy)
        reason = decision["reason"] + " (champion replaced during this run)"
        return decision["passed"]

    record = folder.load()
    tags = {"digits.run_id": folder.run_id, "digits.pipeline": config.pipeline.value,
            "digits.code_version": record.code_version, "digits.data_fingerprint": converted.fingerprint,
            "digits.val_accuracy": f"{evaluation.val_accuracy:.6f}", "digits.model": trained.model,
            "digits.evaluation_report": str(evaluation.report),
            "digits.validation_report": str(folder.stage_dir("validate") / "index.html"),
            **({"digits.base": trained.base, "digits.transfer_mode": trained.transfer_mode} if trained.base else {}),
            **{f"digits.input.{Path(k).name}": v for k, v in record.data_fingerprints.items()}}
    version, promoted = reg.register(name, trained.mlflow_run_id, trained.path, tags, gate)
    progress(f"registered {name} version {version.version}" + (" as champion" if promoted else ", not champion"))
    _record_promotion(folder, version.version, promoted, reason)
    return version.version, promoted


def _record_promotion(folder: RunFolder, version: str | None, promoted: bool, reason: str) -> None:
    def record(run: RunRecord) -> None:
        run.registry_version = int(version) if version else None
        run.promoted, run.promotion_reason = promoted, reason
    folder.update(record)


def export(folder: RunFolder, config: PipelineConfig, progress: Progress = lambda _: None) -> Exported:
    """The export stage: submission.csv for the test split, SavedModel + .keras, infra-validated in a
    fresh process before the stage folder appears."""
    from components import export as export_component

    trained, converted = trained_of(folder), converted_of(folder)
    return execute(folder, "export", lambda out: export_component.run(
        trained, converted, out, seed=config.seed, progress=progress))


def exported_of(folder: RunFolder) -> Exported:
    return _output_of(folder, "export", Exported, "completed export")


# --- re-runs: cache keys across runs, completed stages within a run -------------------------------

CACHE_FORMAT = 1  # bump when a cached stage's output changes meaning, so old cache entries stop matching


def cache_keys(config: PipelineConfig) -> dict[str, str | None]:
    """Keys of ingest, validate and convert for this config: equal keys, equal outputs.

    They chain from the input data's content fingerprint (not its path), so a re-run on the same
    data with the same settings finds the earlier run's outputs; None (no caching) when the input is
    a download whose content is unknown beforehand.
    """
    import hashlib
    import json

    def key(*parts) -> str:
        return hashlib.sha256(json.dumps([CACHE_FORMAT, *parts], sort_keys=True, default=str).encode()).hexdigest()

    data = ingest_component.source_fingerprint(config.source, config.ingest)
    if data is None:
        return {"ingest": None, "validate": None, "convert": None}
    ingest_key = key("ingest", config.source.value, data,
                     config.ingest.model_dump(mode="json", exclude={"data", "tfds_data_dir"}))
    validate_key = key("validate", ingest_key, config.validate_.model_dump(mode="json"))
    convert_key = key("convert", validate_key, config.seed, config.convert.val_fraction, config.convert.rows_per_shard)
    return {"ingest": ingest_key, "validate": validate_key, "convert": convert_key}


class StaleCache(Exception):
    """A cached stage output whose folder is gone (its run was deleted): the stage must run again."""


def adopt(folder: RunFolder, stage: str, artifact: A) -> A:
    """Make a stage output computed by another run (a cache hit) this run's own: its folder is
    hard-linked into this run (no copy of the data) and the stage recorded as completed, with
    `cached_from`. An output already in this run is returned as it is."""
    if artifact.dir.resolve() == folder.stage_dir(stage).resolve():
        return artifact
    if not artifact.dir.is_dir():
        raise StaleCache(f"{artifact.dir} is gone")

    def link(out: Path) -> A:
        shutil.copytree(artifact.dir, out, copy_function=link_or_copy)
        return artifact.moved_to(out)

    adopted = execute(folder, stage, link)

    def note(run: RunRecord) -> None:
        run.stages[stage].outputs["cached_from"] = str(artifact.dir)
        if isinstance(adopted, Validation) and not adopted.passed:  # let through with validate.fail_on=warn
            run.warnings.extend(f"validate: {f}" for f in adopted.failures)

    folder.update(note)
    return adopted


def completed(folder: RunFolder, stage: str, kind: type[A]) -> A | None:
    """The stage's output when this run already completed it (a resumed run skips it), else None."""
    try:
        return _output_of(folder, stage, kind, f"completed {stage}")
    except DigitsInputError:
        return None


def run_for_flow_run(config: PipelineConfig, flow_run_id: str | None) -> RunFolder:
    """The run folder of a Prefect flow run: the one it made in an earlier attempt (a retried flow
    run resumes there; the flow records its id in run.json), else a new one."""
    if flow_run_id:
        for folder in reversed(list_runs()):
            if folder.load().prefect_flow_run_id == flow_run_id:
                return folder
    return start_run(config)
