"""TFRecord reading and writing with TensorFlow, both from the one feature spec in schemas.examples.

`encoder()` is the writer the convert stage uses; `dataset()` / `load()` the parser that training,
evaluation and export read shards with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from components.tensorflow_runtime import import_tensorflow
from schemas.dataset import IMAGE_SIDE
from schemas.examples import COMPRESSION, FEATURES, ID, LABEL, PIXELS, Arrays, Row


def encoder():
    """A function Row -> serialized tf.train.Example (deterministic bytes). Imports TensorFlow once."""
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
    tf = import_tensorflow()
    dtypes = {"int64": tf.int64, "bytes": tf.string}
    return {f.name: tf.io.FixedLenFeature([], dtypes[f.dtype], default_value=f.default) for f in FEATURES}


def parse_batch(serialized):
    """Parse a batch of serialized examples (a string tensor) into id, label and image tensors.

    image: uint8 (n, 28, 28); label: int64, -1 where unlabelled.
    """
    tf = import_tensorflow()
    parsed = tf.io.parse_example(serialized, tf_feature_spec())
    images = tf.reshape(tf.io.decode_raw(parsed[PIXELS.name], tf.uint8), (-1, IMAGE_SIDE, IMAGE_SIDE))
    return {ID.name: parsed[ID.name], LABEL.name: parsed[LABEL.name], "image": images}


def dataset(files: Sequence[Path | str], batch_size: int = 4096, limit: int | None = None):
    """A tf.data.Dataset of parsed batches (dicts of id, label, image) over the given shards, in order; limit: the
    first rows only."""
    tf = import_tensorflow()
    records = tf.data.TFRecordDataset([str(f) for f in files], compression_type=COMPRESSION)
    if limit is not None:
        records = records.take(limit)
    return records.batch(batch_size).map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True)


def load(files: Sequence[Path | str], limit: int | None = None) -> Arrays:
    """Read shards (their first `limit` rows) into memory through the shared parser: for splits known to be
    small; the model stages choose between this and streaming with components.train.feed."""
    parts = [(b[ID.name].numpy(), b[LABEL.name].numpy(), b["image"].numpy()) for b in dataset(files, limit=limit)]
    if not parts:
        return Arrays(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8))
    ids, labels, images = zip(*parts)
    return Arrays(np.concatenate(ids), np.concatenate(labels), np.concatenate(images))




def pick(files: Sequence[Path | str], positions: np.ndarray, batch_size: int = 4096) -> Arrays:
    """The rows at `positions` (sorted, 0-based, in shard order) of the shards, read as a stream: only the picked
    rows are held."""
    parts, start = [], 0
    for batch in dataset(files, batch_size):
        stop = start + len(batch[ID.name])
        wanted = positions[(positions >= start) & (positions < stop)] - start
        if len(wanted):
            parts.append((batch[ID.name].numpy()[wanted], batch[LABEL.name].numpy()[wanted],
                          batch["image"].numpy()[wanted]))
        start = stop
        if start > (positions[-1] if len(positions) else -1):
            break
    if not parts:
        return Arrays(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8))
    ids, labels, images = zip(*parts)
    return Arrays(np.concatenate(ids), np.concatenate(labels), np.concatenate(images))
