"""MNIST through TFDS: the idx files are verified, TFDS is prepared offline, splits land as Parquet."""

from __future__ import annotations

import gzip
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import datagen

from components.ingest.mnist import IDX_FILES, verify_idx_folder
from schemas.dataset import labels_of, pixels_of
from schemas.errors import DataFormatError

# Published per-class counts of MNIST.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _idx(magic: int, shape: tuple[int, ...], fill: int = 0) -> bytes:
    return struct.pack(f">{1 + len(shape)}I", magic, *shape) + bytes([fill]) * int(np.prod(shape))


@pytest.fixture
def idx_folder(tmp_path) -> Path:
    """Four structurally valid idx files (zeros), the published sizes."""
    for name, (magic, count) in IDX_FILES.items():
        shape = (count, 28, 28) if magic == 2051 else (count,)
        (tmp_path / name).write_bytes(gzip.compress(_idx(magic, shape), compresslevel=1))
    return tmp_path


def test_structurally_valid_idx_files_pass_and_are_fingerprinted(idx_folder):
    prints = verify_idx_folder(idx_folder)
    assert sorted(Path(p).name for p in prints) == sorted(IDX_FILES)
    assert all(len(v) == 64 for v in prints.values())


@pytest.mark.parametrize("name, content, words", [
    ("t10k-labels-idx1-ubyte.gz", b"not gzip at all", "not a complete gzip file"),
    ("t10k-labels-idx1-ubyte.gz", gzip.compress(_idx(2051, (10000,))), "magic number 2051, expected 2049"),
    ("t10k-images-idx3-ubyte.gz", gzip.compress(_idx(2051, (10000, 28, 27))), "shape [10000, 28, 27]"),
    ("train-labels-idx1-ubyte.gz", gzip.compress(_idx(2049, (60000,))[:-5]), "59995 data bytes, expected 60000"),
    ("train-labels-idx1-ubyte.gz", gzip.compress(_idx(2049, (60000,), fill=12)), "label 12 at item 1 outside 0..9"),
    ("train-images-idx3-ubyte.gz", gzip.compress(_idx(2051, (60000, 28, 28)))[:1000], "not a complete gzip"),
], ids=["not-gzip", "wrong-magic", "wrong-shape", "short-data", "label-12", "truncated-gzip"])
def test_corrupt_idx_files_are_named(idx_folder, name, content, words):
    (idx_folder / name).write_bytes(content)
    with pytest.raises(DataFormatError, match=re.escape(words)) as info:
        verify_idx_folder(idx_folder)
    assert name in str(info.value)


def test_missing_idx_file_is_named(cli, home, idx_folder):
    (idx_folder / "t10k-images-idx3-ubyte.gz").unlink()
    result = cli("ingest", "--source", "mnist", "--data", idx_folder)
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "t10k-images-idx3-ubyte.gz: missing" in line and "Traceback" not in result.err


def test_tfds_refuses_files_that_are_not_the_published_mnist(cli, home, idx_folder):
    """Structurally fine but wrong content: TFDS's checksum check refuses them, in one line."""
    result = cli("ingest", "--source", "mnist", "--data", idx_folder)
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "TFDS refused the MNIST files" in line
    assert not list(home.rglob("*.parquet"))


def test_real_mnist_counts_per_class(prepared_tfds):
    _, splits = prepared_tfds
    train, test = splits["train"], splits["test"]
    assert (len(train.ids), len(test.ids)) == (60000, 10000)
    assert np.array_equal(train.ids, np.arange(1, 60001)) and np.array_equal(test.ids, np.arange(1, 10001))  # pieces
    assert np.bincount(train.labels, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(test.labels, minlength=10).tolist() == TEST_COUNTS
    assert train.pixels.shape == (60000, 28, 28) and train.pixels.dtype == np.uint8


def test_ingest_from_prepared_tfds_dir_works_offline(cli, home, prepared_tfds):
    """A TFDS data_dir as --data: tfds.load with no download, limit applied per split."""
    tfds_dir, splits = prepared_tfds
    result = cli("ingest", "--source", "mnist", "--data", tfds_dir, "--set", "ingest.limit=300")
    assert result.code == 0, result.err
    (run,) = (home / "runs").iterdir()
    train = pq.read_table(run / "ingest/train.parquet")
    assert train.num_rows == 300 and pq.read_table(run / "ingest/test.parquet").num_rows == 300
    np.testing.assert_array_equal(pixels_of(train), splits["train"].pixels[:300])
    np.testing.assert_array_equal(labels_of(train), splits["train"].labels[:300])


def test_ingest_from_idx_folder_reuses_a_prepared_tfds(cli, home, tmp_path, prepared_tfds):
    tfds_dir, _ = prepared_tfds
    copy = tmp_path / "tfds-copy"
    shutil.copytree(tfds_dir, copy)
    result = cli("ingest", "--source", "mnist", "--data", datagen.shared_data("mnist"),
                 "--set", f"ingest.tfds_data_dir={copy}", "--set", "ingest.limit=50")
    assert result.code == 0, result.err
    import json
    (run,) = (home / "runs").iterdir()
    record = json.loads((run / "run.json").read_text())
    assert sorted(Path(p).name for p in record["data_fingerprints"]) == sorted(IDX_FILES)


def test_real_mnist_passes_validation(cli, home, prepared_tfds):
    tfds_dir, _ = prepared_tfds
    assert cli("ingest", "--source", "mnist", "--data", tfds_dir).code == 0
    result = cli("validate")
    assert result.code == 0, result.err
    (run,) = (home / "runs").iterdir()
    report = __import__("json").loads((run / "validate/results.json").read_text())
    assert report["passed"] and len(report["results"]) >= 25
