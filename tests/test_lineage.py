"""Lineage of seen images (components.lineage): the fingerprints a model's training images leave, how
this run's images are looked up in them, and the overlap of the real Kaggle and MNIST files."""

from __future__ import annotations

import gzip
import json
import zipfile

import datagen
import numpy as np
import pytest
from scipy import ndimage

from components.lineage import SeenSet, fingerprints
from schemas.errors import DamagedArtifact


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return datagen.digits(200, seed=3)[1]


def test_exact_and_shifted_copies_are_found_and_other_digits_are_not(images):
    seen = SeenSet.of(images[:100], {"data": "first 100"})
    shifted = np.stack([ndimage.shift(image, (dy, dx), order=0) for image, (dy, dx)
                        in zip(images[:30], [(1, 0), (0, -1), (-2, 2)] * 10)])
    ink_kept = [int(s.sum()) == int(i.sum()) for s, i in zip(shifted, images[:30])]  # nothing cut off at an edge
    probe = np.concatenate([images[:10], shifted, images[100:140]])
    overlap = seen.overlap(probe, np.arange(1000, 1000 + len(probe)))
    assert sum(ink_kept) >= 20 and overlap.exact == 10 and overlap.shifted == sum(ink_kept) and overlap.images == 80
    assert overlap.example_ids == list(range(1000, 1010))
    assert seen.chain == [{"data": "first 100", "images": 100}] and seen.images == 100


def test_a_requantised_copy_is_not_caught(images):
    """Documented limit: a copy whose pixel values changed (another rounding) is a different image to it."""
    seen = SeenSet.of(images[:5], {})
    requantised = (images[:5] // 2 * 2).astype(np.uint8)
    changed = [not np.array_equal(a, b) for a, b in zip(requantised, images[:5])]
    assert all(changed) and seen.overlap(requantised, np.arange(5)).total == 0


def test_fingerprints_are_64_bit_and_depend_only_on_the_pixels(images):
    exact, aligned = fingerprints(images[:20])
    again, _ = fingerprints(images[:20].copy(order="F"))
    assert exact.dtype == np.uint64 and len(set(exact.tolist())) == 20 and (exact == again).all()
    blank = np.zeros((2, 28, 28), np.uint8)
    assert len(set(fingerprints(blank)[0].tolist())) == 1


def test_a_base_joins_its_images_and_its_chain(tmp_path, images):
    base = SeenSet.of(images[:50], {"model": None, "data": "base data"})
    own = SeenSet.of(images[40:100], {"model": None, "data": "own data"})
    joined = own.joined(base, {"model": "models:/digits-mnist/3"})
    assert joined.images == 100 and joined.complete
    assert [link["model"] for link in joined.chain] == [None, "models:/digits-mnist/3"]
    unknown = own.joined(None, {"model": "/models/theirs.keras"})
    assert not unknown.complete and unknown.images == 60
    back = SeenSet.load(joined.save(tmp_path / "seen.npz"))
    assert (back.exact == joined.exact).all() and back.chain == joined.chain


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04 not really a zip"])
def test_a_damaged_seen_file_is_one_line(tmp_path, content):
    path = tmp_path / "seen.npz"
    path.write_bytes(content)
    with pytest.raises(DamagedArtifact) as raised:
        SeenSet.load(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def _idx(path) -> np.ndarray:
    with gzip.open(path) as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)


def test_kaggle_test_images_are_mnist_images():
    """The full-size count of the shared files: Kaggle's 28,000 test images in MNIST (train and test)."""
    import pandas as pd

    mnist = datagen.shared_data("mnist")
    with zipfile.ZipFile(datagen.shared_data("kaggle", "digit-recognizer.zip")) as archive:
        kaggle_test = pd.read_csv(archive.open("test.csv")).to_numpy(np.uint8).reshape(-1, 28, 28)
    train = SeenSet.of(_idx(mnist / "train-images-idx3-ubyte.gz"), {"data": "MNIST train"})
    test = SeenSet.of(_idx(mnist / "t10k-images-idx3-ubyte.gz"), {"data": "MNIST test"})
    in_train, in_test = (s.overlap(kaggle_test, np.arange(1, len(kaggle_test) + 1)) for s in (train, test))
    assert (len(kaggle_test), in_train.total, in_test.total) == (28_000, 18_000, 10_000)


@pytest.mark.e2e
def test_a_kaggle_run_fine_tuned_from_the_mnist_champion_warns_of_the_test_images_it_saw(cli, home, prepared_tfds):
    """The shared files through the CLI: a train-mnist champion, then train-kaggle from it. Kaggle's images
    are MNIST's, so the base saw part of the Kaggle val split (refused, with the count) and of its test
    split (the warning in run.json, the report, the Prefect artifact and next to the submission)."""
    from components import records
    from runs import output
    from schemas.runs import RunFolder

    mnist, kaggle = datagen.shared_data("mnist"), datagen.shared_data("kaggle", "digit-recognizer.zip")
    quick = ["--set", "train.model=baseline", "--set", "train.epochs=1", "--set", "evaluate.threshold=0",
             "--set", "ingest.limit=3000"]
    tfds_dir, _ = prepared_tfds  # the shared files as TFDS prepared them once for the session
    assert cli("run", "train-mnist", "--data", mnist, "--set", f"ingest.tfds_data_dir={tfds_dir}", *quick).code == 0
    champion = RunFolder.open()
    result = cli("run", "train-kaggle", "--data", kaggle, *quick, "--set", "train.model=digits-net",
                 "--set", "transfer.base=models:/digits-mnist@champion", "--set", "transfer.mode=full")
    assert result.code == 0, result.err
    run = RunFolder.open()
    seen = {image.tobytes() for image in records.load(output(champion, "converted").files("train")).images}
    seen |= {image.tobytes() for image in records.load(output(run, "converted").files("train")).images}
    val, test = (records.load(output(run, "converted").files(split)) for split in ("val", "test"))
    expected_val = sum(image.tobytes() in seen for image in val.images)
    expected_test = sorted(int(i) for i, image in zip(test.ids, test.images) if image.tobytes() in seen)
    assert expected_val > 0 and len(expected_test) > 0

    record = json.loads(run.path.read_text())
    assert record["metrics"]["seen_val_images"] == expected_val and not record["promoted"]
    assert f"the val split holds {expected_val:,} images" in record["promotion_reason"]
    assert any(f"{len(expected_test):,} of 3,000 test images were seen in training" in w for w in record["warnings"])
    assert record["status"] == "completed_with_warnings"
    assert f"{len(expected_test):,} of them were seen in training" in result.out  # the export line
    listed = (run.stage_dir("export") / "seen-test-images.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in listed] == expected_test
    assert "Seen images" in (run.stage_dir("evaluate") / "report.html").read_text()
    summary = output(run, "evaluation").publications()[0].content
    assert f"test {len(expected_test):,}" in summary and "**Warning:**" in summary
