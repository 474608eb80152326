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
import os
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
    """The rows of one Parquet row group, as the spill step reads them.

    Handling ~10,000 rows per element rather than one keeps Beam's per-element cost (coders, bundle
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


SPILL_DTYPE = np.dtype([("id", "<i8"), ("label", "<i8"), ("pixels", "u1", (N_PIXELS,))])


class _SpillRowGroup(beam.DoFn):
    """Read one row group, route each row to its split (train or val by the plan's cut-offs for the labelled train
    file; `split` for the test file) and its shard, and write the rows to one spill file per (row group, split),
    sorted by (shard, id), so that what a shard needs of this row group is one contiguous slice. Yields
    ((split, shard), (spill file, start, stop)) for each shard the row group touches.

    The GroupByKey after it moves these references, never pixels: no runner holds the data in memory (the
    DirectRunner keeps a GroupByKey's whole input in memory), and each shard writer reads only its rows back. The
    spill folder must be one every worker sees (the stage folder, as for the shards)."""

    def __init__(self, plan: SplitPlan, split: ex.ExampleSplit | None, shards: dict[str, int], spill_dir: str) -> None:
        self.plan, self.split, self.shards, self.spill_dir = plan, split, shards, spill_dir

    def process(self, part: tuple[str, int]) -> Iterator[tuple[tuple[str, int], tuple[str, int, int]]]:
        path, group = part
        for batch in read_row_group(part):
            if self.split is None:
                val = self.plan.in_val(batch.ids, batch.labels)
                routed = ((ex.ExampleSplit.train.value, ~val), (ex.ExampleSplit.val.value, val))
            else:
                routed = ((self.split.value, np.ones(len(batch.ids), bool)),)
            for split, mask in routed:
                if mask.any():
                    yield from self._spill(split, f"{split}-{Path(path).stem}-{group:05d}.rows", batch.ids[mask],
                                           batch.labels[mask], batch.pixels[mask])

    def _spill(self, split: str, name: str, ids: np.ndarray, labels: np.ndarray, pixels: np.ndarray):
        shard_of = shards_of(ids, self.shards[split])
        order = np.lexsort((ids, shard_of))
        rows = np.empty(len(order), SPILL_DTYPE)
        rows["id"], rows["label"], rows["pixels"] = ids[order], labels[order], pixels[order]
        target = f"{self.spill_dir}/{name}"
        partial = f"{self.spill_dir}/.{name}.{uuid.uuid4().hex[:8]}.partial"  # a retried bundle writes it again
        with open(partial, "wb") as fh:
            fh.write(rows.data)  # raw SPILL_DTYPE rows; a full disk is OSError ENOSPC (numpy's writers lose errno)
        os.replace(partial, target)
        sorted_shards = shard_of[order]
        cuts = [0, *(np.flatnonzero(np.diff(sorted_shards)) + 1).tolist(), len(order)]
        for start, stop in zip(cuts[:-1], cuts[1:]):
            yield (split, int(sorted_shards[start])), (target, start, stop)


class _WriteShard(beam.DoFn):
    """Write one shard: its rows (read back from the spill files' slices) sorted by id, each encoded as a
    tf.train.Example, into a gzip TFRecord file, then its sidecar JSON.

    Both are written under a unique temporary name and renamed, so a retried bundle rewrites the
    same bytes and a reader never sees half a file.
    """

    def __init__(self, out_dir: str, sidecar_dir: str, shards: dict[str, int]) -> None:
        self.out_dir, self.sidecar_dir, self.shards = out_dir, sidecar_dir, shards

    def setup(self) -> None:
        from components.tensorflow_runtime import import_tensorflow

        self.tf = import_tensorflow()
        self.encode = records.encoder()

    def process(self, element: tuple[tuple[str, int], Iterable[tuple[str, int, int]]]) -> Iterator[dict]:
        (split, index), slices = element
        rows = np.concatenate([np.fromfile(path, SPILL_DTYPE, count=stop - start, offset=start * SPILL_DTYPE.itemsize)
                               for path, start, stop in sorted(slices)])
        ids, labels, pixels = rows["id"], rows["label"], rows["pixels"]
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


def build(pipeline, *, train: Path, test: Path | None, plan: SplitPlan, out_dir: Path, sidecar_dir: Path,
          spill_dir: Path) -> None:
    """Add the conversion to a Beam pipeline: every split's shards, ending in one sink.

    Each shard also leaves a sidecar JSON (file, count, sha256, label counts) in sidecar_dir; spill_dir holds the
    rows between reading and writing (as much as the data; the caller removes it).
    """
    shards = plan.shards
    parts = []
    for name, parquet, split in (("Train", train, None), ("Test", test, ex.ExampleSplit.test)):
        if parquet is None:
            continue
        parts.append(pipeline
                     | f"{name}RowGroups" >> beam.Create(row_groups(parquet))
                     | f"{name}Spill" >> beam.ParDo(_SpillRowGroup(plan, split, shards, str(spill_dir))))
    (parts
     | "AllSplits" >> beam.Flatten()
     | "GroupByShard" >> beam.GroupByKey()
     | "WriteShards" >> beam.ParDo(_WriteShard(str(out_dir), str(sidecar_dir), shards)))
