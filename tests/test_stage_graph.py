"""The stage graph is the one place stages are declared: a stage added here, in this file alone (one
declaration and one function), is run by the flow, listed by `digits reports`, made stale when an
earlier stage runs again, and run again by `digits resume` — with nothing else changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import datagen
import schemas.stages
from schemas.artifacts import Artifact
from schemas.stages import GRAPH, Report, Stage


def measure_confidence(folder, config, out: Path, progress, *, model, converted) -> Artifact:
    """How sure the model is of what it gets right and wrong on the val split: mean top probability of
    each, written to confidence.json."""
    from components import records
    from components.evaluate import load_predict

    val = records.load(converted.files("val"))
    probabilities = load_predict(model.path)(val.images)
    right = probabilities.argmax(axis=1) == val.labels
    out.mkdir(parents=True)
    (out / "confidence.json").write_text(json.dumps({
        "rows": len(right), "right": int(right.sum()),
        "mean_top_probability_right": float(probabilities.max(axis=1)[right].mean()) if right.any() else None,
        "mean_top_probability_wrong": float(probabilities.max(axis=1)[~right].mean()) if (~right).any() else None}))
    progress(f"confidence measured on {len(right)} validation images")
    return Artifact(dir=out)


CONFIDENCE = Stage("confidence", produces="confidence", artifact=Artifact, run=measure_confidence,
                   consumes=("model", "converted"), reports=(Report("confidence", "confidence.json"),),
                   help="Measure the model's confidence on what it gets right and wrong.")


@pytest.fixture
def extended(monkeypatch):
    monkeypatch.setattr(schemas.stages, "GRAPH", GRAPH.with_stage(CONFIDENCE, before="evaluate"))


@pytest.mark.e2e
def test_a_stage_declared_in_a_test_runs_reports_goes_stale_and_resumes(cli, home, tmp_path, extended):
    datagen.write_kaggle(tmp_path / "kaggle", n_train=100, n_test=10)
    result = cli("run", "train-kaggle", "--data", tmp_path / "kaggle", "--set", "validate.min_rows=10",
                 "--set", "train.epochs=1", "--set", "train.model=baseline", "--set", "evaluate.threshold=0")
    assert result.code == 0, result.err
    (run,) = (home / "runs").iterdir()
    record = json.loads((run / "run.json").read_text())
    assert list(record["stages"]) == ["ingest", "validate", "convert", "train", "calibrate", "confidence", "evaluate",
                                      "register", "export"]
    assert record["stages"]["confidence"]["status"] == "completed"
    assert "Task run 'confidence-" in result.out  # a Prefect task of its own, logging its progress
    assert "confidence measured on 10 validation images" in result.out
    measured = json.loads((run / "confidence/confidence.json").read_text())
    assert measured["rows"] == 10 and 0 <= measured["right"] <= 10

    listed = cli("reports", run.name)
    assert f"confidence: {run / 'confidence/confidence.json'}" in listed.out
    assert 'href="confidence/confidence.json"' in (run / "index.html").read_text()  # on the run's page too

    again = cli("convert", "--run", run.name, "--set", "convert.val_fraction=0.2")  # a new split
    assert again.code == 0, again.err
    stale = json.loads((run / "run.json").read_text())["stages"]
    downstream = ("train", "calibrate", "confidence", "evaluate", "register", "export")
    assert {name: stale[name]["status"] for name in downstream} == dict.fromkeys(downstream, "stale")
    assert stale["confidence"]["error"] == "convert was run again after it"
    assert cli("confidence", "--run", run.name).code == 2  # its own command: refuses the stale model

    resumed = cli("resume", run.name)
    assert resumed.code == 0, resumed.err
    after = json.loads((run / "run.json").read_text())
    assert after["status"] == "completed"
    assert all(after["stages"][name]["status"] == "completed" for name in after["stages"])
    assert after["stages"]["confidence"]["finished_at"] > record["stages"]["confidence"]["finished_at"]
    assert json.loads((run / "confidence/confidence.json").read_text())["rows"] == 20  # 20 % of 100 now
    for name in ("ingest", "validate"):  # not run again
        assert after["stages"][name]["finished_at"] == record["stages"][name]["finished_at"]


def test_the_graph_refuses_a_stage_whose_inputs_nothing_produces():
    with pytest.raises(ValueError, match=r"consumes \['calibration'\], which no earlier stage produces"):
        GRAPH.with_stage(Stage("late", produces="x", artifact=Artifact, run=measure_confidence,
                               consumes=("calibration",)), before="evaluate")


def test_downstream_follows_the_artifacts_not_the_order():
    assert GRAPH.downstream("convert") == ["review", "tune", "train", "transfer", "calibrate", "evaluate", "register",
                                           "export"]
    assert GRAPH.downstream("review") == ["evaluate", "register"]  # evaluate reads it when the plan has it
    assert GRAPH.downstream("tune") == ["train", "calibrate", "evaluate", "register", "export"]  # train's optional input
    assert GRAPH.downstream("evaluate") == ["register"]  # export reads the model, not the evaluation
    assert GRAPH.downstream("calibrate") == ["evaluate", "register", "export"]  # it refines the model


def test_an_optional_input_is_consumed_only_where_the_plan_produces_it():
    from schemas.config import apply_overrides, default_config

    plain = default_config("train-kaggle")
    tuned = apply_overrides(plain, ["tune.trials=2"])
    train = GRAPH.stage("train")
    assert GRAPH.consumed(train, plain) == ("converted",)
    assert GRAPH.consumed(train, tuned) == ("converted", "tuning")


def test_a_stage_reads_the_last_refinement_of_an_artifact_made_before_it():
    from schemas.config import apply_overrides, default_config

    calibrated = default_config("train-mnist")  # calibrated by default
    plain = apply_overrides(calibrated, ["evaluate.calibrate=false"])
    assert GRAPH.producer("model", plain, before="evaluate").name == "train"
    svm = apply_overrides(calibrated, ["train.model=pca-svm"])  # never calibrated: it has no probabilities to scale
    assert GRAPH.producer("model", svm, before="evaluate").name == "train"
    assert GRAPH.producer("model", calibrated, before="evaluate").name == "calibrate"
    assert GRAPH.producer("model", calibrated, before="calibrate").name == "train"
    assert [s.name for s in GRAPH.commands()["evaluate"]] == ["calibrate", "evaluate", "register"]
    assert GRAPH.downstream("ingest") == GRAPH.names()[1:]


def test_every_artifact_a_stage_reads_is_a_content_file_of_its_producer():
    """A stage's key is made from the digests of its inputs' CONTENT files: a class with none would make
    every key equal whatever the data."""
    for stage in GRAPH:
        assert stage.artifact.CONTENT, stage.name
        assert stage.reuse in ("content", "run") and (stage.reuse != "content" or stage.code), stage.name


def test_a_content_stage_is_reused_across_runs_until_its_output_is_gone(home, tmp_path):
    import shutil

    from flows import runner
    from runs import make, validated_kaggle_run

    datagen.write_kaggle(tmp_path / "kaggle", n_train=60, n_test=10)
    first, _ = validated_kaggle_run(tmp_path / "kaggle")
    second, config = validated_kaggle_run(tmp_path / "kaggle")
    for stage in ("ingest", "validate"):
        assert second.load().stages[stage].outputs["cached_from"] == str(first.stage_dir(stage))
        assert second.load().stages[stage].hashes == first.load().stages[stage].hashes
    shutil.rmtree(first.root)  # the run that made them is deleted: its cache entries lead nowhere
    third, _ = validated_kaggle_run(tmp_path / "kaggle")
    assert all("cached_from" not in third.load().stages[stage].outputs for stage in ("ingest", "validate"))
    assert third.load().stages["ingest"].hashes == second.load().stages["ingest"].hashes  # made again, the same
    fourth, _ = validated_kaggle_run(tmp_path / "kaggle")
    assert fourth.load().stages["ingest"].outputs["cached_from"] == str(third.stage_dir("ingest"))
    assert make(fourth, config, "converted").counts["val"] == 10  # round(10 % of 6) of each of 10 classes
    assert runner.output_of(fourth, "convert").hashes == fourth.load().stages["convert"].hashes
