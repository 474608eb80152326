"""Noisy-set ingestion: .amat and CSV layouts, upright images, optional labels/header, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import datagen
from schemas.dataset import labels_of, pixels_of


def _ingested(home: Path) -> Path:
    (run,) = (home / "runs").iterdir()
    return run / "ingest"


def _assert_upright(stored: np.ndarray, digits: np.ndarray) -> None:
    """Ink pixels (the digit) come back exactly, in upright orientation; noise fills the rest."""
    ink = digits > 0
    np.testing.assert_array_equal(stored[ink], digits[ink])
    assert not np.array_equal(stored, digits.transpose(0, 2, 1))


@pytest.mark.parametrize("style", ["amat", "csv"])
def test_noisy_layouts_are_turned_upright(cli, home, tmp_path, style):
    arrays = datagen.write_noisy(tmp_path / "noisy", style, n_train=30, n_test=12)
    result = cli("ingest", "--source", "noisy", "--data", tmp_path / "noisy")
    assert result.code == 0, result.err
    ingest = _ingested(home)
    train, test = pq.read_table(ingest / "train.parquet"), pq.read_table(ingest / "test.parquet")
    _assert_upright(pixels_of(train), arrays["train"])
    _assert_upright(pixels_of(test), arrays["test"])
    np.testing.assert_array_equal(labels_of(train), arrays["labels"])
    if style == "amat":
        np.testing.assert_array_equal(labels_of(test), arrays["test_labels"])
    else:
        assert labels_of(test) is None
    assert train.column("id").to_pylist() == list(range(1, 31))


def test_csv_test_file_may_carry_labels_and_a_header(cli, home, tmp_path):
    arrays = datagen.write_noisy(tmp_path / "n", "csv", n_train=20, n_test=10, test_labels=True)
    for name in ("train.csv", "test.csv"):
        path = tmp_path / "n" / name
        path.write_text(",".join([f"p{i}" for i in range(784)] + ["label"]) + "\n" + path.read_text())
    result = cli("ingest", "--source", "noisy", "--data", tmp_path / "n")
    assert result.code == 0, result.err
    test = pq.read_table(_ingested(home) / "test.parquet")
    np.testing.assert_array_equal(labels_of(test), arrays["test_labels"])
    assert test.column("id").to_pylist() == list(range(1, 11))


def test_amat_with_irregular_whitespace_and_crlf(cli, home, tmp_path):
    arrays = datagen.write_noisy(tmp_path / "n", "amat", n_train=20, n_test=10)
    path = tmp_path / "n" / arrays["files"][0]
    text = path.read_text().replace(" ", "   ").replace("\n", " \r\n")
    path.write_text(" " + text.replace("\r\n", "\r\n\t"))
    result = cli("ingest", "--source", "noisy", "--data", tmp_path / "n")
    assert result.code == 0, result.err
    np.testing.assert_array_equal(labels_of(pq.read_table(_ingested(home) / "train.parquet")), arrays["labels"])


def _rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _set_field(path: Path, line: int, column: int, value: str, sep: str) -> None:
    rows = _rows(path)
    fields = rows[line - 1].split(sep)
    fields[column - 1] = value
    rows[line - 1] = sep.join(fields)
    path.write_text("\n".join(rows) + "\n")


def _label_first(path: Path, sep: str) -> None:
    rows = [r.split(sep) for r in _rows(path)]
    path.write_text("\n".join(sep.join([str(int(float(r[-1])))] + r[:-1]) for r in rows) + "\n")


# name -> (style, file index, corruption, line, column, words)
BAD_NOISY = {
    "pixel_above_1": ("amat", 0, lambda p: _set_field(p, 4, 10, "1.5", " "), 4, 10,
                      "pixel 1.5 out of range; expected pixel in 0..1"),
    "negative_pixel": ("csv", 1, lambda p: _set_field(p, 2, 784, "-0.25", ","), 2, 784, "pixel -0.25 out of range"),
    "nan_pixel": ("csv", 0, lambda p: _set_field(p, 3, 7, "nan", ","), 3, 7, "NaN where"),
    "label_fraction": ("amat", 1, lambda p: _set_field(p, 5, 785, "2.5e+00", " "), 5, 785, "label 2.5 is not an integer"),
    "label_out_of_range": ("amat", 0, lambda p: _set_field(p, 6, 785, "1.1e+01", " "), 6, 785, "label 11 out of range"),
    "label_first_column": ("amat", 0, lambda p: _label_first(p, " "), 1, 1, "label in the LAST column"),
    "label_header_not_last": ("csv", 0, lambda p: p.write_text(
        ",".join(["label"] + [f"p{i}" for i in range(784)]) + "\n" + p.read_text()), 1, 1, "LAST column"),
    "too_few_fields_first_row": ("amat", 0, lambda p: p.write_text(p.read_text().split(" ", 1)[1]), 1, 785,
                                 "expected 785 (784 pixels + label) fields per row, found 784"),
    "too_many_fields": ("csv", 0, lambda p: _set_field(p, 7, 785, "3,0", ","), 7, 786, "too many fields"),
    "non_numeric": ("amat", 0, lambda p: _set_field(p, 2, 33, "0.5x", " "), 2, 33, "expected a number, got '0.5x'"),
    "empty_test_file": ("amat", 1, lambda p: p.write_text("\n\n"), 1, 1, "file is empty"),
    "binary_garbage": ("csv", 1, lambda p: p.write_bytes(b"\x1f\x8b\x08\x00" + bytes(200)), 1, 1, "binary data"),
}


@pytest.mark.parametrize("case", sorted(BAD_NOISY))
def test_bad_noisy_input_is_refused_with_line_column_and_nothing_written(cli, home, tmp_path, case):
    style, index, corrupt, line, column, words = BAD_NOISY[case]
    arrays = datagen.write_noisy(tmp_path / "n", style, n_train=12, n_test=8)
    names = arrays["files"] if style == "amat" else ("train.csv", "test.csv")
    corrupt(tmp_path / "n" / names[index])
    result = cli("ingest", "--source", "noisy", "--data", tmp_path / "n")
    assert result.code == 2
    (message,) = result.err.strip().splitlines()
    assert str(tmp_path / "n" / names[index]) in message and words in message
    if line is not None:
        assert f"line {line}, column {column}:" in message
    assert not list(home.rglob("*.parquet")) and not list(home.rglob(".ingest.tmp-*"))
    (run,) = (home / "runs").iterdir()
    assert not (run / "ingest").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


def test_missing_noisy_files_are_named(cli, home, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("ingest", "--source", "noisy", "--data", tmp_path / "empty")
    assert result.code == 2
    assert "mnist_background_random_train.amat" in result.err and "train.csv" in result.err


@pytest.mark.parametrize("style", ["amat", "inclass"])
def test_make_noisy_output_is_upright_mnist(cli, home, tmp_path, style):
    """The shared generator's files (small) come back as the MNIST digits they were made from."""
    script = datagen.shared_data("noisy", "make_noisy.py")
    mnist = datagen.shared_data("mnist")
    out = tmp_path / style
    subprocess.run([sys.executable, str(script), str(out), "--style", style, "--train-rows", "300",
                    "--test-rows", "200", "--mnist", str(mnist)], check=True, capture_output=True)
    assert cli("ingest", "--source", "noisy", "--data", out).code == 0
    from components.ingest.mnist import _idx_array  # the plain idx decoder, for the reference digits
    reference = _idx_array(mnist / "train-images-idx3-ubyte.gz")[:300]
    reference_labels = _idx_array(mnist / "train-labels-idx1-ubyte.gz")[:300]
    train = pq.read_table(_ingested(home) / "train.parquet")
    assert train.num_rows == 300 and pq.read_table(_ingested(home) / "test.parquet").num_rows == 200
    _assert_upright(pixels_of(train), reference)
    np.testing.assert_array_equal(labels_of(train), reference_labels)
    validation = cli("validate", "--set", "validate.min_rows=200")
    assert validation.code == 0, validation.err  # the noisy suites pass on the real generator's data
