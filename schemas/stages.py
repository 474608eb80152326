"""The stage graph, declared once: every stage's name, the artifacts it consumes and produces, how it is
reused, whether it resumes, the reports it writes and its help.

    ingest -> validate -> convert -> [review] -> [tune] -> train | transfer -> [calibrate] -> evaluate -> register
    -> export

The Prefect flow (flows.pipeline) runs `GRAPH.plan(config)` in order, handing each stage the artifacts
it consumes by name; the per-stage CLI commands, `digits reports`, the run's entry page, stale-marking
(a stage run again makes every stage that consumed its output, directly or not, stale), `digits
resume`, the cache and the Prefect artifacts all read this table. A stage's function is named by a
`module:function` string (or given as the function itself) with the signature

    run(folder: RunFolder, config: PipelineConfig, out: Path, progress, **inputs) -> Artifact

where `inputs` are the consumed artifacts by name and `out` the folder to write (the stage runner
renames it into place when the function returns; flows.runner).

Reuse (one mechanism, flows.runner): a stage's key is the sha256 of its name, its code (the bytes of
the files in `code`), its `settings` (config fields) and the content digests of its inputs (plus, for
ingest, the input data's bytes). `content` stages are reused from any run under $DIGITS_HOME with an
equal key; `run` stages are skipped when this run already completed them with an equal key (a resumed
run), and run otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal

from schemas.artifacts import (Artifact, Converted, Evaluation, Examples, Exported, Registration, Reviewed, Trained,
                              Tuned, Validation)
from schemas.config import SCRATCH, PipelineConfig

ROOT = Path(__file__).resolve().parents[1]  # the folder holding the schemas/, components/ and flows/ packages
Reuse = Literal["content", "run"]


@dataclass(frozen=True)
class Report:
    """A file (or folder) of a stage that people open: listed by `digits reports` and the run's page."""

    label: str
    path: str  # relative to the stage folder


@dataclass(frozen=True)
class Stage:
    name: str
    produces: str  # the artifact's name: how later stages ask for it
    artifact: type[Artifact]
    run: str | Callable[..., Artifact]  # "module:function", or the function
    consumes: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()  # consumed too when a stage of the pipeline's plan produces it (tune's result)
    settings: tuple[str, ...] = ()  # config fields (dotted) that shape the output: part of the key
    code: tuple[str, ...] = ()  # files and folders (relative to ROOT) whose bytes are the stage's code version
    reuse: Reuse = "run"
    resumable: bool = False  # its work folder survives a failed attempt (training checkpoints)
    lines: bool = False  # its progress lines stay on the console (per epoch, per trial); others update a spinner
    reports: tuple[Report, ...] = ()
    help: str = ""
    command: str | None = None  # the per-stage CLI command that runs it; default: its name
    applies: Callable[[PipelineConfig], bool] | None = None  # None: in every pipeline
    off: str = ""  # what its command says when the stage does not apply to a run (and how to turn it on)
    external: str | Callable[[PipelineConfig], str | None] | None = None
    """What the stage reads from outside the run, as a fingerprint for its key (ingest: the data's bytes);
    None from it: unknown content (a download), so the stage is not reused across runs."""
    after: str | Callable[..., None] | None = None
    """after(folder, config, artifact), once the stage's folder is in place: records run-level facts and may
    raise to stop the run (validate's gate)."""
    run_fields: tuple[str, ...] = ()  # run.json fields the stage sets: cleared when it goes stale
    retries: int = 0  # Prefect retries of a failure that may pass on a second try (never bad input)

    @property
    def cli_command(self) -> str:
        return self.command or self.name

    def applies_to(self, config: PipelineConfig) -> bool:
        return self.applies is None or self.applies(config)

    def settings_of(self, config: PipelineConfig) -> dict[str, Any]:
        data = config.model_dump(mode="json")
        found = {}
        for dotted in self.settings:
            value: Any = data
            for part in dotted.split("."):
                value = value[part]
            found[dotted] = value
        return found

    def code_digest(self) -> str:
        return _code_digest(self.code)


@lru_cache(maxsize=None)
def _code_digest(paths: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for relative in paths:
        path = ROOT / relative
        files = sorted(p for p in path.rglob("*") if p.suffix in (".py", ".json")) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                digest.update(str(file.relative_to(ROOT)).encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Graph:
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {names}")
        produced: set[str] = set()
        for stage in self.stages:
            missing = set(stage.consumes + stage.optional) - produced
            if missing:
                raise ValueError(f"stage {stage.name} consumes {sorted(missing)}, which no earlier stage produces")
            produced.add(stage.produces)

    def __iter__(self):
        return iter(self.stages)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def plan(self, config: PipelineConfig) -> list[Stage]:
        """The stages a pipeline runs, in order."""
        return [s for s in self.stages if s.applies_to(config)]

    def consumed(self, stage: Stage, config: PipelineConfig) -> tuple[str, ...]:
        """The artifacts a stage takes in this pipeline: what it consumes, and those of its optional inputs that
        an earlier stage of the plan produces."""
        earlier = self.plan(config)
        earlier = earlier[:[s.name for s in earlier].index(stage.name)] if stage in earlier else earlier
        made = {s.produces for s in earlier}
        return stage.consumes + tuple(name for name in stage.optional if name in made)

    def producer(self, artifact: str, config: PipelineConfig, before: str | None = None) -> Stage:
        """The stage of this pipeline that produces an artifact: the last one (a later stage may refine an
        artifact, as calibrate does the model), or the last one before the stage `before`."""
        plan = self.plan(config)
        if before is not None:
            order = self.names()
            plan = [s for s in plan if order.index(s.name) < order.index(before)]
        return [s for s in plan if s.produces == artifact][-1]

    def downstream(self, name: str) -> list[str]:
        """Every stage that consumes what `name` produced, directly or through other stages, in order."""
        reached = {self.stage(name).produces}
        found = []
        for stage in self.stages[self.names().index(name) + 1:]:
            if reached & set(stage.consumes + stage.optional):
                found.append(stage.name)
                reached.add(stage.produces)
        return found

    def commands(self) -> dict[str, list[Stage]]:
        """Per-stage CLI command -> the stages it runs, in order."""
        found: dict[str, list[Stage]] = {}
        for stage in self.stages:
            found.setdefault(stage.cli_command, []).append(stage)
        return found

    def with_stage(self, stage: Stage, *, before: str) -> Graph:
        """This graph with one more stage, inserted before another."""
        at = self.names().index(before)
        return dataclasses.replace(self, stages=(*self.stages[:at], stage, *self.stages[at:]))


def _from_scratch(config: PipelineConfig) -> bool:
    return config.transfer.base == SCRATCH


def _fine_tuned(config: PipelineConfig) -> bool:
    return config.transfer.base != SCRATCH


def _tuned(config: PipelineConfig) -> bool:
    return config.tune.trials > 0


def _reviewed(config: PipelineConfig) -> bool:
    return config.review.enabled


def _calibrated(config: PipelineConfig) -> bool:
    return config.evaluate.calibrate and config.train.model != "pca-svm"  # a Keras model's probabilities


GRAPH = Graph((
    Stage("ingest", produces="examples", artifact=Examples, run="flows.stages:ingest",
          settings=("pipeline", "ingest.limit", "ingest.on_bad_rows"),
          code=("components/ingest", "schemas/dataset.py"), reuse="content", external="flows.stages:data_fingerprint",
          reports=(Report("EDA", "eda/index.html"), Report("rejected rows", "rejected.csv")), retries=2, command="ingest",
          help="Read the source with its real loader into canonical Parquet per split, plus EDA pictures."),
    Stage("validate", produces="validation", artifact=Validation, run="flows.stages:validate", consumes=("examples",),
          settings=("pipeline", "validate", "ingest.limit"),
          code=("components/validate", "schemas/suites", "schemas/features.py", "schemas/sources.py"),
          reuse="content", after="flows.stages:validation_gate",
          reports=(Report("validation report", "report.html"), Report("Data Docs", "index.html"),
                   Report("validation results", "results.json")),
          help="Run the Great Expectations suites on per-row features; stop (exit 2) on failures."),
    Stage("convert", produces="converted", artifact=Converted, run="flows.stages:convert",
          consumes=("examples", "validation"), settings=("seed", "convert.val_fraction", "convert.rows_per_shard"),
          code=("components/convert", "components/records.py", "schemas/examples.py"), reuse="content",
          reports=(Report("convert manifest", "manifest.json"),),
          help="Split train/val (stratified) and write sharded gzip TFRecords with Apache Beam."),
    Stage("review", produces="review", artifact=Reviewed, run="flows.stages:review", consumes=("converted",),
          settings=("seed", "review.folds", "review.model", "review.width", "review.epochs", "review.min_steps",
                    "review.gallery"),
          code=("components/review.py", "components/train"), reuse="content", resumable=True, lines=True,
          applies=_reviewed, after="flows.stages:review_gate",
          off="the label review is off for this run: `--set review.enabled=true` runs it",
          reports=(Report("label review", "report.html"), Report("suspect labels", "suspects.csv"),
                   Report("review decisions (edit, then --set ingest.review=PATH)", "review-decisions.csv")),
          help="Find labels that are probably wrong: every train and val image scored by a model that never trained "
               "on it (K folds), then confident learning (cleanlab) ranks the suspects; a labelled test split is "
               "reviewed beside them, reported only. Off unless review.enabled=true; its decisions file, edited, goes "
               "back to ingest (ingest.review=PATH)."),
    Stage("tune", produces="tuning", artifact=Tuned, run="flows.stages:tune", consumes=("converted",),
          settings=("seed", "train", "tune.trials", "tune.budget_minutes", "tune.epochs", "tune.rows", "tune.space",
                    "tune.pruner"),
          code=("components/tune.py", "components/train"), applies=_tuned, lines=True,
          off="tune is off for this run (tune.trials=0): `--set tune.trials=N` runs a study of N trials",
          reports=(Report("tune report", "report.html"), Report("trials", "trials.csv"),
                   Report("optimisation history", "history.png")),
          help="Search train's settings with an Optuna study (TPE, pruned on per-epoch val accuracy) over tune.space; "
               "its best settings go into train. Off unless tune.trials > 0 (--set tune.trials=N): without it the "
               "command says so and does nothing. A killed tune resumes with its finished trials."),
    Stage("train", produces="model", artifact=Trained, run="flows.stages:train", consumes=("converted",),
          optional=("tuning",),
          settings=("seed", "train"), code=("components/train", "components/lineage.py"), resumable=True, lines=True, applies=_from_scratch,
          reports=(Report("model", "model.keras"), Report("TensorBoard logs", "logs")),
          help="Train train.model from random weights (transfer.base=scratch: train-mnist, train-kaggle); an "
               "interrupted training resumes."),
    Stage("transfer", produces="model", artifact=Trained, run="flows.stages:transfer", consumes=("converted",),
          settings=("seed", "train", "transfer"), code=("components/transfer.py", "components/train", "components/lineage.py"), resumable=True,
          lines=True, applies=_fine_tuned, command="train",
          reports=(Report("fine-tuned model", "model.keras"), Report("TensorBoard logs", "logs")),
          help="Fine-tune transfer.base (train-noisy and train-folder: the clean-MNIST champion); resumes like train."),
    Stage("calibrate", produces="model", artifact=Trained, run="flows.stages:calibrate", consumes=("model", "converted"),
          settings=("evaluate.calibrate",), code=("components/calibrate.py", "components/evaluate"),
          applies=_calibrated, command="evaluate",
          reports=(Report("calibrated model", "model.keras"), Report("calibration", "calibration.json")),
          help="Fit a temperature on the val split and keep it inside the model, so its probabilities mean what they "
               "say (evaluate.calibrate, on by default)."),
    Stage("evaluate", produces="evaluation", artifact=Evaluation, run="flows.stages:evaluate",
          consumes=("model", "converted"), optional=("review",), settings=("pipeline", "evaluate"),
          code=("components/evaluate", "components/lineage.py", "components/ood.py"),
          after="flows.stages:record_metrics", reports=(Report("evaluation report", "report.html"),),
          help="Score the model on the val split, gate it against the threshold and the champion."),
    Stage("register", produces="registration", artifact=Registration, run="flows.stages:register",
          consumes=("model", "converted", "evaluation", "validation"), settings=("pipeline", "evaluate"),
          code=("components/registry", "components/registration.py", "components/model_card.py"), after="flows.stages:record_promotion",
          command="evaluate", run_fields=("registry_version", "promoted", "promotion_reason"),
          reports=(Report("registration", "registration.json"), Report("model card", "model_card.html")),
          help="Register a gate-passing model as a new version and make it champion."),
    Stage("export", produces="exported", artifact=Exported, run="flows.stages:export",
          consumes=("model", "converted", "examples"), settings=("seed",),
          code=("components/export", "components/lineage.py"),
          reports=(Report("submission", "submission.csv"), Report("SavedModel", "saved_model"),
                   Report("test rows seen in training", "seen-test-images.csv")),
          help="Write submission.csv and export the model (SavedModel + .keras), checked in a process of its own."),
))
"""The pipeline's stages. Read it as `schemas.stages.GRAPH` at call time (a test may extend it)."""
