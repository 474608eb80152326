"""Kaggle ingestion: folder and zip, the canonical Parquet, accepted quirks, and every bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import datagen
from schemas.dataset import SCHEMA, labels_of, pixels_of


def _lines(text: str) -> list[str]:
    return text.splitlines()


def _write(folder: Path, train: str, test: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.csv").write_bytes(train.encode() if isinstance(train, str) else train)
    (folder / "test.csv").write_bytes(test.encode() if isinstance(test, str) else test)
    return folder


@pytest.fixture
def clean(tmp_path):
    """Texts of a clean 12-row train.csv and 6-row test.csv, and the arrays behind them."""
    labels, train = datagen.digits(12, seed=3)
    _, test = datagen.digits(6, seed=4)
    return {"train": datagen.kaggle_csv_text(labels, train), "test": datagen.kaggle_csv_text(None, test),
            "labels": labels, "train_pixels": train, "test_pixels": test}


def _only_run(home: Path) -> Path:
    (run,) = (home / "runs").iterdir()
    return run


def test_folder_ingest_writes_canonical_parquet_that_round_trips(cli, home, tmp_path, clean):
    folder = _write(tmp_path / "kaggle", clean["train"], clean["test"])
    result = cli("ingest", "--source", "kaggle", "--data", folder)
    assert result.code == 0, result.err
    ingest = _only_run(home) / "ingest"
    train, test = pq.read_table(ingest / "train.parquet"), pq.read_table(ingest / "test.parquet")
    assert train.schema.equals(SCHEMA) and test.schema.equals(SCHEMA)
    assert train.column("id").to_pylist() == list(range(1, 13))
    assert test.column("id").to_pylist() == list(range(1, 7))  # Kaggle's ImageId
    np.testing.assert_array_equal(labels_of(train), clean["labels"])
    assert labels_of(test) is None
    np.testing.assert_array_equal(pixels_of(train), clean["train_pixels"])
    np.testing.assert_array_equal(pixels_of(test), clean["test_pixels"])
    assert set(train.column("source").to_pylist()) == {"kaggle"}


def test_zip_is_read_in_place_and_matches_the_folder(cli, home, tmp_path):
    arrays = datagen.write_kaggle_zip(tmp_path / "digit-recognizer.zip", n_train=20, n_test=10)
    assert cli("ingest", "--source", "kaggle", "--data", tmp_path / "digit-recognizer.zip").code == 0
    run = _only_run(home)
    np.testing.assert_array_equal(pixels_of(pq.read_table(run / "ingest/train.parquet")), arrays["train"])
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["stages"]["ingest"]["outputs"]["counts"] == {"train": 20, "test": 10}
    (fingerprint,) = record["data_fingerprints"].values()
    assert len(fingerprint) == 64


def test_eda_reports_counts_means_histogram_and_duplicates(cli, home, tmp_path, clean):
    train_lines = _lines(clean["train"])
    test_lines = _lines(clean["test"])
    # row 3 duplicated within train; train row 5's image reused as test row 2 (a leak)
    train_lines.append(train_lines[3])
    test_lines[2] = train_lines[5].split(",", 1)[1]
    folder = _write(tmp_path / "k", "\n".join(train_lines) + "\n", "\n".join(test_lines) + "\n")
    assert cli("ingest", "--source", "kaggle", "--data", folder).code == 0
    eda = _only_run(home) / "ingest/eda"
    for png in ("label_counts.png", "class_means.png", "intensity_histogram.png"):
        assert (eda / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    counts = json.loads((eda / "label_counts.json").read_text())
    assert sum(counts["train"]) == 13 and counts["test"] is None
    dup = json.loads((eda / "duplicates.json").read_text())
    assert dup["train_duplicate_rows"] == 1 and dup["train_examples"] == [[3, 13]]
    assert dup["train_test_shared_rows"] == 1 and dup["train_test_examples"] == [{"train_ids": [5], "test_ids": [2]}]
    hist = json.loads((eda / "intensity_histogram.json").read_text())
    assert sum(hist["train"]) == 13 * 784


def test_limit_keeps_the_first_rows_of_each_split(cli, home, tmp_path, clean):
    folder = _write(tmp_path / "k", clean["train"], clean["test"])
    assert cli("ingest", "--source", "kaggle", "--data", folder, "--set", "ingest.limit=5").code == 0
    ingest = _only_run(home) / "ingest"
    assert pq.read_table(ingest / "train.parquet").column("id").to_pylist() == [1, 2, 3, 4, 5]
    assert pq.read_table(ingest / "test.parquet").num_rows == 5


@pytest.mark.parametrize("quirk", ["crlf", "bom", "trailing_blank_lines", "all_three"])
def test_accepted_quirks_give_the_same_dataset(cli, home, tmp_path, clean, quirk):
    def quirky(text: str) -> bytes:
        data = text.encode()
        if quirk in ("crlf", "all_three"):
            data = data.replace(b"\n", b"\r\n")
        if quirk in ("bom", "all_three"):
            data = b"\xef\xbb\xbf" + data
        if quirk in ("trailing_blank_lines", "all_three"):
            data += b"\n\n  \r\n\n"
        return data

    folder = _write(tmp_path / "k", quirky(clean["train"]), quirky(clean["test"]))
    result = cli("ingest", "--source", "kaggle", "--data", folder)
    assert result.code == 0, result.err
    ingest = _only_run(home) / "ingest"
    train = pq.read_table(ingest / "train.parquet")
    np.testing.assert_array_equal(pixels_of(train), clean["train_pixels"])
    np.testing.assert_array_equal(labels_of(train), clean["labels"])
    assert pq.read_table(ingest / "test.parquet").num_rows == 6


def _replace_field(text: str, line: int, column: int, value: str) -> str:
    lines = _lines(text)
    fields = lines[line - 1].split(",")
    fields[column - 1] = value
    lines[line - 1] = ",".join(fields)
    return "\n".join(lines) + "\n"


def _edit_line(text: str, line: int, edit) -> str:
    lines = _lines(text)
    lines[line - 1] = edit(lines[line - 1])
    return "\n".join(lines) + "\n"


# name -> (which file, how to corrupt it, expected file, line, column, words in the message)
BAD_KAGGLE = {
    "empty_file": ("train", lambda t: "", "train.csv", 1, 1, "file is empty"),
    "header_only": ("train", lambda t: _lines(t)[0] + "\n", "train.csv", 2, 1, "header only"),
    "wrong_header": ("train", lambda t: _replace_field(t, 1, 7, "pixl5"), "train.csv", 1, 7, "expected 'pixel5'"),
    "duplicated_header": ("train", lambda t: _replace_field(t, 1, 9, "pixel5"), "train.csv", 1, 9,
                          "duplicated header column 'pixel5'"),
    "short_header": ("train", lambda t: _edit_line(t, 1, lambda s: s.rsplit(",", 1)[0]), "train.csv", 1, 785,
                     "expected 785 columns"),
    "too_few_fields": ("train", lambda t: _edit_line(t, 4, lambda s: s.rsplit(",", 1)[0]), "train.csv", 4, 785,
                       "too few fields: expected 785, found 784"),
    "too_many_fields": ("train", lambda t: _edit_line(t, 6, lambda s: s + ",0"), "train.csv", 6, 786,
                        "too many fields: expected 785, found 786"),
    "non_numeric": ("train", lambda t: _replace_field(t, 5, 100, "abc"), "train.csv", 5, 100,
                    "expected a number, got 'abc'"),
    "empty_value": ("train", lambda t: _replace_field(t, 5, 10, ""), "train.csv", 5, 10, "empty value"),
    "pixel_over_255": ("train", lambda t: _replace_field(t, 3, 400, "256"), "train.csv", 3, 400,
                       "pixel 256 out of range; expected an integer pixel in 0..255"),
    "negative_pixel": ("test", lambda t: _replace_field(t, 2, 20, "-1"), "test.csv", 2, 20, "pixel -1 out of range"),
    "fractional_pixel": ("train", lambda t: _replace_field(t, 7, 50, "12.5"), "train.csv", 7, 50,
                         "pixel 12.5 is not an integer"),
    "nan_pixel": ("train", lambda t: _replace_field(t, 8, 300, "NaN"), "train.csv", 8, 300, "NaN where"),
    "label_10": ("train", lambda t: _replace_field(t, 2, 1, "10"), "train.csv", 2, 1,
                 "label 10 out of range; expected an integer label in 0..9"),
    "label_fraction": ("train", lambda t: _replace_field(t, 9, 1, "3.5"), "train.csv", 9, 1,
                       "label 3.5 is not an integer"),
    "label_negative": ("train", lambda t: _replace_field(t, 9, 1, "-2"), "train.csv", 9, 1, "label -2 out of range"),
    "blank_line_inside": ("train", lambda t: _edit_line(t, 5, lambda s: ""), "train.csv", 5, 1, "blank line"),
    "test_with_label_column": ("test", lambda t: "label," + t.replace("\n", "\n0,", t.count("\n") - 1),
                               "test.csv", 1, 1, "carries a 'label' column"),
    "binary_garbage": ("train", lambda t: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4,
                       "train.csv", 1, 1, "binary data"),
    "binary_row": ("train", lambda t: _replace_field(t, 6, 2, "\udcff\udcfe"), "train.csv", 6, 2,
                   "binary data (byte 0xff)"),
}


@pytest.mark.parametrize("case", sorted(BAD_KAGGLE))
def test_bad_kaggle_input_is_refused_with_file_line_column_and_nothing_written(cli, home, tmp_path, clean, case):
    which, corrupt, file_name, line, column, words = BAD_KAGGLE[case]
    texts = {"train": clean["train"], "test": clean["test"]}
    texts[which] = corrupt(texts[which])
    encoded = {k: (v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v) for k, v in texts.items()}
    folder = _write(tmp_path / "bad", encoded["train"], encoded["test"])

    result = cli("ingest", "--source", "kaggle", "--data", folder)

    assert result.code == 2
    (message,) = result.err.strip().splitlines()  # exactly one line
    assert "Traceback" not in result.err
    assert f"{folder / file_name}" in message
    if line is not None:
        assert f"line {line}" in message
    if column is not None:
        assert f"column {column}," in message or f"column {column}:" in message
    assert words in message
    run = _only_run(home)
    assert not (run / "ingest").exists()
    assert not list(home.rglob("*.parquet")) and not list(run.glob(".ingest.tmp-*"))
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and record["stages"]["ingest"]["status"] == "failed"
    assert words in record["stages"]["ingest"]["error"]


def test_missing_file_and_bad_zip_are_refused(cli, home, tmp_path, clean):
    folder = tmp_path / "only-train"
    folder.mkdir()
    (folder / "train.csv").write_text(clean["train"])
    result = cli("ingest", "--source", "kaggle", "--data", folder)
    assert result.code == 2 and "test.csv: missing" in result.err
    (tmp_path / "fake.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    result = cli("ingest", "--source", "kaggle", "--data", tmp_path / "fake.zip")
    assert result.code == 2 and "not a zip archive" in result.err
    result = cli("ingest", "--source", "kaggle", "--data", tmp_path / "nowhere")
    assert result.code == 2 and "no such file or folder" in result.err
    assert not list(home.rglob("*.parquet"))


def test_strict_mode_counts_the_other_bad_rows(cli, home, tmp_path, clean):
    text = _replace_field(_replace_field(clean["train"], 3, 5, "999"), 10, 1, "x")
    folder = _write(tmp_path / "k", text, clean["test"])
    result = cli("ingest", "--source", "kaggle", "--data", folder)
    assert result.code == 2
    assert "line 3, column 5" in result.err and "1 more bad row" in result.err
    assert "on_bad_rows=quarantine" in result.err


def test_quarantine_sets_bad_rows_aside_and_keeps_the_good(cli, home, tmp_path, clean):
    text = _replace_field(clean["train"], 3, 5, "999")
    text = _edit_line(text, 6, lambda s: s + ",1")
    text = _replace_field(text, 10, 1, "x")
    folder = _write(tmp_path / "k", text, _replace_field(clean["test"], 4, 2, "nan"))
    result = cli("ingest", "--source", "kaggle", "--data", folder, "--set", "ingest.on_bad_rows=quarantine")
    assert result.code == 0, result.err
    run = _only_run(home)
    with (run / "ingest/rejected.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["split"], r["line"], r["column"]) for r in rows] == [
        ("train", "3", "5"), ("train", "6", "786"), ("train", "10", "1"), ("test", "4", "2")]
    assert "out of range" in rows[0]["reason"] and "too many fields" in rows[1]["reason"]
    train = pq.read_table(run / "ingest/train.parquet")
    assert train.column("id").to_pylist() == [1, 3, 4, 6, 7, 8, 10, 11, 12]  # ids stay the source row numbers
    keep = np.array([0, 2, 3, 5, 6, 7, 9, 10, 11])
    np.testing.assert_array_equal(pixels_of(train), clean["train_pixels"][keep])
    outputs = json.loads((run / "run.json").read_text())["stages"]["ingest"]["outputs"]
    assert outputs["rejected"] == {"train": 3, "test": 1}
    assert outputs["rows_read"] == {"train": 12, "test": 6}
    assert outputs["counts"] == {"train": 9, "test": 5}


def test_real_kaggle_zip(cli, home):
    archive = datagen.shared_data("kaggle", "digit-recognizer.zip")
    result = cli("ingest", "--source", "kaggle", "--data", archive)
    assert result.code == 0, result.err
    ingest = _only_run(home) / "ingest"
    train, test = pq.read_table(ingest / "train.parquet"), pq.read_table(ingest / "test.parquet")
    assert (train.num_rows, test.num_rows) == (42000, 28000)
    assert train.column("label").null_count == 0 and test.column("label").null_count == 28000
    assert test.column("id").to_pylist() == list(range(1, 28001))
    assert np.bincount(labels_of(train), minlength=10).min() > 3500


def _read_in_blocks(folder: Path, block_bytes: int, **options):
    """What the Kaggle reader gives for folder read in blocks of block_bytes: per split (ids, labels, pixels,
    rejects as (line, column, reason)), or the error's one line."""
    from components.ingest import kaggle, text
    from components.ingest.splits import ReadOptions, collect
    from schemas.errors import DigitsInputError

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text, "BLOCK_BYTES", block_bytes)
        try:
            splits, prints = kaggle.read(folder, ReadOptions(**options))
            got = {}
            for split, part in splits.items():
                whole = collect(part)
                got[split.value] = (whole.ids.tolist(), None if whole.labels is None else whole.labels.tolist(),
                                    whole.pixels.tobytes(), [(r.line, r.column, r.reason) for r in whole.rejects],
                                    whole.rows_read)
            return got, dict(prints)
        except DigitsInputError as exc:
            return str(exc)


def test_a_file_read_in_blocks_gives_what_it_gives_read_whole(tmp_path, clean):
    """Ingest streams a CSV in blocks of lines (32 MB each) so that memory does not grow with the file: every row,
    line number, bad-row verdict, quirk, limit and fingerprint is what the file read in one block gives."""
    cases = {name: (which, corrupt) for name, (which, corrupt, *_) in BAD_KAGGLE.items()}
    cases |= {"clean": ("train", lambda t: t),
              "strict_count": ("train", lambda t: _replace_field(_replace_field(t, 3, 5, "999"), 10, 1, "x")),
              "blank_lines_at_the_end": ("train", lambda t: t.encode().replace(b"\n", b"\r\n") + b"\n\n  \r\n\n"),
              "blank_lines_inside_and_at_the_end": ("train", lambda t: _edit_line(t, 7, lambda s: "") + "\n \n\n"),
              "bom": ("test", lambda t: b"\xef\xbb\xbf" + t.encode())}
    compared = 0
    for name, (which, corrupt) in cases.items():
        texts = {"train": clean["train"], "test": clean["test"]}
        texts[which] = corrupt(texts[which])
        encoded = {k: (v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v) for k, v in texts.items()}
        folder = _write(tmp_path / name, encoded["train"], encoded["test"])
        for options in ({}, {"strict": False, "limit": 5}):  # strict; quarantine, cut short
            whole = _read_in_blocks(folder, 1 << 30, **options)
            # 900 bytes: each row (~1.7 kB) read over two or three blocks, block ends falling anywhere in a row
            assert _read_in_blocks(folder, 900, **options) == whole, (name, options)
            compared += 1
    assert compared == 2 * len(cases)
    # the whole file's fingerprint even when a limit stopped the reading early
    assert _read_in_blocks(tmp_path / "clean", 900, limit=2)[1] == _read_in_blocks(tmp_path / "clean", 1 << 30)[1]
