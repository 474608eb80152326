"""The convert stage's Beam transforms: canonical Parquet in, gzip TFRecord shards out.

Every transform here is built from the four primitives every Beam runner executes — Create, ParDo,
Flatten and GroupByKey — with one main output per ParDo and no side inputs, because Beam's
DaskRunner translates nothing else (it hands a tagged output's consumers every element, and it
computes only the pipeline's last transform: the pipeline must end in one sink).

The split decision needs no side input either: the driver plans it from the id and label columns
(`plan.SplitPlan`), and each row is routed by comparing its seeded key with its class's cut-off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import uuid
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow.parquet as pq

from components import records
from components.convert.plan import SplitPlan, shards_of
from schemas import examples as ex
from schemas.dataset import ID, LABEL, N_PIXELS, PIXELS, labels_of, pixels_of


def import_beam():
    """`import apache_beam` without the root-logger warning its BigQuery client prints at import.

    That warning goes through `logging.warning`, which would also install a stderr handler on the
    root logger (logging.basicConfig) for the rest of the process.
    """
    import sys

    if "apache_beam" in sys.modules:
        return sys.modules["apache_beam"]
    root = logging.getLogger()
    guard = logging.NullHandler()
    quiet = _DropMessage("apitools not found")
    root.addHandler(guard)
    root.addFilter(quiet)
    try:
        import apache_beam
    finally:
        root.removeHandler(guard)
        root.removeFilter(quiet)
    return apache_beam


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


beam = import_beam()


class Batch(NamedTuple):
    """The rows of one Parquet row group: the element the pipeline moves until rows are grouped by shard.

    Moving ~10,000 rows per element rather than one keeps Beam's per-element cost (coders, bundle
    bookkeeping) off the hot path; the split and shard of every row are computed vectorised.
    """

    ids: np.ndarray  # int64 (n,)
    labels: np.ndarray  # int64 (n,), NO_LABEL where unlabelled
    pixels: np.ndarray  # uint8 (n, 784)


def row_groups(parquet: Path) -> list[tuple[str, int]]:
    """The units of parallel reading: (path, row group) for each row group of a canonical Parquet file."""
    return [(str(parquet), group) for group in range(pq.ParquetFile(parquet).num_row_groups)]


def read_row_group(part: tuple[str, int]) -> Iterator[Batch]:
    path, group = part
    table = pq.ParquetFile(path).read_row_group(group, columns=[ID, LABEL, PIXELS])
    ids = table.column(ID).to_numpy().astype(np.int64)
    labels = labels_of(table)
    labels = np.full(len(ids), ex.NO_LABEL, np.int64) if labels is None else labels.astype(np.int64)
    yield Batch(ids, labels, pixels_of(table).reshape(len(ids), N_PIXELS))


@beam.ptransform_fn
def ReadCanonical(pbegin, parquet: Path):  # noqa: N802 - Beam transforms are named like classes
    """Batches of one canonical Parquet split, a row group per element."""
    return (pbegin
            | "RowGroups" >> beam.Create(row_groups(parquet))
            | "Read" >> beam.FlatMap(read_row_group))


class _AssignSplit(beam.DoFn):
    """Divide a batch of the labelled train split into its `train` and `val` rows (the plan's cut-offs)."""

    def __init__(self, plan: SplitPlan) -> None:
        self.plan = plan

    def process(self, batch: Batch) -> Iterator[tuple[str, Batch]]:
        val = self.plan.in_val(batch.ids, batch.labels)
        for split, mask in ((ex.ExampleSplit.train, ~val), (ex.ExampleSplit.val, val)):
            if mask.any():
                yield split.value, Batch(batch.ids[mask], batch.labels[mask], batch.pixels[mask])


class _KeyByShard(beam.DoFn):
    """(split, batch) -> ((split, shard), the batch's rows of that shard), for every shard the batch touches."""

    def __init__(self, shards: dict[str, int]) -> None:
        self.shards = shards

    def process(self, element: tuple[str, Batch]) -> Iterator[tuple[tuple[str, int], Batch]]:
        split, batch = element
        shard_of = shards_of(batch.ids, self.shards[split])
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            yield (split, int(shard)), Batch(batch.ids[rows], batch.labels[rows], batch.pixels[rows])


@beam.ptransform_fn
def ExamplesOfSplit(pbegin, parquet: Path, split: ex.ExampleSplit | None, plan: SplitPlan,
                    shards: dict[str, int]):  # noqa: N802
    """One canonical split as batches of rows keyed by their output shard.

    split None: the labelled train split, divided into train and val by the plan; else every row
    goes to `split` (the test split, labelled or not).
    """
    batches = pbegin | "Read" >> ReadCanonical(parquet)
    if split is None:
        routed = batches | "AssignTrainVal" >> beam.ParDo(_AssignSplit(plan))
    else:
        routed = batches | "Assign" >> beam.Map(lambda batch, name: (name, batch), split.value)
    return routed | "KeyByShard" >> beam.ParDo(_KeyByShard(shards))


class _WriteShard(beam.DoFn):
    """Write one shard: its rows sorted by id, each encoded as a tf.train.Example, into a gzip TFRecord
    file, then its sidecar JSON.

    Both are written under a unique temporary name and renamed, so a retried bundle rewrites the
    same bytes and a reader never sees half a file.
    """

    def __init__(self, out_dir: str, sidecar_dir: str, shards: dict[str, int]) -> None:
        self.out_dir, self.sidecar_dir, self.shards = out_dir, sidecar_dir, shards

    def setup(self) -> None:
        from components.tensorflow_runtime import import_tensorflow

        self.tf = import_tensorflow()
        self.encode = records.encoder()

    def process(self, element: tuple[tuple[str, int], Iterable[Batch]]) -> Iterator[dict]:
        (split, index), parts = element
        parts = list(parts)
        ids = np.concatenate([p.ids for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        pixels = np.concatenate([p.pixels for p in parts])
        tf, out = self.tf, self.out_dir
        name = ex.shard_name(split, index, self.shards[split])
        digest, count = hashlib.sha256(), 0
        partial = f"{out}/.{name}.{uuid.uuid4().hex[:8]}.partial"
        with tf.io.TFRecordWriter(partial, options=ex.COMPRESSION) as writer:
            for i in np.argsort(ids, kind="stable"):
                serialized = self.encode(ex.Row(int(ids[i]), int(labels[i]), pixels[i].tobytes()))
                writer.write(serialized)
                digest.update(struct.pack("<Q", len(serialized)))
                digest.update(serialized)
                count += 1
        tf.io.gfile.rename(partial, f"{out}/{name}", overwrite=True)
        classes, per_class = np.unique(labels, return_counts=True)
        shard = {"split": split, "index": index, "file": name, "count": count, "sha256": digest.hexdigest(),
                 "label_counts": {str(int(c)): int(n) for c, n in zip(classes, per_class)}}
        sidecar = f"{self.sidecar_dir}/{name}.json"
        with tf.io.gfile.GFile(sidecar + ".partial", "w") as f:
            f.write(json.dumps(shard))
        tf.io.gfile.rename(sidecar + ".partial", sidecar, overwrite=True)
        yield shard


def build(pipeline, *, train: Path, test: Path | None, plan: SplitPlan, out_dir: Path, sidecar_dir: Path) -> None:
    """Add the conversion to a Beam pipeline: every split's shards, ending in one sink.

    Each shard also leaves a sidecar JSON (file, count, sha256, label counts) in sidecar_dir.
    """
    shards = plan.shards
    parts = [pipeline | "Train" >> ExamplesOfSplit(train, None, plan, shards)]
    if test is not None:
        parts.append(pipeline | "Test" >> ExamplesOfSplit(test, ex.ExampleSplit.test, plan, shards))
    (parts
     | "AllSplits" >> beam.Flatten()
     | "GroupByShard" >> beam.GroupByKey()
     | "WriteShards" >> beam.ParDo(_WriteShard(str(out_dir), str(sidecar_dir), shards)))
