"""Registration: a gate-passing model becomes a new version of `digits-<source>` in the registry, the champion when
the gate says so — with its lineage, its model card, and what decided the promotion kept where a registry user
looks for it.

- `Lineage`: the facts a version carries as `digits.*` tags (one type; `tags()` writes them).
- `register`: the version (an MLflow Model, components.registry.mlflow_model), the champion re-checked under the
  registry's lock (a champion that changed during the run is measured on this run's val split first), the
  seen-image set and out-of-distribution detector kept with it, the model card, the evaluation (metrics,
  report.html, the card) logged to the version's MLflow run, and the version's description saying why it was or
  was not promoted. A refused model is logged to its MLflow run only.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from components.registry import MODEL_SHA256, Registry, Version, check_not_replaced, remember
from schemas.artifacts import Converted, Evaluation, Registration, Trained, Validation

Progress = Callable[[str], None]
PREFIX = "digits."
INPUT_PREFIX = "digits.input."  # one tag per input file of the data: its fingerprint


@dataclass(frozen=True)
class Lineage:
    """What a registered version records of where it came from, as `digits.<field>` tags."""

    run_id: str
    pipeline: str
    code_version: str
    data_fingerprint: str
    model: str
    val_accuracy: float
    promote_when: str
    seen_val_images: int = 0
    seen_test_images: int = 0
    evaluation_report: str = ""  # the run's report.html and Data Docs, on the machine that ran it
    validation_report: str = ""
    mlflow_run_id: str | None = None  # the MLflow run it was trained in
    comparison: dict[str, Any] | None = None  # paired with the champion it was measured against
    allow_seen_val: bool = False
    base: str | None = None  # transfer: the model it was fine-tuned from, and how
    transfer_mode: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # input file name -> sha256

    def tags(self) -> dict[str, str]:
        tags: dict[str, str] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "inputs":
                tags.update({f"{INPUT_PREFIX}{Path(k).name}": v for k, v in value.items()})
            elif value is None or (item.name == "allow_seen_val" and not (value and self.seen_val_images)):
                continue
            elif item.name == "val_accuracy":
                tags[PREFIX + item.name] = f"{value:.6f}"
            elif isinstance(value, dict):
                tags[PREFIX + item.name] = json.dumps(value)
            elif isinstance(value, bool):
                tags[PREFIX + item.name] = "true" if value else "false"
            else:
                tags[PREFIX + item.name] = str(value)
        return tags


RUN_TAGS = ("stage",)  # on a stage's MLflow run only (tune trials and ensemble members add digits.trial/.member)
_TAGGED = frozenset(RUN_TAGS) | {item.name for item in dataclasses.fields(Lineage)}


def tag(field: str) -> str:
    """The tag a Lineage field (or one of RUN_TAGS) is written as: `digits.<field>`. Readers of a version's tags
    name them through this, so a field renamed here cannot leave a reader looking for the old tag."""
    if field not in _TAGGED:
        raise ValueError(f"'{field}' is not a lineage field")
    return PREFIX + field


@dataclass(frozen=True)
class Gate:
    """How the evaluate stage decided, to decide again against a champion promoted during the run."""

    threshold: float
    policy: Any  # schemas.config.PromoteWhen
    alpha: float
    allow_seen_val: bool
    allow_new_registry: bool


def register(reg: Registry, home: Path, name: str, out: Path, progress: Progress, *, model: Trained,
             converted: Converted, evaluation: Evaluation, validation: Validation | None, lineage: Lineage,
             gate: Gate, card: dict[str, Any], in_memory_rows: int = 100_000) -> Registration:
    """Register model (see the module's text) into out (registration.json, model_card.html/.md). card: the
    model card's facts this function does not know (training settings, source title, code version);
    in_memory_rows: a val split larger than this is streamed when a champion is re-measured on it."""
    from components import evaluate as evaluate_component
    from components.train.feed import Feed

    out.mkdir(parents=True, exist_ok=True)
    if not evaluation.passed:
        progress(f"not registered: {evaluation.reason}")
        if model.mlflow_run_id:
            from components.registry import mlflow_model
            from components.tracking import mlflow_client, tracking_uri

            uri = tracking_uri(home)
            mlflow_model.log(mlflow_client(uri), model.mlflow_run_id, model.path, example=_example(converted))
            log_evaluation(uri, model.mlflow_run_id, evaluation, [], f"not registered: {evaluation.reason}")
        return _written(out, Registration(dir=out, model_name=name, reason=evaluation.reason))
    reason = evaluation.reason
    val = None

    def decide(current: Version | None) -> bool:
        nonlocal reason, val
        if current is None or current.version == evaluation.champion_version:
            return True
        val = val if val is not None else Feed.of(converted.files("val"), converted.counts["val"], in_memory_rows)
        with tempfile.TemporaryDirectory(prefix="digits-champion-") as scratch:
            _, labels, (champion, candidate) = val.scored(
                evaluate_component.load_predict(reg.download(current, Path(scratch)), current.tags.get(MODEL_SHA256)),
                evaluate_component.load_predict(model.path, model.hashes.get(model.file)))
        comparison = {"champion_version": current.version, **evaluate_component.compare(
            labels, candidate.argmax(axis=1), champion.argmax(axis=1))}
        decision = evaluate_component.decide(evaluation.val_accuracy, gate.threshold, comparison, gate.policy,
                                             gate.alpha, seen_val=evaluation.seen_val,
                                             allow_seen_val=gate.allow_seen_val)
        reason = decision["reason"] + " (champion replaced during this run)"
        return decision["passed"]

    check_not_replaced(home, reg, name, allow_new=gate.allow_new_registry)
    kept = {Trained.SEEN: model.seen_path} if model.seen_path else {}
    if evaluation.ood_file:
        kept[evaluation.ood_file] = evaluation.path_of(evaluation.ood_file)  # predict --reject-ood fetches it
    version, promoted = reg.register(name, model.path, lineage.tags(), decide, files=kept or None,
                                     example=_example(converted))
    remember(home, reg, version)
    progress(f"registered {name} version {version.version}" + (" as champion" if promoted else ", not champion"))
    pages = write_model_card(out, version, promoted, model=model, converted=converted, evaluation=evaluation,
                             lineage=lineage, card=card)
    reg.attach(version, {path.name: path for path in pages})
    why = (f"champion: {reason}" if promoted else f"registered, not champion: {reason}")
    reg.describe(version, why)
    run_id = version.tags.get("digits.mlflow_run_id")
    if run_id:
        from components.tracking import tracking_uri

        documents = [("evaluation", evaluation.report), *(("model_card", page) for page in pages)]
        if validation is not None:
            documents += [("validation", validation.report), ("validation", validation.dir / "results.json")]
        log_evaluation(tracking_uri(home), run_id, evaluation, [(where, p) for where, p in documents if p.is_file()],
                       why)
    from components import model_card, pages as run_pages

    model_card.add_nav(out / model_card.HTML, run_pages.nav(out.parent, "register", mlflow_run=run_id))
    return _written(out, Registration(dir=out, model_name=name, version=version.version, promoted=promoted,
                                      reason=reason, model_card="model_card.html"))


def _example(converted: Converted):
    """The first val image, the registered model's input example (None when there is none)."""
    from components import records

    try:
        val = records.load(converted.files("val"), limit=1)
    except Exception:  # an input example is a courtesy; a failure to read one never blocks a registration
        return None
    return val.images[:1] if len(val.images) else None


def write_model_card(out: Path, version: Version, promoted: bool, *, model: Trained, converted: Converted,
                     evaluation: Evaluation, lineage: Lineage, card: dict[str, Any]) -> list[Path]:
    """The version's model card (components.model_card) from the artifacts it is handed, into out."""
    from components import model_card

    evaluation.verify("metrics.json")
    robustness = evaluation.dir / "robustness.json"
    training = {"model": model.model, "parameters": model.parameters, "epochs": model.epochs, "device": model.device,
                "processor": model.processor, "seconds": model.seconds, "base": model.base,
                "transfer_mode": model.transfer_mode, "config": card.get("settings", {})}
    facts = {"name": version.name, "version": version.version, "promoted": promoted, "run_id": lineage.run_id,
             "code_version": lineage.code_version, "model_sha256": version.tags.get(MODEL_SHA256, ""),
             "registered_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "source_title": card.get("source_title", ""), "pipeline": lineage.pipeline,
             "counts": converted.counts, "data_fingerprint": converted.fingerprint, "inputs": dict(card.get("inputs", {})),
             "training": training, "metrics": json.loads((evaluation.dir / "metrics.json").read_text()),
             "robustness": json.loads(robustness.read_text()) if robustness.is_file() else {}}
    return model_card.write(out, facts, evaluation.dir)


def evaluation_metrics(evaluation: Evaluation) -> dict[str, float]:
    """What decided the promotion, as MLflow metrics (prefix `eval_`): val accuracy, the gate, recall and precision
    per class, ECE, and the paired comparison with the champion."""
    metrics = json.loads((evaluation.dir / "metrics.json").read_text())
    found = {"eval_val_accuracy": metrics["val_accuracy"], "eval_gate_passed": float(evaluation.passed)}
    for digit, value in (metrics.get("per_class") or {}).items():  # recall: the class's accuracy
        for key in ("recall", "precision"):
            if isinstance(value, dict) and isinstance(value.get(key), (int, float)):
                found[f"eval_class_{digit}_{key}"] = value[key]
    calibration = metrics.get("calibration") or {}
    if isinstance(calibration.get("ece"), (int, float)):
        found["eval_ece"] = calibration["ece"]
    comparison = metrics.get("comparison") or {}
    for key in ("difference", "p_value", "champion_accuracy"):
        if isinstance(comparison.get(key), (int, float)):
            found[f"eval_champion_{key}"] = comparison[key]
    return {k: float(v) for k, v in found.items()}


def log_evaluation(uri: str, run_id: str, evaluation: Evaluation, files: list[tuple[str, Path]], decision: str) -> None:
    """The evaluation into the MLflow run of the version: metrics, evaluation/metrics.json, the documents (artifact
    folder, file) — report.html, the validation report, the model card — and the decision as the tag
    `digits.decision`."""
    import time

    from mlflow.entities import Metric, RunTag

    from components.tracking import mlflow_client

    client = mlflow_client(uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in evaluation_metrics(evaluation).items()],
                     tags=[RunTag("digits.decision", decision[:5000])])
    for where, path in [("evaluation", evaluation.dir / "metrics.json"), *files]:
        client.log_artifact(run_id, str(path), artifact_path=where)


def _written(out: Path, registration: Registration) -> Registration:
    from schemas.runs import write_json_atomic

    write_json_atomic(out / "registration.json", registration.summary())
    return registration
