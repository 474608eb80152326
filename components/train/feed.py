"""What the model stages give Keras: a split held in memory while it is small, streamed from its TFRecord shards
through tf.data once it is not.

`Feed.of(files, rows, in_memory_rows)` reads a split of up to `in_memory_rows` rows into numpy arrays (the fastest
way to train on MNIST-sized data: one shuffle of the whole split per epoch, no parsing after the first read);
a larger split is never read whole. Training then streams it (`Feed.training`): each epoch reads the shards in an
order shuffled for that epoch, interleaved, through a shuffle buffer of `shuffle_buffer` rows, in batches, with
prefetch, so memory holds the buffer and a few batches, whatever the split's size. The epoch's order depends only
on (seed, epoch): an attempt resumed at epoch k reads epoch k exactly as an attempt that never stopped would, so
the same seed and data give the same model either way. Validation and scoring stream the same shards in order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from components import records
from schemas.dataset import IMAGE_SIDE, N_CLASSES
from schemas.examples import COMPRESSION, Arrays

_EPOCH_SEED = 1_000_003  # an epoch's shuffle seed: seed * this + epoch (distinct per (seed, epoch) pair in practice)
_PARSE_BATCH = 256  # serialized examples parsed at once (tf.io.parse_example is vectorized)


@dataclass(frozen=True)
class Feed:
    """One split: `arrays` when held in memory, else its shard `files`; `take` keeps its first rows only (a tune
    trial's subset); `extra` rows are added to it (transfer's rehearsal of the base's images)."""

    rows: int
    files: tuple[str, ...] = ()
    arrays: Arrays | None = None
    take: int | None = None
    extra: Arrays | None = None

    @classmethod
    def of(cls, files: Sequence[Path | str], rows: int, in_memory_rows: int, take: int | None = None) -> Feed:
        """The split of `rows` rows in `files`, read into memory when (after `take`) it has at most in_memory_rows."""
        kept = rows if take is None else min(take, rows)
        if kept <= in_memory_rows:
            arrays = records.load(files, limit=take)
            return cls(rows=len(arrays.ids), arrays=arrays)
        return cls(rows=kept, files=tuple(str(f) for f in files), take=take)

    @classmethod
    def held(cls, arrays: Arrays) -> Feed:
        """Rows already in memory (the label review's folds), as a split."""
        return cls(rows=len(arrays.ids), arrays=arrays)

    @property
    def in_memory(self) -> bool:
        return self.arrays is not None

    def joined(self, extra: Arrays) -> Feed:
        """These rows and `extra`'s (held in memory), as one split."""
        if self.arrays is not None:
            return replace(self, rows=self.rows + len(extra.ids),
                           arrays=Arrays(*(np.concatenate([a, b]) for a, b in zip(self.arrays, extra))))
        rows = self.rows + len(extra.ids)
        if self.extra is not None:
            extra = Arrays(*(np.concatenate([a, b]) for a, b in zip(self.extra, extra)))
        return replace(self, rows=rows, extra=extra)

    def steps(self, batch_size: int) -> int:
        return int(np.ceil(self.rows / batch_size))

    def training(self, tf, batch_size: int, seed: int, first_epoch: int, end_epoch: int, shuffle_buffer: int):
        """Batches (image uint8 [n, 28, 28, 1], one-hot label) of epochs first_epoch..end_epoch - 1, each epoch
        `steps(batch_size)` batches (its last one partial), for `model.fit(..., steps_per_epoch=steps)`. Each
        epoch's order is a function of (seed, epoch) alone: a split held in memory is shuffled whole, a streamed one
        through the shuffle buffer after its shards' order is shuffled."""
        if self.arrays is not None:
            held = self._held(tf)

            def shuffled(number):
                return held.shuffle(self.rows, seed=tf.constant(seed, tf.int64) * _EPOCH_SEED + number) \
                    .batch(batch_size)

            return tf.data.Dataset.range(first_epoch, end_epoch).flat_map(shuffled).prefetch(tf.data.AUTOTUNE)
        files = tf.constant(list(self.files))
        extra = self._extra(tf)
        added = len(self.extra.ids) if self.extra is not None else 0

        def epoch(number):
            epoch_seed = tf.constant(seed, tf.int64) * _EPOCH_SEED + number
            shards = tf.data.Dataset.from_tensor_slices(files)
            if self.take is None:  # a subset is the split's first rows: its shards in order
                shards = shards.shuffle(len(self.files), seed=epoch_seed)
                rows = shards.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type=COMPRESSION),
                                         cycle_length=min(len(self.files), 4), block_length=16,
                                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            else:
                rows = tf.data.TFRecordDataset(files, compression_type=COMPRESSION).take(self.take)
            rows = _parsed(tf, rows)
            if extra is not None:  # the added rows spread evenly through the epoch, in a seeded order
                rows = tf.data.Dataset.sample_from_datasets(
                    [rows, extra.shuffle(added, seed=epoch_seed)], weights=[1 - added / self.rows, added / self.rows],
                    seed=epoch_seed, stop_on_empty_dataset=False)
            return rows.shuffle(shuffle_buffer, seed=epoch_seed).batch(batch_size)

        epochs = tf.data.Dataset.range(first_epoch, end_epoch).flat_map(epoch)
        return epochs.map(_to_inputs(tf), num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True).prefetch(tf.data.AUTOTUNE)

    def evaluation(self, tf, batch_size: int = 1024):
        """The split's batches in order (image, one-hot label), for validation and scoring."""
        if self.arrays is not None:
            return self._held(tf).batch(batch_size).prefetch(tf.data.AUTOTUNE)
        rows = tf.data.TFRecordDataset(list(self.files), compression_type=COMPRESSION)
        if self.take is not None:
            rows = rows.take(self.take)
        ds = _parsed(tf, rows)
        if self.extra is not None:
            ds = ds.concatenate(self._extra(tf))
        ds = ds.batch(batch_size).map(_to_inputs(tf), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # its batch count said: Keras then stops at the end instead of running into it (a warning on stderr)
        return ds.apply(tf.data.experimental.assert_cardinality(self.steps(batch_size))).prefetch(tf.data.AUTOTUNE)

    def _held(self, tf):
        """A held split's rows as Keras takes them: (image uint8 [28, 28, 1], one-hot label)."""
        return tf.data.Dataset.from_tensor_slices((self.arrays.images[..., None],
                                                   tf.one_hot(self.arrays.labels, N_CLASSES)))

    def _extra(self, tf):
        """The added rows as parsed streamed rows are, (image uint8 [28, 28], label); None without any."""
        if self.extra is None:
            return None
        return tf.data.Dataset.from_tensor_slices((self.extra.images, self.extra.labels))

    def batches(self, batch_size: int = 4096):
        """The split's rows in order as Arrays (ids, labels, images uint8 [n, 28, 28]) of up to batch_size rows,
        for scoring outside Keras' fit: only one batch is held at a time when the split streams."""
        if self.arrays is not None:
            for start in range(0, self.rows, batch_size):
                yield Arrays(*(a[start:start + batch_size] for a in self.arrays))
            return
        for batch in records.dataset(self.files, batch_size, limit=self.take):
            yield Arrays(batch[records.ID.name].numpy(), batch[records.LABEL.name].numpy(), batch["image"].numpy())
        if self.extra is not None:
            for start in range(0, len(self.extra.ids), batch_size):
                yield Arrays(*(a[start:start + batch_size] for a in self.extra))

    def scored(self, *predicts) -> tuple[np.ndarray, np.ndarray, list]:
        """(ids, labels, [each predict(images)]) over the whole split, a batch at a time: the outputs of a whole
        split are held (10 probabilities a row), its images never are. A predict of several outputs (a list of
        arrays) gives a list of arrays."""
        ids, labels, outputs = [], [], [[] for _ in predicts]
        for batch in self.batches():
            ids.append(batch.ids)
            labels.append(batch.labels)
            for out, predict in zip(outputs, predicts):
                out.append(predict(batch.images))
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), [np.zeros((0, N_CLASSES)) for _ in predicts]
        return np.concatenate(ids), np.concatenate(labels), [_joined(out) for out in outputs]

    def images_at(self, positions: np.ndarray) -> Arrays:
        """The rows at these sorted positions of the split (all of it read once when streamed, only they held)."""
        if self.arrays is not None:
            return Arrays(*(a[positions] for a in self.arrays))
        assert self.extra is None and self.take is None, "positions in a plain split"
        return records.pick(self.files, positions)


def _joined(parts: list):
    """One predict's batch outputs as one array (a list of arrays for a predict of several outputs)."""
    if isinstance(parts[0], list):
        return [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]
    return np.concatenate(parts)


def _parsed(tf, serialized):
    """Serialized examples -> (image uint8 [28, 28], label int64) elements, parsed in vectorized batches."""
    def parse(batch):
        parsed = records.parse_batch(batch)
        return parsed["image"], parsed["label"]

    return serialized.batch(_PARSE_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                              deterministic=True).unbatch()


def _to_inputs(tf):
    def to_inputs(images, labels):
        return tf.reshape(images, (-1, IMAGE_SIDE, IMAGE_SIDE, 1)), tf.one_hot(labels, N_CLASSES)
    return to_inputs
