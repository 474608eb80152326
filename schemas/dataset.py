"""The canonical dataset: one Parquet file per split, the same layout for every source.

Pixel representation (all sources): 784 unsigned bytes, row-major, the image upright as a person
reads it, 0 = background and 255 = full ink (MNIST's white-on-black). Noisy-set floats in [0, 1]
are scaled by 255 and rounded; its transposed storage is undone on ingest. The bytes sit in one
fixed-size binary column, so a row is one 784-byte value and a split is one contiguous buffer.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import pyarrow as pa

from schemas.sources import Source  # noqa: F401  (the canonical table names its source)

IMAGE_SIDE = 28
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE
N_CLASSES = 10
PIXEL_MAX = 255
ROW_GROUP_ROWS = 10_000  # Parquet row-group size: the unit the convert stage's Beam workers read in parallel


class Split(StrEnum):
    train = "train"
    test = "test"


# Kaggle Digit Recognizer headers.
KAGGLE_PIXEL_COLUMNS = tuple(f"pixel{i}" for i in range(N_PIXELS))
KAGGLE_TRAIN_HEADER = ("label", *KAGGLE_PIXEL_COLUMNS)
KAGGLE_TEST_HEADER = KAGGLE_PIXEL_COLUMNS

ID, LABEL, PIXELS, SOURCE = "id", "label", "pixels", "source"

SCHEMA = pa.schema(
    [
        pa.field(ID, pa.int64(), nullable=False,
                 metadata={"doc": "1-based row number in the source split (Kaggle's ImageId for test)"}),
        pa.field(LABEL, pa.int8(), nullable=True, metadata={"doc": "0..9; null for unlabelled test rows"}),
        pa.field(PIXELS, pa.binary(N_PIXELS), nullable=False,
                 metadata={"doc": "28x28 uint8, row-major, upright, 0 background .. 255 ink"}),
        pa.field(SOURCE, pa.dictionary(pa.int8(), pa.string()), nullable=False),
    ],
    metadata={"digits.schema": "canonical-v1"},
)


def to_table(ids: np.ndarray, labels: np.ndarray | None, pixels: np.ndarray, source: Source) -> pa.Table:
    """Build a canonical table from arrays: ids (n,), labels (n,) or None, pixels (n, 784) uint8."""
    n = len(ids)
    if pixels.dtype != np.uint8 or pixels.shape != (n, N_PIXELS):
        raise ValueError(f"pixels must be uint8 of shape ({n}, {N_PIXELS}), got {pixels.dtype} {pixels.shape}")
    flat = pa.py_buffer(np.ascontiguousarray(pixels).tobytes())
    pixel_array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(N_PIXELS), n, [None, flat])
    label_array = (pa.nulls(n, pa.int8()) if labels is None
                   else pa.array(np.asarray(labels, dtype=np.int8), pa.int8()))
    source_array = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([source.value]))
    return pa.Table.from_arrays([pa.array(ids, pa.int64()), label_array, pixel_array, source_array],
                                schema=SCHEMA)


def pixels_of(table: pa.Table) -> np.ndarray:
    """The pixel column as a (n, 28, 28) uint8 array (zero-copy where the column is one chunk)."""
    column = table.column(PIXELS).combine_chunks()
    buffer = column.buffers()[1]
    start = column.offset * N_PIXELS
    flat = np.frombuffer(buffer, dtype=np.uint8)[start:start + len(column) * N_PIXELS]
    return flat.reshape(len(column), IMAGE_SIDE, IMAGE_SIDE)


def labels_of(table: pa.Table) -> np.ndarray | None:
    """The label column as int8, or None when the split is unlabelled."""
    column = table.column(LABEL)
    if column.null_count == len(column):
        return None
    if column.null_count:
        raise ValueError(f"{column.null_count} of {len(column)} labels are null: a split is labelled or not")
    return column.to_numpy(zero_copy_only=False).astype(np.int8)
