"""The stages' functions: what each stage of schemas.stages.GRAPH does, on the artifacts it consumes.

Each is `stage(folder, config, out, progress, **inputs) -> Artifact`: it calls its component with the
config section it needs and the upstream artifacts it was handed, writing into `out` (flows.runner
runs it, renames `out` into place and records it). The `after` hooks record run-level facts once a
stage's output is in place. No Prefect here.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Callable

from components import convert as convert_component
from components import ingest as ingest_component
from components import validate as validate_component
from components.registration import tag as lineage_tag
from components.registry import MODEL_SHA256, Registry, model_name
from components.tracking import Tracking, tracking_uri
from schemas.artifacts import (Converted, Evaluation, Examples, Exported, Registration, Reviewed, Trained, Tuned,
                              Validation)
from schemas.config import ENSEMBLE_FIELDS, FailOn, PipelineConfig
from schemas.errors import DigitsInputError, LabelHealthFailed, ValidationFailed
from schemas.runs import RunFolder, RunRecord, digits_home, list_runs
from schemas.sources import CHAMPION_OF_MNIST

Progress = Callable[[str], None]


def start_run(config: PipelineConfig) -> RunFolder:
    """Create a new run folder with the resolved config recorded."""
    return RunFolder.create(config.pipeline.value, config.model_dump(mode="json"))


def config_of(folder: RunFolder) -> PipelineConfig:
    return PipelineConfig.model_validate(folder.load().config)


def registry() -> Registry:
    """The registry of this digits home: MLflow's at MLFLOW_TRACKING_URI, else SQLite under $DIGITS_HOME."""
    from components.registry.mlflow import MlflowRegistry

    home = digits_home()
    return MlflowRegistry(tracking_uri(home), home)


# --- ingest -----------------------------------------------------------------------------------------

def ingest(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress) -> Examples:
    """Read the source named by the pipeline from ingest.data into canonical Parquet + EDA."""
    tfds_dir = Path(config.ingest.tfds_data_dir).expanduser() if config.ingest.tfds_data_dir else digits_home() / "tfds"
    return ingest_component.run(config.source, config.ingest, out, tfds_dir=tfds_dir, progress=progress,
                                dask_address=config.dask.address)


def data_fingerprint(config: PipelineConfig) -> str | None:
    """sha256 of the bytes ingest will read (not their path); None for a download."""
    return ingest_component.source_fingerprint(config.source, config.ingest)


# --- validate ---------------------------------------------------------------------------------------

def validate(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress, *,
             examples: Examples) -> Validation:
    """Great Expectations suites + Data Docs on the ingested examples (the gate is validation_gate)."""
    return validate_component.run(examples, config.validate_, out, limit=config.ingest.limit, progress=progress,
                                  dask_address=config.dask.address)


def validation_gate(folder: RunFolder, config: PipelineConfig, validation: Validation) -> None:
    """Failed expectations stop the run before conversion unless validate.fail_on=warn, which records them
    as warnings. The stage folder (results.json, Data Docs) stays either way: a failing run's report is
    the one people most need to open."""
    if validation.passed:
        return
    if config.validate_.fail_on is FailOn.warn:
        folder.update(lambda r: r.warnings.extend(f"validate: {f}" for f in validation.failures))
        return
    raise ValidationFailed(f"validation failed ({len(validation.failures)} of {validation.evaluated} expectations "
                           f"failed; report: {validation.report}): " + "; ".join(validation.failures))


# --- convert ----------------------------------------------------------------------------------------

def convert(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress, *,
            examples: Examples, validation: Validation) -> Converted:
    """TFRecord shards of the examples that validation let through (passed, or warn)."""
    return convert_component.run(examples, config.convert, config.seed, out, dask_address=config.dask.address,
                                 progress=progress)


# --- review -----------------------------------------------------------------------------------------

def review(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress, *,
           converted: Converted) -> Reviewed:
    """review.enabled: labels that are probably wrong, by confident learning on K-fold out-of-sample
    probabilities (components.review); the gate on their estimated share is review_gate."""
    from components import review as review_component

    return review_component.run(converted, config.review, config.seed, out,
                                tracking=_tracking(folder, config, converted, "review"), progress=progress)


def review_gate(folder: RunFolder, config: PipelineConfig, reviewed: Reviewed) -> None:
    """Label health: an estimated share of wrong train/val labels above review.fail_share stops the run; above
    review.warn_share it is a warning of the run."""
    share = reviewed.estimated_wrong_share
    if share is None or share != share:
        return
    said = (f"an estimated {share:.2%} of the train/val labels are wrong ({reviewed.suspects:,} suspects of "
            f"{reviewed.images:,}; report: {reviewed.report})")
    if config.review.fail_share is not None and share > config.review.fail_share:
        raise LabelHealthFailed(f"label review: {said}, above review.fail_share={config.review.fail_share:g}: fix "
                                f"them with --set ingest.review=PATH (edit {reviewed.decisions})")
    if share > config.review.warn_share:
        folder.update(lambda r: r.warnings.append(f"review: {said}, above review.warn_share="
                                                  f"{config.review.warn_share:g}"))


# --- tune -------------------------------------------------------------------------------------------

def tune(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress, *,
         converted: Converted) -> Tuned:
    """tune.trials > 0: an Optuna study over tune.space; the train stage uses its best settings. The study is
    named after the run and what it searches, so a killed tune resumes with its finished trials."""
    import hashlib

    from components import tune as tune_component

    searched = json.dumps([converted.fingerprint, config.seed, config.tune.model_dump(mode="json", exclude={"workers"}),
                           config.train.model_dump(mode="json", exclude=set(ENSEMBLE_FIELDS))],
                          sort_keys=True)
    study = f"{folder.run_id}-tune-{hashlib.sha256(searched.encode()).hexdigest()[:12]}"
    execute = _executor(config, config.tune.workers, progress, flow_name="tune-trials", task_name="tune-trial",
                        what="trials")
    return tune_component.run(converted, config.tune, config.train, config.seed, out, study=study,
                              storage=tune_component.storage_url(config.tune, digits_home()), execute=execute,
                              tracking=_tracking(folder, config, converted, "tune"), progress=progress)


def tuned(config: PipelineConfig, tuning: Tuned | None, progress: Progress) -> PipelineConfig:
    """The run's config with the tune stage's best train settings in it (as is without a tune stage)."""
    if tuning is None:
        return config
    chosen = ", ".join(f"train.{k}={v:.4g}" if isinstance(v, float) else f"train.{k}={v}"
                       for k, v in tuning.best_params.items())
    progress(f"training with the tuned settings (best of {tuning.trials} trials): {chosen}")
    return config.model_copy(update={"train": config.train.model_copy(update=tuning.best_params)})


# --- train / transfer -------------------------------------------------------------------------------

def train(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress, *,
          converted: Converted, tuning: Tuned | None = None) -> Trained:
    """Fit train.model from random weights (with the tune stage's settings when there is one); resumable: an
    attempt killed after epoch k continues at k + 1 (same data, seed and config), its MLflow run too."""
    from components import train as train_component

    config = tuned(config, tuning, progress)

    tracking = _tracking(folder, config, converted, "train")
    if config.train.ensemble:
        from components.train import ensemble

        trained = ensemble.run(converted, config.train, config.seed, out, execute=_executor(config, config.train.workers, progress),
                               tracking=tracking, progress=progress)
    else:
        trained = train_component.run(converted, config.train, config.seed, out, tracking=tracking, progress=progress)
    if tuning is not None:
        trained = dataclasses.replace(trained, tuned=tuning.best_params)
    _seen_of_training(folder, config, converted, progress).save(out / Trained.SEEN)
    return trained


def _executor(config: PipelineConfig, workers: int, progress: Progress, **names: str):
    """Where independent jobs (ensemble members, tune trials: objects with `run(progress)`) run: one after another
    in this process (1 worker, no dask.address), or as Prefect tasks on a Dask cluster (flows.on_dask)."""
    if workers == 1 and not config.dask.address:
        return lambda jobs: [job.run(progress) for job in jobs]
    from flows.on_dask import on_dask

    return on_dask(config.dask.address, workers, progress, **names)


def _seen_of_training(folder: RunFolder, config: PipelineConfig, converted: Converted, progress: Progress):
    """The fingerprints of this run's train split: what a model trained here has seen (components.lineage)."""
    from components import records
    from components.lineage import SeenSet

    progress("fingerprinting the training images (lineage of seen images)")
    return SeenSet.of_batches((batch["image"].numpy() for batch in records.dataset(converted.files("train"))),
                              {"model": None, "run": folder.run_id, "pipeline": config.pipeline.value,
                               "data": f"train split {converted.fingerprint[:12]}"})


def transfer(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress, *,
             converted: Converted) -> Trained:
    """Fine-tune transfer.base (train-noisy's and train-folder's default: the clean-MNIST champion) on the
    train split; resumable like train."""
    from components import transfer as transfer_component

    with tempfile.TemporaryDirectory(prefix="digits-base-") as scratch:
        base_file, base_ref, base_seen, base_run = _base_model(config.transfer.base, Path(scratch), progress)
        rehearsal = _rehearsal(config, base_ref, base_run) if config.transfer.rehearse else None
        tracking = _tracking(folder, config, converted, "transfer")
        from components.train import ensemble

        if config.train.ensemble or ensemble.is_ensemble(base_file):  # an ensemble base: each member fine-tuned
            trained = ensemble.run(converted, config.train, config.seed, out,
                                   execute=_executor(config, config.train.workers, progress), tracking=tracking, progress=progress,
                                   transfer=config.transfer, base_file=base_file, base_ref=base_ref, rehearsal=rehearsal)
        else:
            trained = transfer_component.run(converted, config.train, config.transfer, base_file, base_ref,
                                             config.seed, out, tracking=tracking, rehearsal=rehearsal,
                                             progress=progress)
    seen = _seen_of_training(folder, config, converted, progress).joined(base_seen, {"model": base_ref})
    seen.save(out / Trained.SEEN)
    return trained


def _rehearsal(config: PipelineConfig, base_ref: str, base_run: str | None):
    """transfer.rehearse: the base's training images, from its run's convert output (verified when read)."""
    from components.train.rehearsal import Rehearsal
    from flows.runner import output_of

    off = "or --set transfer.rehearse=0 to fine-tune on this run's images alone"
    if base_run is None:
        raise DigitsInputError(f"transfer.rehearse={config.transfer.rehearse:g} fine-tunes on the base's own training "
                               f"images too, but {base_ref} does not say which run trained it: name a registry "
                               f"version digits registered (models:/NAME@ALIAS), {off}")
    try:
        base_folder = RunFolder.open(base_run)
    except DigitsInputError:
        raise DigitsInputError(f"transfer.rehearse={config.transfer.rehearse:g}: {base_ref} was trained by run "
                               f"{base_run}, which is not under {digits_home() / 'runs'} (deleted, or another "
                               f"home's): its training images are gone; {off}") from None
    return Rehearsal(output_of(base_folder, "convert"), config.transfer.rehearse,
                     noise_background=config.source.spec.background_noise, run_id=base_run)


def _base_model(base: str, scratch: Path, progress: Progress):
    """(local .keras file, pinned reference, its seen-image set or None when unknown, the run that trained it or
    None when unknown) of transfer.base: a registry URI resolved to its version now."""
    from components.lineage import SeenSet
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
        seen_file = reg.fetch(version, Trained.SEEN, scratch / "seen")
        if seen_file is None:
            progress(f"{version.uri} has no record of the images it was trained on: its lineage is incomplete")
        run_id = version.tags.get(lineage_tag("run_id"))
        return model_file, version.uri, SeenSet.load(seen_file) if seen_file else None, run_id
    path = Path(base).expanduser()
    if path.suffix != ".keras" or not path.is_file():
        raise DigitsInputError(f"transfer.base '{base}': no such .keras file (expected 'scratch', "
                               "models:/NAME@ALIAS, models:/NAME/VERSION or a .keras file)")
    progress(f"{path}: a model file does not say which images it was trained on: the lineage is incomplete")
    return path, str(path.resolve()), None, None


def _tracking(folder: RunFolder, config: PipelineConfig, converted: Converted, stage: str) -> Tracking:
    home = digits_home()
    record = folder.load()
    return Tracking(tracking_uri(home), f"digits-{config.source.value}", folder.run_id,
                    tags={lineage_tag(field): value for field, value in (
                        ("run_id", folder.run_id), ("pipeline", config.pipeline.value), ("stage", stage),
                        ("code_version", record.code_version), ("data_fingerprint", converted.fingerprint))},
                    artifact_root=home / "mlartifacts")


# --- calibrate --------------------------------------------------------------------------------------

def calibrate(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress, *,
              model: Trained, converted: Converted) -> Trained:
    """Temperature scaling fitted on the val split, kept inside the model (evaluate.calibrate, on by default)."""
    from components import calibrate as calibrate_component

    return calibrate_component.run(model, converted, out, in_memory_rows=config.train.in_memory_rows, progress=progress)


# --- evaluate ---------------------------------------------------------------------------------------

def evaluate(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress, *,
             model: Trained, converted: Converted, review: Reviewed | None = None) -> Evaluation:
    """Metrics, pictures, robustness and the gate, with the registry's current champion re-measured on
    this run's validation split."""
    from components import evaluate as evaluate_component
    from components.lineage import SeenSet

    name = model_name(config.source.value)
    reg = registry()
    current = reg.champion(name)
    seen = SeenSet.load(model.seen_path) if model.seen_path else None
    with tempfile.TemporaryDirectory(prefix="digits-champion-") as scratch:
        champion = None
        if current is not None:
            progress(f"fetching the champion, {name} version {current.version}")
            champion = evaluate_component.Champion(current.version, reg.download(current, Path(scratch)),
                                                   current.tags.get(MODEL_SHA256))
        return evaluate_component.run(model, converted, out, threshold=config.threshold, champion=champion,
                                      policy=config.evaluate.promote_when, alpha=config.evaluate.alpha,
                                      seen=seen, allow_seen_val=config.evaluate.allow_seen_val,
                                      ood_keep=config.evaluate.ood_keep, review=review,
                                      in_memory_rows=config.train.in_memory_rows, progress=progress)


def record_metrics(folder: RunFolder, config: PipelineConfig, evaluation: Evaluation) -> None:
    def record(run: RunRecord) -> None:
        run.metrics.update({"val_accuracy": evaluation.val_accuracy, "gate_passed": evaluation.passed,
                            "seen_val_images": evaluation.seen_val, "seen_test_images": evaluation.seen_test})
        run.warnings[:] = [w for w in run.warnings if not w.startswith(SEEN_WARNING)]  # a re-evaluation replaces it
        if evaluation.lineage_warning:
            run.warnings.append(f"{SEEN_WARNING}{evaluation.lineage_warning}")
    folder.update(record)


SEEN_WARNING = "evaluate: seen images: "


# --- register ---------------------------------------------------------------------------------------

def register(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress, *,
             model: Trained, converted: Converted, evaluation: Evaluation,
             validation: Validation | None = None) -> Registration:
    """Push a gate-passing model to the registry as a new version of digits-<source>, champion when the gate
    says so (components.registration)."""
    from components import registration
    from schemas.sources import source_spec

    record = folder.load()
    lineage = registration.Lineage(
        run_id=folder.run_id, pipeline=config.pipeline.value, code_version=record.code_version,
        data_fingerprint=converted.fingerprint, model=model.model, val_accuracy=evaluation.val_accuracy,
        promote_when=config.evaluate.promote_when.value, seen_val_images=evaluation.seen_val,
        seen_test_images=evaluation.seen_test, evaluation_report=str(evaluation.report),
        validation_report=str(validation.report) if validation else "", mlflow_run_id=model.mlflow_run_id,
        comparison=evaluation.comparison, allow_seen_val=config.evaluate.allow_seen_val, base=model.base,
        transfer_mode=model.transfer_mode if model.base else None, inputs=dict(record.data_fingerprints))
    gate = registration.Gate(threshold=config.threshold, policy=config.evaluate.promote_when,
                             alpha=config.evaluate.alpha, allow_seen_val=config.evaluate.allow_seen_val,
                             allow_new_registry=config.evaluate.allow_new_registry)
    settings = {**{f"train.{k}": v for k, v in config.train.model_dump(mode="json").items()},
                **({f"transfer.{k}": v for k, v in config.transfer.model_dump(mode="json").items()}
                   if model.base else {}), "seed": config.seed}
    card = {"settings": settings, "source_title": source_spec(config.source.value).title,
            "inputs": dict(record.data_fingerprints)}
    found = registration.register(registry(), digits_home(), model_name(config.source.value), out, progress,
                                  model=model, converted=converted, evaluation=evaluation, validation=validation,
                                  lineage=lineage, gate=gate, card=card, in_memory_rows=config.train.in_memory_rows)
    if found.model_card:
        progress(f"model card: {folder.stage_dir('register') / found.model_card}")
    return found


def record_promotion(folder: RunFolder, config: PipelineConfig, registration: Registration) -> None:
    def record(run: RunRecord) -> None:
        run.registry_version = int(registration.version) if registration.version else None
        run.promoted, run.promotion_reason = registration.promoted, registration.reason
    folder.update(record)


# --- export -----------------------------------------------------------------------------------------

def export(folder: RunFolder, config: PipelineConfig, out: Path, progress: Progress, *,
           model: Trained, converted: Converted, examples: Examples) -> Exported:
    """submission.csv for the test split (with the file of each row for a folder of images), SavedModel
    + .keras, infra-validated in a process of its own before the stage folder appears."""
    from components import export as export_component
    from components.lineage import SeenSet

    seen = SeenSet.load(model.seen_path) if model.seen_path else None
    return export_component.run(model, converted, out, seed=config.seed, files=examples.files("test"), seen=seen,
                                in_memory_rows=config.train.in_memory_rows, progress=progress)


def run_for_flow_run(config: PipelineConfig, flow_run_id: str | None) -> RunFolder:
    """The run folder of a Prefect flow run: the one it made in an earlier attempt (a retried flow
    run resumes there; the flow records its id in run.json), else a new one."""
    if flow_run_id:
        for folder in reversed(list_runs()):
            if folder.load().prefect_flow_run_id == flow_run_id:
                return folder
    return start_run(config)
