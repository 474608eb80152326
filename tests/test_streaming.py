"""The model stages read a split larger than train.in_memory_rows as a stream of its TFRecord shards
(components.train.feed): every row once per epoch, an epoch's order a function of (seed, epoch) only, so an
attempt resumed after a crash trains exactly as one that never stopped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from runs import converted_kaggle_run, output

from components import records
from components.tensorflow_runtime import import_tensorflow
from components.train.feed import Feed
from schemas.config import TrainConfig
from schemas.examples import Arrays, Row

KAGGLE_ROWS = (400, 20)


def _shards(folder: Path, rows_per_shard: list[int]) -> tuple[list[Path], Arrays]:
    """TFRecord shards as convert writes them (GZIP, the shared encoder): row i has label i % 10 and every pixel
    i % 251, so a batch says which rows it holds."""
    tf = import_tensorflow()
    encode, files, start = records.encoder(), [], 0
    for shard, count in enumerate(rows_per_shard):
        path = folder / f"train-{shard:05d}-of-{len(rows_per_shard):05d}.tfrecord.gz"
        with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
            for i in range(start, start + count):
                writer.write(encode(Row(id=i, label=i % 10, pixels=bytes([i % 251]) * 784)))
        files.append(path)
        start += count
    ids = np.arange(start)
    return files, Arrays(ids, ids % 10, np.repeat((ids % 251).astype(np.uint8), 784).reshape(-1, 28, 28))


def _rows(batches) -> list[list[int]]:
    return [batch[0].numpy()[:, 0, 0, 0].tolist() for batch in batches]


def test_a_streamed_epoch_holds_every_row_once_in_an_order_set_by_seed_and_epoch(tmp_path):
    tf = import_tensorflow()
    files, arrays = _shards(tmp_path, [120, 90, 90])
    feed = Feed.of(files, 300, in_memory_rows=299)  # one row over: streamed
    assert not feed.in_memory and feed.rows == 300 and feed.steps(32) == 10
    three = _rows(feed.training(tf, 32, 7, 0, 3, shuffle_buffer=50))
    assert len(three) == 30 and [len(b) for b in three[:10]] == [32] * 9 + [12]  # each epoch ends on its own
    for epoch in range(3):
        assert sorted(sum(three[epoch * 10:(epoch + 1) * 10], [])) == sorted(arrays.images[:, 0, 0].tolist())
    assert three[:10] != three[10:20]  # shuffled again each epoch
    assert _rows(feed.training(tf, 32, 7, 2, 3, shuffle_buffer=50)) == three[20:]  # resumed at epoch 3: the same
    assert _rows(feed.training(tf, 32, 8, 0, 1, shuffle_buffer=50)) != three[:10]  # another seed, another order
    # in order for validation and scoring; labels one-hot
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in feed.evaluation(tf, 64)])
    assert np.array_equal(np.concatenate(images)[..., 0], arrays.images)
    assert np.array_equal(np.concatenate(labels).argmax(axis=1), arrays.labels)
    held = Feed.of(files, 300, in_memory_rows=300)  # held: shuffled whole, each epoch's order set the same way
    assert held.in_memory and np.array_equal(held.arrays.images, arrays.images)
    whole = _rows(held.training(tf, 32, 7, 0, 3, shuffle_buffer=50))
    assert len(whole) == 30 and whole[:10] != whole[10:20]
    assert sorted(sum(whole[10:20], [])) == sorted(arrays.images[:, 0, 0].tolist())
    assert _rows(held.training(tf, 32, 7, 2, 3, shuffle_buffer=50)) == whole[20:]


def test_a_subset_is_the_first_rows_and_added_rows_are_spread_through_the_epoch(tmp_path):
    tf = import_tensorflow()
    files, arrays = _shards(tmp_path, [100, 100])
    first = Feed.of(files, 200, in_memory_rows=0, take=130)  # a tune trial's rows
    assert first.rows == 130 and sorted(sum(_rows(first.training(tf, 64, 1, 0, 1, 1000)), [])) == list(range(130))
    assert np.array_equal(np.concatenate([b.images for b in first.batches(50)]), arrays.images[:130])
    assert np.array_equal(Feed.of(files, 200, in_memory_rows=1000, take=130).arrays.images, arrays.images[:130])
    extra = Arrays(-1 - np.arange(40), np.zeros(40, np.int64), np.full((40, 28, 28), 255, np.uint8))
    joined = Feed.of(files, 200, in_memory_rows=0).joined(extra)  # transfer's rehearsal rows
    rows = sum(_rows(joined.training(tf, 48, 3, 0, 1, shuffle_buffer=20)), [])
    assert joined.rows == 240 and len(rows) == 240 and rows.count(255) == 40
    where = [i for i, value in enumerate(rows) if value == 255]
    assert where[0] < 60 and where[-1] > 180  # mixed through the epoch, not appended at its end


def test_rows_picked_from_a_stream_are_those_rows(tmp_path):
    files, arrays = _shards(tmp_path, [70, 70, 70])
    positions = np.array([0, 69, 70, 150, 209])
    picked = records.pick(files, positions, batch_size=32)
    assert np.array_equal(picked.ids, positions) and np.array_equal(picked.images, arrays.images[positions])
    assert len(records.pick(files, np.array([], np.int64)).ids) == 0


class _Interrupted(RuntimeError):
    pass


def test_a_streamed_training_resumed_after_a_crash_gives_the_model_of_one_that_never_stopped(home, kaggle_data,
                                                                                             tmp_path):
    """Streamed (train.in_memory_rows=0); a held split's epochs are ordered the same way (the first test)."""
    import keras

    from components import train
    from components.keras_layers import load_keras_model

    folder, _ = converted_kaggle_run(kaggle_data)
    converted = output(folder, "converted")
    config = TrainConfig(epochs=2, width=0.25, in_memory_rows=0, shuffle_buffer=64)
    said = []
    whole = train.run(converted, config, 42, tmp_path / "whole", progress=said.append)
    assert "streamed from TFRecords (shuffle buffer 64 rows): train 360, val 40 rows" in said

    class CrashAfterTheFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:  # runs after digits' own callbacks: epoch 1 is checkpointed
                raise _Interrupted()

    with pytest.raises(_Interrupted):
        train.run(converted, config, 42, tmp_path / "resumed", callbacks=[CrashAfterTheFirstEpoch()])
    resumed = train.run(converted, config, 42, tmp_path / "resumed")
    assert (resumed.resumed_at_epoch, whole.train_rows, resumed.val_rows) == (2, 360, 40)
    weights = [load_keras_model(run.dir / run.file, compile=False).get_weights() for run in (whole, resumed)]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))


def test_scoring_a_streamed_split_gives_what_scoring_it_held_gives(home, kaggle_data, tmp_path):
    """Calibrate, evaluate (with the out-of-distribution detector) and export on the same model, the splits held
    (the default) and streamed (train.in_memory_rows=0): the same temperature, metrics, detector, robustness and
    submission, byte for byte where they are files."""
    import json

    from components import calibrate, evaluate, export
    from runs import make

    folder, config = converted_kaggle_run(kaggle_data, "train.epochs=1", "train.width=0.25", "evaluate.calibrate=false")
    converted, trained = output(folder, "converted"), make(folder, config, "model")
    results = {}
    for name, rows in (("held", 100_000), ("streamed", 0)):
        out = tmp_path / name
        calibrated = calibrate.run(trained, converted, out / "calibrate", in_memory_rows=rows)
        evaluate.run(calibrated, converted, out / "evaluate", threshold=0.0, champion=None, ood_keep=0.99,
                     in_memory_rows=rows)
        exported = export.run(calibrated, converted, out / "export", seed=0, in_memory_rows=rows)
        metrics = json.loads((out / "evaluate/metrics.json").read_text())
        robustness = json.loads((out / "evaluate/robustness.json").read_text())
        results[name] = {"temperature": calibrated.temperature, "metrics": metrics, "exported": exported.test_rows,
                         "robustness": {k: v for k, v in robustness.items() if k != "sample"},
                         "submission": (out / "export/submission.csv").read_bytes(),
                         "infra_rows": exported.infra_rows}
    assert results["streamed"] == results["held"]
    assert results["held"]["metrics"]["ood"] is not None and results["held"]["exported"] == 20
