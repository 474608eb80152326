"""The review stage (components.review) and its fixes fed back on ingest (components.ingest.review): planted
wrong labels found, a person's decisions applied and recorded, bad review files refused in one line."""

from __future__ import annotations

import csv
import json

import datagen
import numpy as np
import pyarrow.parquet as pq
import pytest
from runs import converted_kaggle_run, make

from components.ingest import review as review_file
from schemas.errors import DataFormatError

N_TRAIN, FLIPPED_SHARE = 3000, 0.01


def _flipped_kaggle(folder, seed: int = 7) -> set[int]:
    """A Kaggle-layout folder whose train labels are wrong for 1 % of the rows (seeded, across classes, each to
    a random other digit); returns the flipped rows' ids (1-based row numbers)."""
    labels, train = datagen.digits(N_TRAIN, seed=0)
    _, test = datagen.digits(20, seed=1)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(N_TRAIN, size=int(N_TRAIN * FLIPPED_SHARE), replace=False)
    labels = labels.copy()
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    datagen.write_kaggle_arrays(folder, labels, train, test)
    return {int(i) + 1 for i in flipped}


@pytest.mark.e2e
def test_planted_wrong_labels_are_found_and_the_decisions_file_names_them(home, tmp_path):
    flipped = _flipped_kaggle(tmp_path / "kaggle")
    folder, config = converted_kaggle_run(tmp_path / "kaggle", "review.enabled=true", "train.model=baseline",
                                          "train.epochs=2", "evaluate.threshold=0")
    reviewed = make(folder, config, "review")
    out = folder.stage_dir("review")
    with (out / "suspects.csv").open() as fh:
        suspects = list(csv.DictReader(fh))
    assert list(suspects[0]) == ["id", "split", "given_label", "suggested_label", "quality", "suggested_probability"]
    ranked = [int(row["id"]) for row in suspects if row["split"] in ("train", "val")]
    top = ranked[:len(flipped)]
    precision = len(set(top) & flipped) / len(top)
    recall = len(set(ranked) & flipped) / len(flipped)
    print(f"\nreview: {len(ranked)} suspects; precision at {len(flipped)} {precision:.0%}, recall {recall:.0%}; "
          f"estimated wrong {reviewed.estimated_wrong_share:.2%}")
    assert precision >= 0.8 and recall >= 0.8
    qualities = [float(row["quality"]) for row in suspects]
    assert qualities == sorted(qualities)  # most suspect first
    with (out / "review-decisions.csv").open() as fh:
        decisions = list(csv.DictReader(fh))
    assert [int(d["id"]) for d in decisions] == ranked and all(d["decision"].isdigit() for d in decisions)
    summary = json.loads((out / "review.json").read_text())["splits"]["train+val"]
    assert summary["images"] == N_TRAIN and len(summary["estimated_wrong_share_per_class"]) == 10
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == min(len(ranked), config.review.gallery) and "&rarr;" in page
    assert reviewed.estimated_wrong_share > config.review.warn_share - 0.015  # about the 1 % planted, or more
    from mlflow.tracking import MlflowClient

    from components.tracking import tracking_uri

    run = MlflowClient(tracking_uri(home)).get_run(reviewed.mlflow_run_id)
    assert run.data.metrics["review_suspects"] == len(ranked) and run.data.params["review.folds"] == "3"

    # evaluate reads the review: the model's val errors on doubted labels are said to be probably the label's
    make(folder, config, "model")
    make(folder, config, "evaluation")
    said = json.loads((folder.stage_dir("evaluate") / "metrics.json").read_text())["label_review"]
    in_val = [row for row in suspects if row["split"] == "val"]
    assert set(said) == {"val"} and said["val"]["suspect_labels"] == len(in_val)  # Kaggle's test has no labels
    assert said["val"]["errors_on_suspect_labels"] <= min(said["val"]["errors"], len(in_val))
    assert "Errors and doubted labels" in (folder.stage_dir("evaluate") / "report.html").read_text()


@pytest.mark.e2e
def test_a_review_file_relabels_and_drops_rows_and_the_data_says_so(cli, home, tmp_path):
    datagen.write_kaggle(tmp_path / "kaggle", n_train=120, n_test=10)
    labels = datagen.digits(120, seed=0)[0]
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("id,decision\n3,%d\n7,%d\n11,%d\n20,drop\n21,DROP\n" % (
        (labels[2] + 1) % 10, (labels[6] + 1) % 10, labels[10]))  # the third keeps its label: "unchanged"
    first = _data_stages(cli, home, tmp_path / "kaggle")
    second = _data_stages(cli, home, tmp_path / "kaggle", "--set", f"ingest.review={decisions}")
    table = pq.read_table(second / "ingest/train.parquet").to_pydict()
    by_id = dict(zip(table["id"], table["label"]))
    assert len(by_id) == 118 and 20 not in by_id and 21 not in by_id
    assert (by_id[3], by_id[7], by_id[11]) == ((labels[2] + 1) % 10, (labels[6] + 1) % 10, labels[10])
    record = json.loads((second / "run.json").read_text())
    applied = record["stages"]["ingest"]["outputs"]["review"]
    assert {k: applied[k] for k in ("relabelled", "unchanged", "dropped")} == {"relabelled": 2, "unchanged": 1,
                                                                                 "dropped": 2}
    assert applied["file"] == str(decisions) and len(applied["sha256"]) == 64
    with (second / "ingest/review-applied.csv").open() as fh:
        assert [row["decision"] for row in csv.DictReader(fh)] == [str((labels[2] + 1) % 10),
                                                                     str((labels[6] + 1) % 10), str(labels[10]),
                                                                     "drop", "drop"]
    page = (second / "validate/report.html").read_text()
    assert "Label review applied" in page and "2 relabelled, 2 dropped" in page
    assert json.loads((second / "validate/results.json").read_text())["label_review"]["dropped"] == 2
    fingerprints = [json.loads((run / "run.json").read_text())["stages"]["convert"]["outputs"]["fingerprint"]
                    for run in (first, second)]
    assert fingerprints[0] != fingerprints[1]  # lineage: another dataset, another fingerprint
    counts = record["stages"]["convert"]["outputs"]["counts"]
    assert counts["train"] + counts["val"] == 118


def _data_stages(cli, home, data, *sets):
    """ingest, validate and convert of a new run (their per-stage commands); its folder."""
    ingested = cli("ingest", "--source", "kaggle", "--data", data, *sets)
    assert ingested.code == 0, ingested.err
    run = max((home / "runs").iterdir())
    for command in ("validate", "convert"):
        done = cli(command, "--run", run.name, "--set", "validate.min_rows=10")
        assert done.code == 0, done.err
    return run


@pytest.mark.parametrize("content, expected", [
    ("id,decision\n3,7\n3,drop\n", "line 3, column 1: id 3 is named twice (first on line 2)"),
    ("id,decision\n3,seven\n", "line 2, column 2: decision `seven` is neither a digit 0-9 nor `drop`"),
    ("id,decision\n3,10\n", "line 2, column 2: decision `10` is neither a digit 0-9 nor `drop`"),
    ("id,decision\nx3,1\n", "line 2, column 1: id `x3` is not a row id (a whole number from 1)"),
    ("image,label\n3,1\n", "line 1: expected the header `id,decision`; got `image,label`"),
    ("id,decision\n3,1,extra\n", "line 2: expected 2 fields (id,decision); got 3"),
])
def test_a_bad_review_file_is_one_line_before_anything_starts(cli, home, tmp_path, content, expected):
    datagen.write_kaggle(tmp_path / "kaggle", n_train=30, n_test=5)
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(content)
    result = cli("run", "train-kaggle", "--data", tmp_path / "kaggle", "--set", f"ingest.review={decisions}")
    assert result.code == 2 and result.err.strip() == f"digits: error: {decisions}, {expected}"
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())  # no run folder


def test_an_id_the_data_does_not_have_is_one_line_naming_its_line(cli, home, tmp_path):
    datagen.write_kaggle(tmp_path / "kaggle", n_train=30, n_test=5)
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("id,decision\n3,1\n31,drop\n")
    result = cli("ingest", "--source", "kaggle", "--data", tmp_path / "kaggle", "--set", f"ingest.review={decisions}")
    assert result.code == 2
    assert result.err.strip() == (f"digits: error: {decisions}, line 3, column 1: id 31 is not a row of this train "
                                  "split (ids 1..30)")


def test_review_files_parse_with_a_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfid,decision\r\n5,2\r\n\r\n6, drop \r\n")
    read = review_file.read(path)
    assert read.relabel == {5: 2} and read.drop == {6} and read.lines == {5: 2, 6: 4}
    with pytest.raises(DataFormatError, match="not UTF-8"):
        path.write_bytes(b"id,decision\n5,\xff\n")
        review_file.read(path)


@pytest.mark.e2e
def test_too_many_wrong_labels_stop_the_run_before_training(cli, home, tmp_path):
    labels, train = datagen.digits(400, seed=0)
    _, test = datagen.digits(10, seed=1)
    wrong = labels.copy()
    wrong[::3] = (wrong[::3] + 3) % 10  # a third of the labels wrong
    datagen.write_kaggle_arrays(tmp_path / "kaggle", wrong, train, test)
    result = cli("run", "train-kaggle", "--data", tmp_path / "kaggle", "--set", "validate.min_rows=10",
                 "--set", "review.enabled=true", "--set", "review.folds=2", "--set", "review.epochs=5",
                 "--set", "review.min_steps=1", "--set", "train.epochs=1")  # the gate, not the review's quality
    assert result.code == 2
    line = result.err.strip().splitlines()[-1]
    assert "label review: an estimated" in line and "above review.fail_share=0.2" in line, result.err
    run = max((home / "runs").iterdir())
    record = json.loads((run / "run.json").read_text())
    assert record["stages"]["review"]["status"] == "failed" and "train" not in record["stages"]
    assert (run / "review/report.html").is_file()  # the report is there for the person who must fix them
