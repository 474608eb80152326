"""Typed artifacts passed between stages: a folder plus a little metadata, frozen.

A stage writes its artifact's folder in a temp location; `moved_to` re-points the reference once the
folder is renamed into place. `hashes` maps each content file (those named by the class's CONTENT
patterns: what later stages read) to its sha256, recorded in run.json when the stage completed. The
accessors that hand a later stage a file to read (`Examples.parquet`, `Converted.files`, `Trained.path`,
...) check that file against it first and raise DamagedArtifact naming it when it differs: nothing
reads a file its stage did not write. The keys of the stages that consume an artifact are made from
its `digest` (schemas.stages).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from schemas.dataset import Source, Split
from schemas.errors import DamagedArtifact


@dataclass(frozen=True)
class Publication:
    """Something a stage shows in Prefect's UI (flows.pipeline turns it into a Prefect artifact)."""

    kind: Literal["table", "link", "markdown"]
    key: str
    description: str
    content: Any  # table: list of row dicts; link: a URL; markdown: the text
    link_text: str | None = None
    registry_uri: str | None = None  # a link to what a registry version keeps: shown as its page in the MLflow UI
    # when a tracking server is configured (a browser refuses file:// links from an http page)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    dir: Path
    hashes: dict[str, str] = field(default_factory=dict)  # content file (relative) -> sha256, as recorded

    CONTENT: ClassVar[tuple[str, ...]] = ("**/*",)  # glob patterns (under dir) of what later stages read

    def moved_to(self, new_dir: Path):
        return dataclasses.replace(self, dir=new_dir)

    def summary(self) -> dict[str, Any]:
        """JSON-able fields other than the folder and its hashes, for run.json."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("dir", "hashes")}

    @classmethod
    def load(cls, stage_dir: Path, summary: dict[str, Any], hashes: dict[str, str] | None = None):
        """Rebuild the reference from a completed stage folder and its run.json record."""
        known = {f.name for f in dataclasses.fields(cls)} - {"dir", "hashes"}
        return cls(dir=stage_dir, hashes=dict(hashes or {}), **{k: v for k, v in summary.items() if k in known})

    def hash_content(self) -> dict[str, str]:
        """sha256 of every content file now on disk, by relative path."""
        found = sorted({p for pattern in self.CONTENT for p in self.dir.glob(pattern) if p.is_file()})
        return {p.relative_to(self.dir).as_posix(): sha256_file(p) for p in found}

    def with_content_hashed(self):
        return dataclasses.replace(self, hashes=self.hash_content())

    @property
    def digest(self) -> str:
        """One sha256 for the whole content: what the keys of the stages that consume it are made from."""
        return hashlib.sha256(json.dumps(sorted(self.hashes.items())).encode()).hexdigest()

    def verify(self, *names: str) -> None:
        """Raise DamagedArtifact naming the first content file (of `names`, or all of them) that is missing,
        changed or unexpected since the stage that made it recorded it. An artifact with nothing recorded
        yet (its stage still running) passes."""
        if not self.hashes:
            return
        if names:
            for name in names:
                self._check(name, self.dir / name)
            return
        for name in sorted(self.hashes):
            self._check(name, self.dir / name)
        for name in sorted(set(self.hash_content()) - set(self.hashes)):
            raise DamagedArtifact(self.dir / name, "not written by its stage (run.json does not record it)")

    def _check(self, name: str, path: Path) -> None:
        if name not in self.hashes:
            raise DamagedArtifact(path, "not written by its stage (run.json does not record it)")
        if not path.is_file():
            raise DamagedArtifact(path, "missing: its stage wrote it and run.json records it")
        if sha256_file(path) != self.hashes[name]:
            raise DamagedArtifact(path, "damaged: it is not the file its stage wrote (its sha256 differs from "
                                        "the one run.json records)")

    def describe(self) -> str:
        """One line for the console and the flow's log."""
        return str(self.dir)

    def publications(self) -> list[Publication]:
        """What the stage shows in Prefect's UI."""
        return []


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
    named: bool = False  # files.csv says which file each row came from (sources of one file per image)
    skipped: dict[str, int] = field(default_factory=dict)  # per split, files left out as not images (Thumbs.db)
    review: dict[str, Any] | None = None  # ingest.review applied: file, sha256, relabelled, unchanged, dropped

    FILES_CSV = "files.csv"
    REVIEW_APPLIED = "review-applied.csv"  # id, given_label, decision: what ingest.review changed
    CONTENT = ("*.parquet", FILES_CSV, REVIEW_APPLIED)

    @staticmethod
    def file_name(split: Split | str) -> str:
        return f"{Split(split).value}.parquet"

    def parquet(self, split: Split | str) -> Path:
        """The split's Parquet file, verified (DamagedArtifact if it is not what ingest wrote)."""
        self.verify(self.file_name(split))
        return self.dir / self.file_name(split)

    def has(self, split: Split | str) -> bool:
        return (self.dir / self.file_name(split)).is_file()

    def files(self, split: Split | str) -> dict[int, str] | None:
        """id -> the file a row of split came from, for a named source; None otherwise."""
        if not self.named:
            return None
        import csv

        self.verify(self.FILES_CSV)
        with (self.dir / self.FILES_CSV).open(newline="") as fh:
            return {int(row["id"]): row["file"] for row in csv.DictReader(fh) if row["split"] == Split(split).value}

    @classmethod
    def load(cls, stage_dir: Path, summary: dict[str, Any], hashes: dict[str, str] | None = None) -> Examples:
        examples = super().load(stage_dir, summary, hashes)
        return dataclasses.replace(examples, source=Source(examples.source))

    def describe(self) -> str:
        rows = ", ".join(f"{split} {n:,}" + (f" ({self.rejected[split]:,} rejected)" if self.rejected.get(split) else "")
                         + (f" ({self.skipped[split]:,} non-image files skipped)" if self.skipped.get(split) else "")
                         for split, n in self.counts.items())
        return f"{rows} rows"


@dataclass(frozen=True)
class Validation(Artifact):
    """The validate stage's blessing of a dataset: results.json + Data Docs (index.html)."""

    passed: bool = False
    failures: list[str] = field(default_factory=list)
    evaluated: int = 0
    statistics: dict[str, Any] = field(default_factory=dict)

    CONTENT = ("results.json",)

    @property
    def report(self) -> Path:
        return self.dir / "report.html"  # every suite's results, offline (index.html: GX's Data Docs)

    def describe(self) -> str:
        state = "passed" if self.passed else f"{len(self.failures)} failed (recorded as warnings)"
        return f"{self.evaluated} expectations, {state}: {self.report}"

    def publications(self) -> list[Publication]:
        results = self.dir / "results.json"
        rows = json.loads(results.read_text())["results"] if results.is_file() else []
        columns = ("batch", "expectation", "column", "success", "observed", "intent")
        return [Publication("table", "validation-results", f"Great Expectations results ({self.dir.parent.name})",
                            [{k: str(r[k]) for k in columns} for r in rows]),
                Publication("link", "validation-report", f"validation report of run {self.dir.parent.name}",
                            self.report.as_uri(), "validation report")]


@dataclass(frozen=True)
class Converted(Artifact):
    """The convert stage's TFRecords: `{train,val,test}-*.tfrecord.gz` shards + manifest.json
    (see schemas.examples). run.json records this summary, the split plan included."""

    counts: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    fingerprint: str = ""  # of the examples written, shard by shard (manifest.json)
    input_fingerprint: str = ""  # of the canonical data they were made from
    split: dict[str, Any] = field(default_factory=dict)  # seed, val_fraction, counts per class
    runner: str = ""
    CONTENT = ("*.tfrecord.gz", "manifest.json")

    def describe(self) -> str:
        rows = ", ".join(f"{split} {n:,} ({self.shards[split]} shards)" for split, n in self.counts.items())
        return f"{rows} on {self.runner}, fingerprint {self.fingerprint[:12]}"

    def labelled(self, split: str) -> bool | None:
        """Whether every row of the split has a label, from the manifest's label counts (no shard is read); None
        when they are not known."""
        from schemas.examples import NO_LABEL

        counts = self.label_counts.get(split)
        if not counts:
            return None
        return str(NO_LABEL) not in counts

    def files(self, split: str) -> list[Path]:
        """The shards of one split (train, val or test), in manifest order, verified with the manifest
        (DamagedArtifact if one is not what convert wrote)."""
        from schemas.examples import MANIFEST, shard_files

        self.verify(MANIFEST)
        shards = shard_files(self.dir, split)
        self.verify(*(shard.name for shard in shards))
        return shards


@dataclass(frozen=True)
class Tuned(Artifact):
    """The tune stage: best.json (the winning train settings and their val accuracy), trials.csv (every trial:
    its state, settings, per-epoch val accuracy), history.png and importances.png (Optuna's pictures),
    report.html."""

    best_params: dict[str, Any] = field(default_factory=dict)  # train.<field> -> value: what train uses
    best_value: float = 0.0  # the best trial's val accuracy after tune.epochs epochs
    best_trial: int | None = None
    trials: int = 0  # finished trials: complete + pruned + failed
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # a trial whose training diverged (NaN) counts here, not as a stage failure
    study: str = ""  # the Optuna study's name in its storage
    storage: str = ""  # where the study lives (the SQLAlchemy URL, password removed)
    resumed_trials: int = 0  # trials an earlier, killed attempt had finished
    seconds: float = 0.0

    CONTENT = ("best.json",)

    @property
    def report(self) -> Path:
        return self.dir / "report.html"

    def describe(self) -> str:
        chosen = ", ".join(f"{k}={_short(v)}" for k, v in self.best_params.items())
        return (f"best of {self.trials} trials ({self.complete} complete, {self.pruned} pruned, {self.failed} failed): "
                f"val_accuracy {self.best_value:.2%} with {chosen}; report {self.report}")

    def publications(self) -> list[Publication]:
        rows = [{"setting": f"train.{k}", "value": _short(v)} for k, v in self.best_params.items()]
        return [Publication("table", "tune-best", f"best of {self.trials} trials: val accuracy {self.best_value:.4%}",
                            rows),
                Publication("link", "tune-report", "the study's report", self.report.as_uri(), "tune report")]


@dataclass(frozen=True)
class Reviewed(Artifact):
    """The review stage (components.review): suspects.csv (labels confident learning doubts, most suspect first),
    review-decisions.csv (the same as a file of decisions for a person to edit and give to ingest), review.json,
    report.html, folds/ (each fold's model and out-of-sample probabilities)."""

    images: int = 0  # train + val images reviewed
    suspects: int = 0  # of them, label issues found
    estimated_wrong_share: float | None = None  # confident learning's estimate for train + val
    out_of_sample_accuracy: float | None = None  # the folds' models on the images they did not train on
    test_suspects: int | None = None  # a labelled test split's issues (reported only); None: no test labels
    mlflow_run_id: str | None = None

    SUSPECTS = "suspects.csv"  # id,split,given_label,suggested_label,quality,suggested_probability
    DECISIONS = "review-decisions.csv"  # id,decision: for a person to edit, then ingest.review
    SUMMARY = "review.json"
    REPORT = "report.html"
    CONTENT = (SUSPECTS, SUMMARY)

    @property
    def report(self) -> Path:
        return self.dir / self.REPORT

    @property
    def decisions(self) -> Path:
        return self.dir / self.DECISIONS

    @property
    def suspects_file(self) -> Path:
        """suspects.csv, verified (DamagedArtifact if it is not what the review stage wrote)."""
        self.verify(self.SUSPECTS)
        return self.dir / self.SUSPECTS

    def describe(self) -> str:
        share = "" if self.estimated_wrong_share is None else \
            f", estimated wrong labels {self.estimated_wrong_share:.2%}"
        test = "" if self.test_suspects is None else f"; test: {self.test_suspects:,} suspects (reported only)"
        return f"{self.suspects:,} suspect labels of {self.images:,} images{share}{test}; report {self.report}"

    def publications(self) -> list[Publication]:
        rows = []
        with self.suspects_file.open() as fh:
            for row in csv.DictReader(fh):
                rows.append(row)
                if len(rows) == 20:
                    break
        share = "n/a" if self.estimated_wrong_share is None else f"{self.estimated_wrong_share:.2%}"
        return [Publication("table", "label-review", f"{self.suspects:,} suspect labels of {self.images:,} "
                            f"(estimated wrong: {share}); the 20 most suspect", rows),
                Publication("link", "label-review-report", "the label review", self.report.as_uri(), "label review")]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Trained(Artifact):
    """The train stage's model: `model.keras` (or `model.joblib` for pca-svm), seen.npz (the fingerprints
    of every image it was trained on, its base's included: components.lineage), checkpoints/, logs/
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
    processor: str = ""  # the CPU's name where it trained (an ensemble: its members', distinct); "" before 2026-12-05
    mlflow_run_id: str | None = None
    base: str | None = None  # transfer: the model it started from (e.g. models:/digits-mnist/3); None: scratch
    transfer_mode: str | None = None  # transfer: full | frozen | gradual
    temperature: float | None = None  # calibrate: the temperature inside the model (components.calibrate)
    calibration: dict[str, Any] | None = None  # calibrate: ECE before / after, fitted on val
    members: list[dict[str, Any]] | None = None  # an ensemble's members: name, model, seed, val_accuracy, worker...
    tuned: dict[str, Any] | None = None  # the tune stage's settings it was trained with (train.<field> -> value)
    rehearsal: dict[str, Any] | None = None  # transfer.rehearse: the base run, its data, share, noise, rows

    SEEN = "seen.npz"
    CONTENT = ("model.keras", "model.joblib", SEEN)

    @property
    def path(self) -> Path:
        """The model file, verified (DamagedArtifact if it is not what its stage wrote)."""
        self.verify(self.file)
        return self.dir / self.file

    @property
    def seen_path(self) -> Path | None:
        """seen.npz, verified; None for a model trained before digits recorded seen images."""
        if self.SEEN not in self.hashes and not (self.dir / self.SEEN).is_file():
            return None
        self.verify(self.SEEN)
        return self.dir / self.SEEN

    def describe(self) -> str:
        origin = f" from {self.base} ({self.transfer_mode})" if self.base else ""
        if self.temperature is not None:
            origin += f", calibrated (temperature {self.temperature:.3f})"
        resumed = f", resumed at epoch {self.resumed_at_epoch}" if self.resumed_at_epoch else ""
        return (f"{self.model}{origin}: val_accuracy {self.val_accuracy:.2%} ({self.epochs} epochs, "
                f"{self.seconds:.1f} s this attempt{resumed}): {self.dir / self.file}")


@dataclass(frozen=True)
class Exported(Artifact):
    """The export stage: submission.csv, saved_model/ (serving_default), model.keras, infra_validation.json."""

    submission: str = "submission.csv"
    test_rows: int = 0
    model: str = "saved_model"  # what infra-validation loaded in a process of its own
    infra_rows: int = 0  # test rows predicted there, every label equal to the in-flow prediction
    max_probability_diff: float = 0.0
    predict_seconds: float = 0.0  # in-flow prediction of every test row
    label_counts: dict[str, int] = field(default_factory=dict)
    seen_test: int | None = None  # test rows the model was trained on (seen-test-images.csv); None: unknown
    test_accuracy: float | None = None  # on a test split with labels (MNIST's, the noisy set's); never used to choose

    CONTENT = ("submission.csv", "model.keras", "model.joblib", "saved_model/**/*")

    @property
    def submission_path(self) -> Path:
        return self.dir / self.submission

    def describe(self) -> str:
        submitted = f"{self.test_rows:,} test rows: {self.submission_path}" if self.submission else "no test split"
        if self.test_accuracy is not None:
            submitted += f" (test accuracy {self.test_accuracy:.2%})"
        if self.seen_test:
            submitted += f" (warning: {self.seen_test:,} of them were seen in training: seen-test-images.csv)"
        return (f"{submitted}; {self.model} agreed with the in-flow predictions on {self.infra_rows} rows in a "
                "process of its own")

    def publications(self) -> list[Publication]:
        if not self.submission:
            return []
        return [Publication("link", "submission", f"{self.test_rows:,} test rows (run {self.dir.parent.name})",
                            self.submission_path.as_uri(), self.submission)]


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
    model: str = ""  # the zoo name of the model evaluated
    comparison: dict[str, Any] | None = None  # paired with the champion on the same images (evaluate.compare)
    seen_val: int = 0  # val images the model was trained on (its seen set, components.lineage)
    seen_test: int = 0  # test images it was trained on
    lineage_warning: str | None = None  # test images seen, or a lineage not (fully) known
    members: list[dict[str, Any]] | None = None  # an ensemble's members, each scored alone on the same images
    ood_file: str | None = None  # the out-of-distribution detector fitted for the model (components.ood)

    CONTENT = ("metrics.json", "ood.npz")

    def path_of(self, name: str) -> Path:
        """A content file of the evaluation, verified (DamagedArtifact if it is not what evaluate wrote)."""
        self.verify(name)
        return self.dir / name

    @property
    def report(self) -> Path:
        return self.dir / "report.html"

    def describe(self) -> str:
        warning = f"; warning: {self.lineage_warning}" if self.lineage_warning else ""
        return (f"val_accuracy {self.val_accuracy:.2%}; gate {'passed' if self.passed else 'refused'}: {self.reason}"
                f"{warning}; report {self.report}")

    def publications(self) -> list[Publication]:
        champion = (f"champion version {self.champion_version}: {self.champion_val_accuracy:.4%} on the same data"
                    if self.champion_version else "no champion yet")
        paired = ""
        if self.comparison:
            c = self.comparison
            paired = (f"| paired with the champion | {c['images']:,} images: both right {c['both_right']:,}, only the "
                      f"candidate {c['candidate_only_right']:,}, only the champion {c['champion_only_right']:,}, both "
                      f"wrong {c['both_wrong']:,}; difference {c['difference']:+.2%} (95 % CI {c['ci95'][0]:+.2%} to "
                      f"{c['ci95'][1]:+.2%}), McNemar p = {c['p_value']:.3g} |\n")
        run = self.dir.parent.name
        return [Publication("markdown", "evaluation-summary", f"evaluation of run {run}", (
            f"## Evaluation of run `{run}`\n\n| | |\n|---|---|\n| model | `{self.model}` |\n"
            f"| val_accuracy | **{self.val_accuracy:.4%}** |\n| threshold | {self.threshold:.2%} |\n"
            f"| champion | {champion} |\n{paired}| seen in training | val {self.seen_val:,}, test {self.seen_test:,} |\n"
            f"| gate | **{'passed' if self.passed else 'refused'}** |\n{self._members_rows()}\n{self.reason}\n\n"
            + (f"**Warning:** {self.lineage_warning}\n\n" if self.lineage_warning else "")
            + f"Report: `{self.report}`\n"))]


    def _members_rows(self) -> str:
        return "".join(f"| {m['name']} ({m['model']}, seed {m['seed']}) | {m['val_accuracy']:.4%} alone |\n"
                       for m in self.members or [])


@dataclass(frozen=True)
class Registration(Artifact):
    """The register stage: registration.json — the registry version made (None when the gate refused),
    whether it became champion, and why."""

    model_name: str = ""
    version: str | None = None
    promoted: bool = False
    reason: str = ""
    model_card: str | None = None  # model_card.html (and .md) in dir, kept with the version in the registry

    CONTENT = ("registration.json",)

    def describe(self) -> str:
        if self.version is None:
            return f"not registered: {self.reason}"
        return f"registered {self.model_name} version {self.version}" + (" (champion)" if self.promoted else "")

    def publications(self) -> list[Publication]:
        if self.version is None:
            return []
        uri = f"models:/{self.model_name}/{self.version}"
        found = [Publication("link", "registry-version", "champion" if self.promoted else "registered, not champion",
                             uri, f"{self.model_name} version {self.version}", registry_uri=uri)]
        if self.model_card:
            found.append(Publication("link", "model-card", f"model card of {self.model_name} version {self.version}",
                                     (self.dir / self.model_card).as_uri(), "model card", registry_uri=uri))
        return found
