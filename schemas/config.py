"""Pydantic config models of each pipeline: the one place for defaults and for `--set` overrides."""

from __future__ import annotations

import math
import os
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator, model_validator

from schemas.errors import ConfigError
from schemas.sources import SOURCES, Source, SourceSpec


class _PipelineBase(StrEnum):
    @property
    def source(self) -> Source:
        return Source(self.value.removeprefix("train-"))

    @property
    def spec(self) -> SourceSpec:
        return self.source.spec

    @classmethod
    def for_source(cls, source: Source | str) -> Pipeline:
        return cls(Source(source).spec.pipeline)


Pipeline = _PipelineBase("Pipeline", {spec.name: spec.pipeline for spec in SOURCES})
"""The pipelines, one per source (schemas.sources): train-kaggle, train-mnist, train-noisy, train-folder."""


class OnBadRows(StrEnum):
    strict = "strict"  # the first bad row stops ingestion with its file, line and column
    quarantine = "quarantine"  # bad rows go to ingest/rejected.csv, good rows continue


class _Model(BaseModel):
    # serialize_by_alias: `validate` (a BaseModel attribute) is the field validate_ with alias "validate"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)


class IngestConfig(_Model):
    """How the ingest stage reads its source."""

    data: str | None = Field(
        None, description="Kaggle folder or zip; folder of the 4 MNIST idx .gz files or a TFDS data_dir; "
                          "noisy folder (.amat pair or train.csv/test.csv). None: TFDS's download (mnist only).")
    limit: PositiveInt | None = Field(None, description="keep only the first N rows of each split (quick runs)")
    on_bad_rows: OnBadRows = OnBadRows.strict
    tfds_data_dir: str | None = Field(None, description="where TFDS prepares mnist; default $DIGITS_HOME/tfds")
    max_image_pixels: PositiveInt = Field(40_000_000, description="folder source: larger images are refused from "
                                                                  "their header, before they are decoded")
    review: str | None = Field(None, description="a label-review file (CSV `id,decision`: a digit relabels the train "
                                                 "row with that id, `drop` removes it), as the review stage's "
                                                 "review-decisions.csv after a person edited it; applied on ingest")


class FailOn(StrEnum):
    error = "error"  # a failed expectation stops the run before conversion (exit 2)
    warn = "warn"  # failures are recorded in run.json and the run goes on


class ValidateConfig(_Model):
    """How the validate stage judges the dataset."""

    fail_on: FailOn = FailOn.error
    min_rows: PositiveInt | None = Field(
        None, description="rows each split must have; default: the published size (or ingest.limit when set)")


class ConvertConfig(_Model):
    """How the convert stage splits the data and writes TFRecords, and on which Beam runner."""

    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of each class of the labelled train split "
                                                             "held out as the validation split")
    rows_per_shard: PositiveInt = Field(10_000, description="shards per split = ceil(rows / rows_per_shard)")
    runner: str = Field("direct", description="direct (Beam DirectRunner, in-process) | dask (Beam DaskRunner on "
                                              "dask.distributed) | any other Beam runner name, e.g. FlinkRunner, "
                                              "configured through beam_args")
    dask_workers: PositiveInt = Field(2, description="runner=dask without dask.address: worker processes of the "
                                                     "LocalCluster started on 127.0.0.1 for the conversion")
    beam_args: str = Field("", description="extra Beam pipeline options, passed through untouched "
                                           "(e.g. '--flink_master=host:8081 --environment_type=LOOPBACK')")


class ModelName(StrEnum):
    digits_net = "digits-net"  # ours: accuracy per second of CPU
    baseline = "baseline"  # the Kaggle notebook's plain CNN: two conv layers + dense
    robinson = "robinson"  # 32/32/64/64 conv, 2x1024 dense, heavy augmentation
    bn_cnn = "bn-cnn"  # the batch-normalised net with strided convolutions
    pca_svm = "pca-svm"  # scikit-learn PCA + RBF SVC, the classical reference


class Fill(StrEnum):
    constant = "constant"  # black: the clean digits' background
    reflect = "reflect"  # the image mirrored at its edge: a noise background stays noise


class Interpolation(StrEnum):
    bilinear = "bilinear"  # smooth strokes: clean digits
    nearest = "nearest"  # every output pixel an input pixel: a noise background keeps its statistics


class TrainConfig(_Model):
    """How the train stage fits a model on the train split (never on val or test)."""

    model: ModelName = ModelName.digits_net
    epochs: PositiveInt = Field(6, description="passes over the train split")
    width: float = Field(1.0, gt=0, le=4, description="digits-net: channel-count multiplier")
    batch_size: PositiveInt = 128
    in_memory_rows: NonNegativeInt = Field(100_000, description="a split of up to this many rows is held in memory "
                                           "while the model stages read it (the whole split shuffled each epoch: "
                                           "fastest on small data); a larger one streams from its TFRecord shards "
                                           "through tf.data, memory independent of its size (0: always stream)")
    shuffle_buffer: PositiveInt = Field(50_000, description="streamed training: rows held for shuffling (~1 kB "
                                        "each), on top of the shards' order shuffled every epoch; larger mixes "
                                        "better")
    learning_rate: float = Field(3e-3, gt=0, description="peak learning rate (warm-up, then cosine decay to 0)")
    warmup_epochs: float = Field(0.5, ge=0, description="linear warm-up length, in epochs")
    augment: bool = Field(True, description="random rotation, shift and zoom of training images")
    rotation_degrees: float = Field(10.0, ge=0, le=180)
    shift: float = Field(0.1, ge=0, lt=1, description="largest shift, as a fraction of the image side")
    zoom: float = Field(0.1, ge=0, lt=1, description="largest zoom in or out, as a fraction")
    elastic: float = Field(0.0, ge=0, le=100, description="elastic distortion (Simard et al. 2003) of training images, "
                           "strength alpha: a random displacement field, smoothed by a Gaussian of "
                           "train.elastic_sigma pixels, scaled by this (36 at sigma 6 moves a pixel by ~1 px); "
                           "rotation, shift and zoom are then applied with it in one resampling (0: off)")
    elastic_sigma: float = Field(6.0, ge=1, le=10, description="elastic distortion: smoothness of the displacement "
                                 "field, in pixels (larger: smoother, gentler bends)")
    fill: Fill = Field(Fill.constant, description="what rotation, shift and zoom put where the image moved away: "
                       "constant (black, like MNIST's background) or reflect (the image mirrored at its edge: "
                       "keeps a noise background noise)")
    interpolation: Interpolation = Field(Interpolation.bilinear, description="how rotation, shift and zoom "
                                         "resample: bilinear, or nearest (a noise background keeps its pixel "
                                         "statistics; bilinear would smooth it into a texture test images never have)")
    background_noise: float = Field(0.0, ge=0, le=1, description="robustness: background pixels become uniform "
                                    "noise up to a level drawn per image from [0, this] (0: off)")
    pixel_noise: float = Field(0.0, ge=0, le=1, description="robustness: additive Gaussian noise, sigma drawn per "
                                                            "image from [0, this], of full ink (0: off)")
    occlusion: float = Field(0.0, ge=0, le=1, description="robustness: share of images with a random rectangle "
                                                          "(sides up to 40 %) erased (0: off)")
    contrast: float = Field(0.0, ge=0, lt=1, description="robustness: contrast jitter, factor in [1 - this, 1 + this]")
    brightness: float = Field(0.0, ge=0, le=1, description="robustness: brightness jitter, offset in [-this, this]")
    clean_epochs: int = Field(0, ge=0, le=100, description="epochs after train.epochs on the images as they are "
                              "(the augment block left out), at train.clean_learning_rate decaying to 0: the "
                              "model settles on undistorted digits (0: off)")
    clean_learning_rate: float = Field(3e-4, gt=0, description="peak learning rate of the train.clean_epochs "
                                                               "(cosine decay to 0, no warm-up)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="share of each target spread evenly over all "
                                                                 "classes (a softer target, less over-confidence)")
    svm_rows: PositiveInt = Field(10_000, description="pca-svm: train rows it fits on (an RBF SVC is quadratic)")
    mixed_precision: bool = Field(True, description="float16 compute on a GPU (ignored on CPU)")
    members: PositiveInt = Field(1, description="ensemble: train this many models (seeds seed, seed+1, ...) and "
                                                "average their probabilities in one model (1: a single model)")
    member_models: list[ModelName] = Field([], description="ensemble: the members' architectures, cycled over the "
                                           "members (e.g. digits-net,bn-cnn); empty: train.model for every member")
    test_time_shifts: int = Field(0, description="test-time augmentation: the model also looks at each "
                                              "image shifted by one pixel in 4 directions (up, down, left, right) or 8 "
                                              "(and the diagonals) and averages the probabilities over all the copies "
                                              "(0: off). The model is then an ensemble (of train.members, or of one)")
    workers: PositiveInt = Field(1, description="ensemble: members trained at once, each in a worker process of a "
                                                "Dask LocalCluster on 127.0.0.1 (1: one after another, in-process); "
                                                "with dask.address set, members run on that cluster instead")

    @field_validator("member_models", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("test_time_shifts")
    @classmethod
    def _shifts(cls, value: int) -> int:
        if value not in (0, 4, 8):
            raise ValueError("expected 0 (off), 4 or 8 one-pixel shifts")
        return value

    @model_validator(mode="after")
    def _ensemble_of_networks(self) -> TrainConfig:
        if ModelName.pca_svm in self.member_models or (self.members > 1 and self.model is ModelName.pca_svm
                                                        and not self.member_models):
            raise ValueError("an ensemble averages Keras networks' probabilities: pca-svm cannot be a member")
        if self.elastic and self.augment and (self.fill is not Fill.constant
                                              or self.interpolation is not Interpolation.bilinear):
            raise ValueError("train.elastic resamples bilinearly with black fill: train.fill=reflect and "
                             "train.interpolation=nearest are for rotation/shift/zoom without it")
        if self.test_time_shifts and self.model is ModelName.pca_svm and not self.member_models:
            raise ValueError("test_time_shifts averages a Keras network's probabilities over shifted copies: "
                             "pca-svm is not one")
        return self

    @property
    def ensemble(self) -> bool:
        """Whether the model is an ensemble model (components.train.ensemble): several members, or shifted copies."""
        return self.members > 1 or self.test_time_shifts > 0

    def single(self, **update: Any) -> TrainConfig:
        """This config, with `update`, for one model on its own (an ensemble member, a tune trial): ENSEMBLE_FIELDS
        at their defaults."""
        return self.model_copy(update={**update, "members": 1, "member_models": [], "workers": 1,
                                       "test_time_shifts": 0})

    def member(self, index: int) -> TrainConfig:
        """The config of ensemble member `index`: its architecture, as a single model."""
        return self.single(model=self.member_models[index % len(self.member_models)] if self.member_models
                           else self.model)


# what makes a train config an ensemble rather than one model (TrainConfig.single resets them)
ENSEMBLE_FIELDS = frozenset({"members", "member_models", "workers", "test_time_shifts"})


class TransferMode(StrEnum):
    full = "full"  # fine-tune every weight of the base model
    frozen = "frozen"  # train a new head on the base's frozen feature extractor (BatchNorm in inference mode)
    gradual = "gradual"  # new head first on the frozen extractor, then unfreeze all but BatchNorm at a low rate


SCRATCH = "scratch"


class TransferConfig(_Model):
    """Where the model stage starts: random weights (the train stage) or a trained model (the transfer stage)."""

    base: str = Field(SCRATCH, description="'scratch' (train.model from random weights), a registry URI "
                                           "(models:/NAME@ALIAS, models:/NAME/VERSION) or a .keras file to "
                                           "fine-tune; train-noisy's default is models:/digits-mnist@champion")
    mode: TransferMode = TransferMode.full
    head_epochs: PositiveInt = Field(2, description="gradual: epochs of the new head alone, within train.epochs")
    learning_rate: float = Field(3e-3, gt=0, description="full: peak learning rate of every weight (a new head, "
                                                         "frozen or gradual's first phase, uses train.learning_rate)")
    fine_tune_learning_rate: float = Field(3e-4, gt=0, description="gradual: peak learning rate once the base's "
                                                                   "layers are unfrozen (low, as in keras-io's recipe)")
    rehearse: float = Field(0.0, ge=0, le=1, description="share of the base's own training images (its run's "
                            "train split, verified against that run's record) fine-tuned on beside this run's, each "
                            "drawn the way the source looks (noisy: a uniform-noise background); needs a registry "
                            "base whose run folder is under $DIGITS_HOME (0: off; train-noisy's default 1)")


class Pruner(StrEnum):
    median = "median"  # stop a trial whose val accuracy at an epoch is below the median of earlier trials there
    hyperband = "hyperband"  # successive halving over the trials' epochs
    off = "off"  # every trial runs all its epochs


DEFAULT_SPACE = {
    "learning_rate": "log 3e-4 1e-2",
    "width": "float 0.5 1.5",
    "label_smoothing": "float 0 0.2",
    "batch_size": "choice 64 128 256",
    "rotation_degrees": "float 0 15",
    "shift": "float 0 0.15",
    "zoom": "float 0 0.15",
    "elastic": "choice 0 24 36",
}
SPACE_KINDS = ("float", "log", "int", "choice")
_NOT_TUNED = {"epochs", "members", "workers", "mixed_precision", "svm_rows"}  # a trial's length, or not the model


# which kinds of tune.space draw each type of train setting (bool and the model name: 'choice' only)
_SPACE_KINDS_OF = {float: SPACE_KINDS, int: ("int", "choice"), PositiveInt: ("int", "choice")}
_KIND_TEXT = {"float": "'float LOW HIGH'", "log": "'log LOW HIGH'", "int": "'int LOW HIGH'",
              "choice": "'choice A B ...'"}


def _check_train_value(key: str, spec: str, value: Any) -> None:
    """Raise ValueError (one line) when train.<key> does not take value (its type and bounds)."""
    from pydantic import TypeAdapter, ValidationError

    field = TrainConfig.model_fields[key]
    try:
        TypeAdapter(Annotated[field.annotation, field]).validate_python(value)
    except ValidationError as exc:
        raise ValueError(f"{key}={spec!r}: {value!r} is not a value of train.{key} "
                         f"({exc.errors()[0]['msg'][0].lower()}{exc.errors()[0]['msg'][1:]})") from None


class TuneConfig(_Model):
    """The tune stage: an Optuna study over train settings, before train (off at trials=0)."""

    trials: int = Field(0, ge=0, description="trials of the study (0: no tune stage); each is a short training "
                                             "of train.model on the train split, scored on val")
    budget_minutes: float | None = Field(None, gt=0, description="no trial starts after this many minutes of "
                                                                 "the stage (None: no limit)")
    epochs: PositiveInt = Field(3, description="epochs of each trial (the pruner sees val accuracy after each)")
    rows: PositiveInt | None = Field(None, description="train rows each trial trains on (the first N of the "
                                                      "split; None: all): faster trials, a noisier ranking")
    space: dict[str, str] = Field(DEFAULT_SPACE, description="train.<field> -> 'float LOW HIGH' | 'log LOW HIGH' | "
                                  "'int LOW HIGH' | 'choice A B ...'; as --set: 'learning_rate=log 1e-4 1e-2; "
                                  "width=choice 0.5 1'")
    pruner: Pruner = Pruner.median
    storage: str | None = Field(None, description="the study's SQLAlchemy URL (None: SQLite "
                                                  "$DIGITS_HOME/tune/optuna.db); a killed tune resumes from it")
    workers: PositiveInt = Field(1, description="trials at once, each in a worker process of a Dask LocalCluster "
                                                "(1: one after another, in-process); with dask.address, trials "
                                                "run on that cluster")

    @field_validator("storage")
    @classmethod
    def _storage_is_a_database_url(cls, value: str | None) -> str | None:
        """A SQLAlchemy URL whose driver is installed: checked now, not in a traceback when the stage starts."""
        if value is None:
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            make_url(value).get_dialect()
        except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:
            raise ValueError("expected a SQLAlchemy database URL whose driver is installed, e.g. "
                             f"postgresql+psycopg://USER:PASSWORD@HOST/DB ({str(exc).splitlines()[0]})") from None
        return value

    @field_validator("space", mode="before")
    @classmethod
    def _space_from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        found = {}
        for part in value.split(";"):
            if part.strip():
                key, sep, spec = part.partition("=")
                if not sep:
                    raise ValueError(f"expected FIELD=SPEC, got {part.strip()!r}")
                found[key.strip()] = spec.strip()
        return found

    @field_validator("space")
    @classmethod
    def _space_is_of_train_fields(cls, space: dict[str, str]) -> dict[str, str]:
        tunable = {name for name, f in TrainConfig.model_fields.items()
                   if f.annotation in (float, int, PositiveInt, bool) or name == "model"} - _NOT_TUNED
        for key, spec in space.items():
            if key not in tunable:
                raise ValueError(f"{key!r} is not a tunable train setting (one of: {', '.join(sorted(tunable))})")
            kind, *values = spec.split()
            if kind not in SPACE_KINDS or not values or (kind != "choice" and len(values) != 2):
                raise ValueError(f"{key}={spec!r}: expected 'float LOW HIGH', 'log LOW HIGH', 'int LOW HIGH' "
                                 "or 'choice A B ...'")
            kinds = _SPACE_KINDS_OF.get(TrainConfig.model_fields[key].annotation, ("choice",))
            if kind not in kinds:
                raise ValueError(f"{key}={spec!r}: train.{key} takes {' or '.join(_KIND_TEXT[k] for k in kinds)}")
            if kind != "choice":
                try:
                    low, high = float(values[0]), float(values[1])
                except ValueError:
                    raise ValueError(f"{key}={spec!r}: LOW and HIGH must be numbers") from None
                if not (math.isfinite(low) and math.isfinite(high)):
                    raise ValueError(f"{key}={spec!r}: LOW and HIGH must be finite numbers")
                if not low < high or (kind == "log" and low <= 0):
                    raise ValueError(f"{key}={spec!r}: needs LOW < HIGH (and LOW > 0 for log)")
                values = [int(low), int(high)] if kind == "int" else [low, high]  # as tune.distributions draws
            for value in values:  # every value a trial may be given is one train.<key> takes: said now, not in a
                _check_train_value(key, spec, value)  # trial's traceback (the bounds of a range stand for it)
        return space


class DaskConfig(_Model):
    """The Dask cluster that work is spread over: ingest's text blocks, validate's row groups, convert.runner=dask
    (Beam's DaskRunner), ensemble members and tune trials."""

    address: str | None = Field(None, description="an existing scheduler (tcp://host:8786): ingest parses text "
                                "files and validate computes features on its workers, and it runs "
                                "convert.runner=dask and ensemble members; its workers must import digits and see $DIGITS_HOME "
                                "at the same path. None: digits starts a LocalCluster on 127.0.0.1 when one is "
                                "needed (convert.dask_workers, train.workers processes)")


class ReviewConfig(_Model):
    """The review stage: labels that are probably wrong, by confident learning on out-of-sample probabilities."""

    enabled: bool = Field(False, description="run the review stage (after convert): K-fold cross-fitted "
                                             "probabilities, then cleanlab's find_label_issues -> suspects.csv")
    folds: int = Field(3, ge=2, le=20, description="K: each image is scored by a model trained on the other K-1 folds")
    model: ModelName = Field(ModelName.digits_net, description="the folds' model (a Keras network of the zoo)")
    width: float = Field(0.5, gt=0, le=4, description="digits-net: the folds' channel-count multiplier")
    epochs: PositiveInt = Field(3, description="epochs of each fold's model (no augmentation, no label smoothing)")
    min_steps: PositiveInt = Field(100, description="small data: more epochs than review.epochs, so that each fold's "
                                                   "model takes at least this many optimizer steps (its batch "
                                                   "normalisation statistics settle)")
    warn_share: float = Field(0.02, ge=0, le=1, description="warn when the estimated share of wrong train/val labels "
                                                            "is above this")
    fail_share: float | None = Field(0.2, ge=0, le=1, description="fail the run when the estimated share of wrong "
                                                                  "train/val labels is above this (None: never)")
    gallery: PositiveInt = Field(60, description="suspects shown as pictures in the report, most suspect first")

    @model_validator(mode="after")
    def _keras_model(self) -> ReviewConfig:
        if self.model is ModelName.pca_svm:
            raise ValueError("review.model: the folds need a network's probabilities; pca-svm has none")
        return self


class PromoteWhen(StrEnum):
    at_least_champion = "at-least-champion"  # val accuracy >= the champion's on the same images
    significantly_better = "significantly-better"  # better, and McNemar's exact test says it is not chance
    not_significantly_worse = "not-significantly-worse"  # anything the test cannot call worse


class EvaluateConfig(_Model):
    """The evaluate stage's gate."""

    threshold: float | None = Field(None, ge=0, le=1, description="validation accuracy a model needs to become "
                                                                  "champion; None: the source's default "
                                                                  "(schemas.sources: kaggle 0.99, mnist 0.99, "
                                                                  "noisy 0.97, folder 0.9)")
    promote_when: PromoteWhen = Field(PromoteWhen.at_least_champion, description="how the candidate must compare "
                                      "with the champion on the same val images (paired, McNemar's exact test)")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of that test")
    allow_new_registry: bool = Field(False, description="register into a registry that has lost the versions "
                                                        "this home registered there (deleted or replaced)")
    calibrate: bool = Field(True, description="fit a temperature on the val split and keep it inside the model "
                                              "(the calibrate stage): probabilities that mean what they say "
                                              "everywhere after (a Keras model; pca-svm is never calibrated)")
    allow_seen_val: bool = Field(False, description="let a model whose val split holds images it (or its base) "
                                                    "was trained on pass the gate; recorded in the registry")
    ood_keep: float | None = Field(0.99, gt=0.5, lt=1, description="fit the out-of-distribution detector that "
                                   "`digits predict --reject-ood` uses, its threshold keeping this share of the val "
                                   "digits (components.ood); None: none is fitted")


class PipelineConfig(_Model):
    """The resolved configuration of one pipeline run; run.json records it whole."""

    pipeline: Pipeline
    seed: int = 42
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    convert: ConvertConfig = ConvertConfig()
    train: TrainConfig = TrainConfig()
    transfer: TransferConfig = TransferConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneConfig = TuneConfig()
    review: ReviewConfig = ReviewConfig()
    dask: DaskConfig = DaskConfig()

    @model_validator(mode="before")
    @classmethod
    def _pipeline_defaults(cls, data: Any) -> Any:
        """Fill what the pipeline sets differently from the field defaults; given values win."""
        if not isinstance(data, dict):
            return data
        try:
            defaults = Pipeline(str(data.get("pipeline", ""))).spec.defaults
        except ValueError:
            return data  # the pipeline field's own validation names the problem

        def given(section: str) -> dict:
            value = data.get(section) or {}
            return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        cluster = _cluster_defaults(given("dask"), given("convert"))  # under the pipeline's own defaults
        sections = {s: {**cluster.get(s, {}), **defaults.get(s, {})} for s in {*defaults, *cluster}}
        return {**data, **{section: {**values, **given(section)} for section, values in sections.items()}}

    @model_validator(mode="after")
    def _tune_trains_from_scratch(self) -> PipelineConfig:
        if self.tune.trials and self.transfer.base != SCRATCH:
            raise ValueError(f"tune.trials: the tune stage searches settings of training from scratch, and this "
                             f"run fine-tunes {self.transfer.base}; set transfer.base=scratch, or tune.trials=0")
        return self

    @property
    def source(self) -> Source:
        return self.pipeline.source

    @property
    def threshold(self) -> float:
        """The evaluation gate's accuracy threshold for this pipeline."""
        if self.evaluate.threshold is not None:
            return self.evaluate.threshold
        return self.pipeline.spec.threshold


CLUSTER_VARIABLE = "DASK_SCHEDULER_ADDRESS"  # Dask's own: `distributed.Client()` connects there too


def _cluster_defaults(dask: dict, convert: dict) -> dict[str, dict]:
    """With DASK_SCHEDULER_ADDRESS set (a team's worker: infra/compose.yaml), that cluster is where a run's
    distributed work goes unless its config says otherwise: the defaults dask.address=<it> and, unless the
    config names a cluster itself, convert.runner=dask (ensemble members and tune trials follow dask.address).
    A config that gives dask.address (even None, as run.json records it) is left as it is."""
    address = os.environ.get(CLUSTER_VARIABLE, "").strip()
    if not address or "address" in dask:
        return {}
    return {"dask": {"address": address}, **({} if "runner" in convert else {"convert": {"runner": "dask"}})}


def default_config(pipeline: Pipeline | str) -> PipelineConfig:
    """The embedded defaults of a pipeline."""
    try:
        return PipelineConfig(pipeline=Pipeline(pipeline))
    except ValueError:
        known = ", ".join(p.value for p in Pipeline)
        raise ConfigError(f"unknown pipeline '{pipeline}'; expected one of: {known}") from None


def apply_overrides(config: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """Return a copy of config with `key.sub=value` overrides applied and validated.

    Raises ConfigError naming the override when a key is unknown or a value does not validate.
    """
    data: dict[str, Any] = config.model_dump(mode="json")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{override}'")
        if key.strip() == "pipeline":
            raise ConfigError(f"--set {override}: the pipeline is not a setting; name it on the command line "
                              "(`digits run PIPELINE`, `digits ingest --source SOURCE`)")
        *parents, leaf = key.strip().split(".")
        node, model = data, type(config)
        for part in parents:
            field = _fields(model).get(part)
            sub = field.annotation if field else None
            if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
                raise ConfigError(_unknown_key(key.strip(), override, config))
            node, model = node[part], sub
        if leaf not in _fields(model) or _is_model(_fields(model)[leaf].annotation):
            raise ConfigError(_unknown_key(key.strip(), override, config))
        node[leaf] = None if value.strip().lower() in ("none", "null") else value
    try:
        return type(config).model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        given = first.get("input")  # a whole section (a check across its fields) is not shown
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"invalid value for '{where}': {message}{shown}" if where else message) from None


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    """A model's fields by their public (alias) names, as --set and run.json spell them."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _unknown_key(key: str, override: str, config: BaseModel) -> str:
    """One line for a --set key that is not a setting: the closest keys ("did you mean"), else the section's keys,
    else the sections."""
    import difflib

    keys = _known_keys(config).split(", ")
    sections = sorted({k.split(".")[0] for k in keys})
    section, _, leaf = key.rpartition(".")
    close = [k for k in keys if k.endswith(f".{key}")]  # `epochs` for train.epochs
    if section:
        for near in [section] if section in sections else difflib.get_close_matches(section, sections, n=1, cutoff=0.6):
            leaves = [k.removeprefix(f"{near}.") for k in keys if k.startswith(f"{near}.")]
            close += [f"{near}.{m}" for m in difflib.get_close_matches(leaf, leaves, n=3, cutoff=0.6)]
    if close:
        named = close[:3]
        said = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} or {named[-1]}"
        return f"unknown config key '{key}' in --set {override}; did you mean {said}?"
    section = key.split(".")[0]
    in_section = [k for k in keys if k.startswith(f"{section}.")]
    if in_section:
        return f"unknown config key '{key}' in --set {override}; {section} has: {', '.join(in_section)}"
    return (f"unknown config key '{key}' in --set {override}; settings are SECTION.KEY, sections: "
            f"{', '.join(sections)} (see `digits run --help`)")


def _known_keys(config: BaseModel, prefix: str = "") -> str:
    keys = []
    for name, field in type(config).model_fields.items():
        public = field.alias or name
        if _is_model(field.annotation):
            keys.append(_known_keys(getattr(config, name), f"{prefix}{public}."))
        else:
            keys.append(f"{prefix}{public}")
    return ", ".join(keys)
