"""The `folder` source: a person's own digit images (train/<digit>/*.png, optional test/), read as
`digits predict` prepares an image; every bad folder is one line, exit 2, and nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import datagen
from components.predict import prepare
from schemas.dataset import labels_of, pixels_of


def write_folder(root: Path, labels: np.ndarray, images: np.ndarray, *, test: np.ndarray | None = None,
                 seed: int = 0) -> Path:
    """DATA/train/<digit>/NNNN.png (and test/NNNN.png): each digit at a random size from 28 to 140 pixels,
    every other one dark ink on white paper, a few as JPEG."""
    rng = np.random.default_rng(seed)

    def save(image: np.ndarray, path: Path, index: int) -> None:
        side = int(rng.integers(28, 141))
        picture = Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR)
        if index % 2:
            picture = Image.fromarray(255 - np.asarray(picture))  # dark ink on light paper
        path.parent.mkdir(parents=True, exist_ok=True)
        if index % 7 == 3:
            picture.convert("RGB").save(path.with_suffix(".jpg"), quality=95)
        else:
            picture.save(path)

    for i, (label, image) in enumerate(zip(labels, images)):
        save(image, root / "train" / str(int(label)) / f"{i:04d}.png", i)
    for i, image in enumerate(test if test is not None else []):
        save(image, root / "test" / f"{i:04d}.png", i)
    return root


@pytest.fixture
def folder_data(tmp_path) -> Path:
    labels, images = datagen.digits(60, seed=5)
    _, test = datagen.digits(12, seed=6)
    return write_folder(tmp_path / "digits", labels, images, test=test)


def test_a_folder_of_images_becomes_the_canonical_dataset(cli, home, folder_data):
    result = cli("ingest", "--source", "folder", "--data", folder_data)
    assert result.code == 0, result.err
    (run,) = (home / "runs").iterdir()
    train = pq.read_table(run / "ingest/train.parquet")
    test = pq.read_table(run / "ingest/test.parquet")
    assert train.num_rows == 60 and test.num_rows == 12 and labels_of(test) is None
    files = sorted(p.relative_to(folder_data).as_posix() for p in (folder_data / "train").rglob("*.*"))
    assert train.column("id").to_pylist() == list(range(1, 61))  # file order by path
    with (run / "ingest/files.csv").open() as fh:
        named = [row for row in csv.DictReader(fh) if row["split"] == "train"]
    assert [row["file"] for row in named] == files
    # each image prepared exactly as `digits predict` prepares it, the label its class folder
    first = folder_data / files[0]
    from components.predict import read

    assert np.array_equal(pixels_of(train)[0], prepare(read(first)))
    assert labels_of(train).tolist() == [int(Path(f).parts[1]) for f in files]
    assert (run / "ingest/eda/class_means.png").is_file()


def _bad(folder: Path, case: str) -> Path:
    """One defect in an otherwise good folder; returns the path the error must name."""
    if case == "truncated":
        target = next((folder / "train/4").glob("*.png"))
        target.write_bytes(target.read_bytes()[:60])
    elif case == "not-an-image":
        target = folder / "train/2/notes.png"
        target.write_text("these are my notes, not a picture\n")
    elif case == "blank":
        target = folder / "train/5/blank.png"
        Image.new("L", (40, 40), 255).save(target)
    elif case == "class-not-a-digit":
        target = folder / "train/x"
        target.mkdir()
        Image.new("L", (28, 28)).save(target / "a.png")
    elif case == "empty-class":
        target = folder / "train/9"
        for path in target.iterdir():
            path.unlink()
    elif case == "no-train":
        target = folder / "train"
        target.rename(folder / "training")
    elif case == "file-outside-classes":
        target = folder / "train/stray.png"
        Image.new("L", (28, 28)).save(target)
    elif case == "too-large":
        target = folder / "train/1/huge.png"
        Image.new("L", (7000, 7000)).save(target)  # 49 megapixels: refused from the header
    else:
        raise AssertionError(case)
    return target


@pytest.mark.parametrize("case, words", [
    ("truncated", "not a readable image"),
    ("not-an-image", "not a readable image"),
    ("blank", "no digit found"),
    ("class-not-a-digit", "not a class folder"),
    ("empty-class", "empty class folder"),
    ("no-train", "missing: a folder of images holds train/<digit>/"),
    ("file-outside-classes", "a file outside a class folder"),
    ("too-large", "image too large (7000 x 7000 pixels"),
])
def test_each_bad_folder_is_one_line_exit_2_and_nothing_written(cli, home, folder_data, case, words):
    target = _bad(folder_data, case)
    result = cli("ingest", "--source", "folder", "--data", folder_data)
    assert result.code == 2
    (message,) = result.err.strip().splitlines()
    assert message.startswith(f"digits: error: {target}") and words in message, message
    if case in LAYOUT_CASES:  # found from the listing, before a run folder is made
        assert not (home / "runs").exists()
        return
    (run,) = (home / "runs").iterdir()
    assert not (run / "ingest").exists() and not list(run.glob(".ingest*"))
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


LAYOUT_CASES = ("class-not-a-digit", "empty-class", "no-train", "file-outside-classes")


def test_quarantine_sets_bad_files_aside_and_keeps_the_rest(cli, home, folder_data):
    bad = [_bad(folder_data, "truncated"), _bad(folder_data, "not-an-image")]
    result = cli("ingest", "--source", "folder", "--data", folder_data, "--set", "ingest.on_bad_rows=quarantine")
    assert result.code == 0, result.err
    (run,) = (home / "runs").iterdir()
    with (run / "ingest/rejected.csv").open() as fh:
        rejected = list(csv.DictReader(fh))
    assert sorted(r["file"] for r in rejected) == sorted(map(str, bad))
    assert all(r["split"] == "train" and "not a readable image" in r["reason"] for r in rejected)
    outputs = json.loads((run / "run.json").read_text())["stages"]["ingest"]["outputs"]
    assert outputs["counts"]["train"] == 60 - 1 and outputs["rows_read"]["train"] == 61
    assert outputs["rejected"] == {"train": 2, "test": 0}


def test_limit_takes_every_class_in_turn(cli, home, folder_data):
    assert cli("ingest", "--source", "folder", "--data", folder_data, "--set", "ingest.limit=20").code == 0
    (run,) = (home / "runs").iterdir()
    assert sorted(np.bincount(labels_of(pq.read_table(run / "ingest/train.parquet")), minlength=10)) == [2] * 10


def _mnist_test_rows(count: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    import gzip

    mnist = datagen.shared_data("mnist")
    with gzip.open(mnist / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(mnist / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return labels[start:start + count], images[start:start + count]


@pytest.mark.e2e
@pytest.mark.shared_data
def test_train_folder_fine_tunes_the_mnist_champion_and_predicts_the_folder(cli, home, tmp_path, prepared_tfds):
    """The acceptance run: a clean-MNIST champion (trained on a slice of MNIST-train), then `digits run
    train-folder` on about 30 images per class rendered from MNIST-test rows at varied sizes and both
    polarities; its submission for test/ (other MNIST-test rows, never trained on) is scored here."""
    tfds_dir, _ = prepared_tfds
    champion = cli("run", "train-mnist", "--data", datagen.shared_data("mnist"), "--set", f"ingest.tfds_data_dir={tfds_dir}",
                   "--set", "ingest.limit=6000", "--set", "validate.min_rows=1000", "--set", "train.epochs=2",
                   "--set", "train.augment=false", "--set", "evaluate.threshold=0")
    assert champion.code == 0, champion.err
    labels, images = _mnist_test_rows(300, start=0)
    test_labels, test_images = _mnist_test_rows(200, start=300)
    data = write_folder(tmp_path / "mine", labels, images, test=test_images, seed=1)
    result = cli("run", "train-folder", "--data", data)
    assert result.code == 0, result.err
    run = max((home / "runs").iterdir())
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["pipeline"] == "train-folder"
    assert list(record["stages"]) == ["ingest", "validate", "convert", "transfer", "calibrate", "evaluate", "register",
                                      "export"]
    assert record["stages"]["transfer"]["outputs"]["base"] == "models:/digits-mnist/1"
    with (run / "export/submission.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 200 and set(rows[0]) == {"ImageId", "Label", "File"}
    truth = {f"test/{i:04d}{'.jpg' if i % 7 == 3 else '.png'}": int(label) for i, label in enumerate(test_labels)}
    accuracy = np.mean([int(row["Label"]) == truth[row["File"]] for row in rows])
    print(f"\ntrain-folder: {accuracy:.1%} of 200 unseen test images; val {record['metrics']['val_accuracy']:.1%}")
    assert accuracy >= 0.90


def test_a_folder_streamed_in_small_pieces_gives_the_files_it_gives_read_at_once(folder_data, tmp_path, monkeypatch):
    """A folder is read PIECE_FILES images at a time (memory holds one piece): pieces of 7 images, bad files set
    aside among them, write the same Parquet, files.csv, rejected.csv, EDA and fingerprints as one piece."""
    from components import ingest
    from components.ingest import folder
    from schemas.config import IngestConfig
    from schemas.dataset import Source

    _bad(folder_data, "truncated"), _bad(folder_data, "not-an-image")
    config = IngestConfig(data=str(folder_data), on_bad_rows="quarantine")
    made = {}
    for piece_files in (7, 10_000):
        monkeypatch.setattr(folder, "PIECE_FILES", piece_files)
        made[piece_files] = ingest.run(Source.folder, config, tmp_path / f"out-{piece_files}", tfds_dir=tmp_path)
    small, whole = made[7], made[10_000]
    assert small.counts == whole.counts == {"train": 59, "test": 12} and small.rejected == {"train": 2, "test": 0}
    assert small.fingerprints == whole.fingerprints and len(small.fingerprints) == 2
    for name in ("train.parquet", "test.parquet", "files.csv", "rejected.csv", "eda/label_counts.json",
                 "eda/intensity_histogram.json", "eda/duplicates.json"):
        assert (small.dir / name).read_bytes() == (whole.dir / name).read_bytes(), name
