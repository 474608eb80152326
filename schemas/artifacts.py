"""Typed artifacts passed between stages: a folder plus a little metadata, frozen.

A stage writes its artifact's folder in a temp location; `moved_to` re-points the reference once the
folder is renamed into place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.dataset import Source, Split


@dataclass(frozen=True)
class Artifact:
    dir: Path

    def moved_to(self, new_dir: Path):
        return dataclasses.replace(self, dir=new_dir)

    def summary(self) -> dict[str, Any]:
        """JSON-able fields other than the folder, for run.json."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "dir"}

    @classmethod
    def load(cls, stage_dir: Path, summary: dict[str, Any]):
        """Rebuild the reference from a completed stage folder and its run.json summary."""
        known = {f.name for f in dataclasses.fields(cls)} - {"dir"}
        return cls(dir=stage_dir, **{k: v for k, v in summary.items() if k in known})


@dataclass(frozen=True)
class Examples(Artifact):
    """The canonical dataset of one run: `<split>.parquet` per split (see schemas.dataset)."""

    source: Source = Source.kaggle
    counts: dict[str, int] = field(default_factory=dict)
    rows_read: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    labelled: dict[str, bool] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def file_name(split: Split | str) -> str:
        return f"{Split(split).value}.parquet"

    def parquet(self, split: Split | str) -> Path:
        return self.dir / self.file_name(split)

    @classmethod
    def load(cls, stage_dir: Path, summary: dict[str, Any]) -> Examples:
        examples = super().load(stage_dir, summary)
        return dataclasses.replace(examples, source=Source(examples.source))


@dataclass(frozen=True)
class Validation(Artifact):
    """The validate stage's blessing of a dataset: results.json + Data Docs (index.html)."""

    passed: bool = False
    failures: list[str] = field(default_factory=list)
    evaluated: int = 0
    statistics: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> Path:
        return self.dir / "index.html"


@dataclass(frozen=True)
class Converted(Artifact):
    """The convert stage's TFRecords: `{train,val,test}-*.tfrecord.gz` shards + manifest.json
    (see schemas.examples). run.json records this summary, the split plan included."""

    counts: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    fingerprint: str = ""  # of the examples written, shard by shard (manifest.json)
    input_fingerprint: str = ""  # of the canonical data they were made from
    cache_key: str = ""  # input fingerprint + split + sharding: equal keys, byte-identical shards
    split: dict[str, Any] = field(default_factory=dict)  # seed, val_fraction, counts per class
    runner: str = ""
    reused_from: str | None = None  # the stage folder whose shards were linked instead of recomputed

    def files(self, split: str) -> list[Path]:
        """The shards of one split (train, val or test), in manifest order."""
        from schemas.examples import shard_files

        return shard_files(self.dir, split)


@dataclass(frozen=True)
class Trained(Artifact):
    """The train stage's model: `model.keras` (or `model.joblib` for pca-svm), checkpoints/, logs/
    (TensorBoard), history.csv (per-epoch metrics)."""

    model: str = ""  # the zoo name
    file: str = "model.keras"
    epochs: int = 0
    resumed_at_epoch: int | None = None  # set when an interrupted attempt was continued
    val_accuracy: float = 0.0
    train_rows: int = 0
    val_rows: int = 0
    parameters: int | None = None
    seconds: float = 0.0  # training wall time of the last attempt
    seconds_per_epoch: float | None = None  # median over every epoch run
    device: str = "CPU"
    mlflow_run_id: str | None = None
    base: str | None = None  # transfer: the model it started from (e.g. models:/digits-mnist/3); None: scratch
    transfer_mode: str | None = None  # transfer: full | frozen | gradual

    @property
    def path(self) -> Path:
        return self.dir / self.file


@dataclass(frozen=True)
class Exported(Artifact):
    """The export stage: submission.csv, saved_model/ (serving_default), model.keras, infra_validation.json."""

    submission: str = "submission.csv"
    test_rows: int = 0
    model: str = "saved_model"  # what infra-validation loaded in a fresh process
    infra_rows: int = 0  # test rows predicted there, every label equal to the in-flow prediction
    max_probability_diff: float = 0.0
    predict_seconds: float = 0.0  # in-flow prediction of every test row
    label_counts: dict[str, int] = field(default_factory=dict)

    @property
    def submission_path(self) -> Path:
        return self.dir / self.submission


@dataclass(frozen=True)
class Evaluation(Artifact):
    """The evaluate stage: metrics.json (accuracy, per class, confusion, gate), robustness.json,
    confusion.png, errors.png, robustness.png, report.html."""

    val_accuracy: float = 0.0
    passed: bool = False  # the gate: may this model become champion?
    reason: str = ""
    threshold: float = 0.0
    champion_version: str | None = None
    champion_val_accuracy: float | None = None

    @property
    def report(self) -> Path:
        return self.dir / "report.html"
