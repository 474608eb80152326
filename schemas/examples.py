"""The TFRecord contract of the convert stage: one `tf.train.Example` feature spec, used by the writer
(components.records.encoder, used by the convert stage) and by the tf.data parser that training and
evaluation read with (components.records.dataset / load).

A record is one image: `id` (the canonical dataset's 1-based source row), `label` (0..9, or -1 for an
unlabelled test row) and `pixels` (784 bytes: 28x28 uint8, row-major, upright, 0 background .. 255
ink, exactly the canonical Parquet's bytes). Shards are gzip TFRecord files named
`<split>-<index>-of-<count>.tfrecord.gz`; each split's shards hold its examples sorted by id within a
shard, so the same input and seed give byte-identical shards on any runner.

This module is plain Python (no TensorFlow): the writer and the tf.data parser that apply the spec
live in components.records.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

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


class Arrays(NamedTuple):
    """A whole split in memory."""

    ids: np.ndarray  # int64 (n,)
    labels: np.ndarray  # int64 (n,), -1 where unlabelled
    images: np.ndarray  # uint8 (n, 28, 28)


def read_manifest(convert_dir: Path) -> dict[str, Any]:
    return json.loads((convert_dir / MANIFEST).read_text())


def shard_files(convert_dir: Path, split: ExampleSplit | str, manifest: dict[str, Any] | None = None) -> list[Path]:
    """The shard paths of one split, in manifest order."""
    manifest = manifest or read_manifest(convert_dir)
    return [convert_dir / s["file"] for s in manifest["splits"][ExampleSplit(split).value]["shards"]]

