"""Validation: clean data passes its suites; each corruption is caught by the expectation meant for it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import datagen

SMALL = ("--set", "validate.min_rows=10")  # fixtures are far smaller than the published data sets


def _run(home: Path) -> Path:
    return sorted((home / "runs").iterdir())[-1]


def _failed(home: Path) -> set[tuple[str, str, str]]:
    report = json.loads((_run(home) / "validate/results.json").read_text())
    return {(r["batch"], r["expectation"], r["column"]) for r in report["results"] if not r["success"]}


def _kaggle_texts(n_train: int = 60, n_test: int = 40) -> dict:
    labels, train = datagen.digits(n_train, seed=11)
    _, test = datagen.digits(n_test, seed=12)
    return {"labels": labels, "train": train, "test": test}


def _write_kaggle(folder: Path, data: dict) -> Path:
    datagen.write_kaggle_arrays(folder, data["labels"], data["train"], data["test"])
    return folder


@pytest.mark.parametrize("source, style", [("kaggle", None), ("noisy", "amat"), ("noisy", "csv")])
def test_clean_data_passes_and_the_report_is_written(cli, home, tmp_path, source, style):
    if source == "kaggle":
        folder = _write_kaggle(tmp_path / "data", _kaggle_texts())
    else:
        folder = tmp_path / "data"
        datagen.write_noisy(folder, style, n_train=60, n_test=40)
    assert cli("ingest", "--source", source, "--data", folder).code == 0
    result = cli("validate", *SMALL)
    assert result.code == 0, result.err
    assert _failed(home) == set()
    run = _run(home)
    assert (run / "validate/index.html").read_text().lower().startswith("<!doctype html")
    record = json.loads((run / "run.json").read_text())
    assert record["stages"]["validate"]["status"] == "completed" and record["status"] == "completed"
    assert str(run / "validate/report.html") in result.out
    report = cli("reports", run.name)
    assert f"validation report: {run / 'validate/report.html'}" in report.out
    assert f"Data Docs: {run / 'validate/index.html'}" in report.out
    page = (run / "validate/report.html").read_text()
    assert "$PARAMETER" not in page and "expectations passed" in page and "<script" not in page
    assert "min_value=" in page  # what each expectation expected, its parameters resolved


def _invert_some(data: dict) -> None:
    data["train"][::8] = 255 - data["train"][::8]  # every 8th image inverted: 12.5% of rows


def _drop_class_3(data: dict) -> None:
    keep = data["labels"] != 3
    data["labels"], data["train"] = data["labels"][keep], data["train"][keep]


def _leak(data: dict) -> None:
    data["test"][5] = data["train"][17]


def _darken_test(data: dict) -> None:
    data["test"] = (data["test"] * 0.35).astype(np.uint8)


# corruption -> the expectation meant to catch it (batch, expectation type, column)
KAGGLE_CORRUPTIONS = {
    "inverted_batch": (_invert_some, ("train", "expect_column_values_to_be_between", "border_mean")),
    "missing_class": (_drop_class_3, ("train", "expect_column_distinct_values_to_contain_set", "label")),
    "train_rows_in_test": (_leak, ("dataset", "expect_column_values_to_be_between", "train_test_shared_rows")),
    "shifted_test_distribution": (_darken_test,
                                  ("dataset", "expect_column_values_to_be_between", "intensity_ks_statistic")),
}


@pytest.mark.parametrize("case", sorted(KAGGLE_CORRUPTIONS))
def test_each_corruption_is_caught_by_its_expectation(cli, home, tmp_path, case):
    corrupt, expected = KAGGLE_CORRUPTIONS[case]
    data = _kaggle_texts()
    corrupt(data)
    assert cli("ingest", "--source", "kaggle", "--data", _write_kaggle(tmp_path / "k", data)).code == 0
    result = cli("validate", *SMALL)
    assert result.code == 2
    (message,) = result.err.strip().splitlines()
    assert message.startswith("digits: error: validation failed") and expected[2] in message
    assert expected in _failed(home)
    record = json.loads((_run(home) / "run.json").read_text())
    assert record["status"] == "failed" and record["stages"]["validate"]["status"] == "failed"
    assert (_run(home) / "validate/index.html").is_file()  # the failing run's report stays to be read


def test_noisy_file_that_was_not_turned_upright_is_caught(cli, home, tmp_path):
    datagen.write_noisy(tmp_path / "n", "amat", n_train=60, n_test=40, transposed=False)
    assert cli("ingest", "--source", "noisy", "--data", tmp_path / "n").code == 0
    result = cli("validate", *SMALL)
    assert result.code == 2
    assert ("train", "expect_column_pair_values_a_to_be_greater_than_b", "bbox_height") in _failed(home)


def test_warn_mode_records_failures_and_goes_on(cli, home, tmp_path):
    data = _kaggle_texts()
    _leak(data)
    assert cli("ingest", "--source", "kaggle", "--data", _write_kaggle(tmp_path / "k", data)).code == 0
    result = cli("validate", *SMALL, "--set", "validate.fail_on=warn")
    assert result.code == 0, result.err
    record = json.loads((_run(home) / "run.json").read_text())
    assert record["status"] == "completed_with_warnings"
    assert record["stages"]["validate"]["status"] == "completed"
    assert any("train_test_shared_rows" in w for w in record["warnings"])


def test_run_on_bad_data_stops_at_validate(cli, home, tmp_path):
    data = _kaggle_texts()
    _drop_class_3(data)
    result = cli("run", "train-kaggle", "--data", _write_kaggle(tmp_path / "k", data), *SMALL)
    assert result.code == 2
    (message,) = result.err.strip().splitlines()
    assert "expect_column_distinct_values_to_contain_set(label)" in message
    run = _run(home)
    record = json.loads((run / "run.json").read_text())
    assert list(record["stages"]) == ["ingest", "validate"] and record["status"] == "failed"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["index.html", "ingest", "run.json",
                                                                                  "validate"]


def test_real_kaggle_passes(cli, home):
    assert cli("ingest", "--source", "kaggle", "--data", datagen.shared_data("kaggle", "digit-recognizer.zip")).code == 0
    result = cli("validate")
    assert result.code == 0, result.err
    assert _failed(home) == set()
    stats = json.loads((_run(home) / "validate/results.json").read_text())["dataset"]
    assert stats["train_test_shared_rows"] == 0 and stats["ink_ks_statistic"] < 0.1
