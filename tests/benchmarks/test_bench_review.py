"""The review stage at full size: planted wrong labels in the Kaggle set, and MNIST-test's published label errors.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_review.py

Kaggle (../shared/data/kaggle, 42,000 train rows): 1 % of the labels flipped (420, seeded, chosen at random
across classes, each to a random other digit). The default review (review.enabled=true, nothing else set) on it:
precision among the top-N suspects (N = 420) and recall of all its suspects, and the stage's time beside the
default train stage's time on the clean set (both in this script), and the clean default run's calibration
(the calibrate stage's ECE on val before and after). Then the default pipeline's model trained on
(a) the flipped set, (b) the flipped set with the review's suggestions applied as they are (its
review-decisions.csv given to ingest.review), (c) the clean set — each scored on the same images with their
clean labels: the val rows all three runs held out (the split is seeded by row id, so they nearly coincide).

MNIST (../shared/data/mnist): the review of train-mnist reviews the labelled test split beside train/val (reported
only). How many of the 15 MNIST-test label errors that Northcutt, Athalye & Mueller (2021, labelerrors.com)
validated with people appear among its 50 most suspect test images.
"""

from __future__ import annotations

import csv
import io
import json
import time
import zipfile

import numpy as np
import pytest

import datagen

pytestmark = pytest.mark.benchmark
FLIPPED_SHARE = 0.01
# MNIST-test indices (0-based, as in the t10k files) whose label error 3 or more of 5 people confirmed
# (cleanlab/label-errors, mturk/mnist_mturk.json: fewer than 3 votes for the given label)
MNIST_TEST_ERRORS = (947, 1621, 1901, 2130, 2462, 2597, 2654, 3520, 3558, 5937, 6651, 6783, 8527, 9679, 9729)


def _kaggle_train() -> tuple[np.ndarray, np.ndarray, bytes]:
    with zipfile.ZipFile(datagen.shared_data("kaggle", "digit-recognizer.zip")) as archive:
        rows = np.loadtxt(io.BytesIO(archive.read("train.csv")), delimiter=",", skiprows=1, dtype=np.int64)
        test = archive.read("test.csv")
    return rows[:, 0], rows[:, 1:].astype(np.uint8), test


def _write(folder, labels: np.ndarray, pixels: np.ndarray, test: bytes):
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text(datagen.kaggle_csv_text(labels, pixels.reshape(-1, 28, 28)))
    (folder / "test.csv").write_bytes(test)
    return folder


def _staged(data, artifact_names, *overrides):
    from runs import make, validated_kaggle_run

    folder, config = validated_kaggle_run(data, *overrides)
    seconds = {}
    for name in artifact_names:
        started = time.perf_counter()
        make(folder, config, name)
        seconds[name] = round(time.perf_counter() - started, 1)
    return folder, seconds


def test_review_finds_planted_errors_and_fixing_them_helps(tmp_path, monkeypatch):
    from components import records
    from components.evaluate import load_predict
    from flows import runner

    monkeypatch.setenv("DIGITS_HOME", str(tmp_path / "home"))
    labels, pixels, test = _kaggle_train()
    rng = np.random.default_rng(2026)
    flipped = rng.choice(len(labels), size=int(len(labels) * FLIPPED_SHARE), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    flipped_ids = {int(i) + 1 for i in flipped}

    clean, clean_seconds = _staged(_write(tmp_path / "clean", labels, pixels, test), ["converted", "model"])
    dirty, dirty_seconds = _staged(_write(tmp_path / "flipped", noisy, pixels, test), ["converted", "review", "model"],
                                   "review.enabled=true")
    with (dirty.stage_dir("review") / "suspects.csv").open() as fh:
        ranked = [int(row["id"]) for row in csv.DictReader(fh) if row["split"] in ("train", "val")]
    top = ranked[:len(flipped_ids)]
    decisions = dirty.stage_dir("review") / "review-decisions.csv"
    fixed, fixed_seconds = _staged(tmp_path / "flipped", ["converted", "model"], f"ingest.review={decisions}")

    val_ids = None
    for run in (clean, dirty, fixed):
        ids = records.load(runner.output_of(run, "convert").files("val")).ids
        val_ids = set(ids.tolist()) if val_ids is None else val_ids & set(ids.tolist())
    held = np.array(sorted(val_ids)) - 1  # row numbers are ids - 1
    accuracy = {}
    for name, run in (("a_flipped", dirty), ("b_review_applied", fixed), ("c_clean", clean)):
        model = runner.output_of(run, "calibrate").path
        predicted = load_predict(model)(pixels[held].reshape(-1, 28, 28)).argmax(axis=1)
        accuracy[name] = round(float((predicted == labels[held]).mean()), 5)
    review = json.loads((dirty.stage_dir("review") / "review.json").read_text())["splits"]["train+val"]
    applied = fixed.load().stages["ingest"].outputs["review"]
    result = {"flipped": len(flipped_ids), "suspects": len(ranked),
              "precision_at_n": round(len(set(top) & flipped_ids) / len(top), 4),
              "recall": round(len(set(ranked) & flipped_ids) / len(flipped_ids), 4),
              "estimated_wrong_share": round(review["estimated_wrong_share"], 4),
              "out_of_sample_accuracy": round(review["out_of_sample_accuracy"], 4),
              "review_seconds": dirty.load().stages["review"].seconds,
              "default_train_seconds_clean": clean.load().stages["train"].seconds,
              "review_applied": {k: applied[k] for k in ("relabelled", "unchanged", "dropped")},
              "held_out_images": len(held), "accuracy_on_held_out_clean_labels": accuracy,
              "clean_run_calibration": json.loads((clean.stage_dir("calibrate") / "calibration.json").read_text()),
              "wall_seconds": {"clean": clean_seconds, "flipped": dirty_seconds, "fixed": fixed_seconds}}
    print(f"\nreview on Kaggle with {FLIPPED_SHARE:.0%} flipped: {json.dumps(result)}")
    assert result["precision_at_n"] >= 0.8 and result["recall"] >= 0.8
    assert result["review_seconds"] <= result["default_train_seconds_clean"]


def _canonical_ids(folder, indices) -> set[int]:
    """The canonical test ids of MNIST-test images given by their index in the t10k files (TFDS stores the split
    in its own order, so rows are matched by their pixels)."""
    import gzip

    import pyarrow.parquet as pq

    from flows import runner

    with gzip.open(datagen.shared_data("mnist", "t10k-images-idx3-ubyte.gz")) as fh:
        original = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 784)
    table = pq.read_table(runner.output_of(folder, "ingest").parquet("test")).to_pydict()
    where = {bytes(pixels): row_id for row_id, pixels in zip(table["id"], table["pixels"])}
    return {where[original[i].tobytes()] for i in indices}


def test_review_of_mnist_test_finds_the_published_label_errors(tmp_path, monkeypatch):
    from runs import make
    from schemas.config import apply_overrides, default_config

    from flows import stages

    monkeypatch.setenv("DIGITS_HOME", str(tmp_path / "home"))
    config = apply_overrides(default_config("train-mnist"), [f"ingest.data={datagen.shared_data('mnist')}",
                                                             "review.enabled=true"])
    folder = stages.start_run(config)
    for artifact in ("examples", "validation", "converted", "review"):
        make(folder, config, artifact)
    with (folder.stage_dir("review") / "suspects.csv").open() as fh:
        test_suspects = [int(row["id"]) for row in csv.DictReader(fh) if row["split"] == "test"]
    published = _canonical_ids(folder, MNIST_TEST_ERRORS)
    found = [i for i in test_suspects[:50] if i in published]
    summary = json.loads((folder.stage_dir("review") / "review.json").read_text())["splits"]
    result = {"test_suspects": len(test_suspects), "published_in_top_50": len(found),
              "published_among_all_suspects": len(published & set(test_suspects)), "found_ids": found,
              "test_out_of_sample_accuracy": round(summary["test"]["out_of_sample_accuracy"], 4),
              "train_val_suspects": summary["train+val"]["suspects"],
              "train_val_estimated_wrong_share": round(summary["train+val"]["estimated_wrong_share"], 4),
              "review_seconds": folder.load().stages["review"].seconds}
    print(f"\nreview of MNIST: {json.dumps(result)}")
    assert result["published_in_top_50"] >= 1
