"""The TFRecord contract of the convert stage: one `tf.train.Example` feature spec, used by the writer
(components.convert) and by the tf.data parser that training and evaluation read with.

A record is one image: `id` (the canonical dataset's 1-based source row), `label` (0..9, or -1 for an
unlabelled test row) and `pixels` (784 bytes: 28x28 uint8, row-major, upright, 0 background .. 255
ink, exactly the canonical Parquet's bytes). Shards are gzip TFRecord files named
`<split>-<index>-of-<count>.tfrecord.gz`; each split's shards hold its examples sorted by id within a
shard, so the same input and seed give byte-identical shards on any runner.

TensorFlow is imported only by the functions that need it: the manifest and names are plain Python.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from schemas.dataset import IMAGE_SIDE, N_PIXELS

FORMAT = "digits-tfrecord-v1"
COMPRESSION = "GZIP"
SUFFIX = ".tfrecord.gz"
MANIFEST = "manifest.json"
NO_LABEL = -1


class ExampleSplit(StrEnum):
    """The splits the convert stage writes: train and val are drawn from the labelled train split."""

    train = "train"
    val = "val"
    test = "test"


@dataclass(frozen=True)
class Feature:
    name: str
    dtype: str  # "int64" | "bytes"
    default: int | None
    doc: str


ID = Feature("id", "int64", None, "1-based row number in the source split (Kaggle's ImageId for test)")
LABEL = Feature("label", "int64", NO_LABEL, "0..9; -1 for an unlabelled test row")
PIXELS = Feature("pixels", "bytes", None, f"{N_PIXELS} bytes: {IMAGE_SIDE}x{IMAGE_SIDE} uint8, row-major, upright, "
                                          "0 background .. 255 ink")
FEATURES = (ID, LABEL, PIXELS)


def spec_json() -> list[dict[str, Any]]:
    """The feature spec as JSON, for the manifest."""
    return [asdict(f) for f in FEATURES]


def shard_name(split: ExampleSplit | str, index: int, count: int) -> str:
    return f"{ExampleSplit(split).value}-{index:05d}-of-{count:05d}{SUFFIX}"


class Row(NamedTuple):
    """One image on its way from the canonical Parquet to a TFRecord."""

    id: int
    label: int  # NO_LABEL when unlabelled
    pixels: bytes


def encoder():
    """A function Row -> serialized tf.train.Example (deterministic bytes). Imports TensorFlow once."""
    from components.tensorflow_runtime import import_tensorflow

    import_tensorflow()
    from tensorflow.core.example import example_pb2

    def encode(row: Row) -> bytes:
        example = example_pb2.Example()
        feature = example.features.feature
        feature[ID.name].int64_list.value.append(row.id)
        feature[LABEL.name].int64_list.value.append(row.label)
        feature[PIXELS.name].bytes_list.value.append(row.pixels)
        return example.SerializeToString(deterministic=True)

    return encode


def tf_feature_spec() -> dict[str, Any]:
    """The spec as `tf.io.FixedLenFeature`s, for `tf.io.parse_example`."""
    from components.tensorflow_runtime import import_tensorflow

    tf = import_tensorflow()
    dtypes = {"int64": tf.int64, "bytes": tf.string}
    return {f.name: tf.io.FixedLenFeature([], dtypes[f.dtype], default_value=f.default) for f in FEATURES}


def parse_batch(serialized):
    """Parse a batch of serialized examples (a string tensor) into id, label and image tensors.

    image: uint8 (n, 28, 28); label: int64, -1 where unlabelled.
    """
    from components.tensorflow_runtime import import_tensorflow

    tf = import_tensorflow()
    parsed = tf.io.parse_example(serialized, tf_feature_spec())
    images = tf.reshape(tf.io.decode_raw(parsed[PIXELS.name], tf.uint8), (-1, IMAGE_SIDE, IMAGE_SIDE))
    return {ID.name: parsed[ID.name], LABEL.name: parsed[LABEL.name], "image": images}


def dataset(files: Sequence[Path | str], batch_size: int = 4096):
    """A tf.data.Dataset of parsed batches (dicts of id, label, image) over the given shards, in order."""
    from components.tensorflow_runtime import import_tensorflow

    tf = import_tensorflow()
    records = tf.data.TFRecordDataset([str(f) for f in files], compression_type=COMPRESSION)
    return records.batch(batch_size).map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True)


class Arrays(NamedTuple):
    """A whole split in memory."""

    ids: np.ndarray  # int64 (n,)
    labels: np.ndarray  # int64 (n,), -1 where unlabelled
    images: np.ndarray  # uint8 (n, 28, 28)


def load(files: Sequence[Path | str]) -> Arrays:
    """Read shards into memory through the shared parser (the data is small: < 250 MB)."""
    parts = [(b[ID.name].numpy(), b[LABEL.name].numpy(), b["image"].numpy()) for b in dataset(files)]
    if not parts:
        return Arrays(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8))
    ids, labels, images = zip(*parts)
    return Arrays(np.concatenate(ids), np.concatenate(labels), np.concatenate(images))


def read_manifest(convert_dir: Path) -> dict[str, Any]:
    return json.loads((convert_dir / MANIFEST).read_text())


def shard_files(convert_dir: Path, split: ExampleSplit | str, manifest: dict[str, Any] | None = None) -> list[Path]:
    """The shard paths of one split, in manifest order."""
    manifest = manifest or read_manifest(convert_dir)
    return [convert_dir / s["file"] for s in manifest["splits"][ExampleSplit(split).value]["shards"]]

