"""The split plan: which labelled train rows become the validation split, decided before Beam runs.

Stratified and seeded: every row gets a 64-bit key mixed from (seed, id); within each class the
rows with the smallest round(val_fraction x class size) keys are validation (at least one row of
every class with two or more). The driver reads only
the id and label columns to find each class's cut-off key; the Beam workers route a row by comparing
its own key with its class's cut-off, so the plan travels as ten numbers, not a list of ids, and any
runner reaches the same split. Keys use splitmix64, vectorised over numpy arrays (a test holds the
vectorised keys to a plain per-row implementation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from schemas.examples import ExampleSplit

_MASK = (1 << 64) - 1
_SHARD_SALT = 0x5D1B_5EED_0F_5A4D


def _mix(x: int) -> int:
    """splitmix64's finaliser on one unsigned 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_key(seed: int, row_id: int) -> int:
    """The seeded sort key of one row (same value as `row_keys`)."""
    return _mix(_mix(seed & _MASK) ^ (row_id & _MASK))


def row_keys(seed: int, ids: np.ndarray) -> np.ndarray:
    return _mix_array(np.uint64(_mix(seed & _MASK)) ^ ids.astype(np.uint64))


def shards_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each row: a hash of its id, so shards are balanced and independent of the runner."""
    return (_mix_array(ids.astype(np.uint64) ^ np.uint64(_SHARD_SALT)) % np.uint64(shards)).astype(np.int64)


@dataclass(frozen=True)
class SplitPlan:
    seed: int
    val_fraction: float
    # per class: the (key, id) of the first row that stays in train; None: the whole class is validation
    cutoffs: dict[int, tuple[int, int] | None]
    counts: dict[str, int]  # rows per output split
    shards: dict[str, int]  # shards per output split
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> label -> rows

    def split_of(self, row_id: int, label: int) -> ExampleSplit:
        """One row's split (the rule `in_val` applies to whole batches)."""
        cutoff = self.cutoffs[label]
        if cutoff is None or (row_key(self.seed, row_id), row_id) < cutoff:
            return ExampleSplit.val
        return ExampleSplit.train

    def in_val(self, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """A boolean mask: which of these rows of the labelled train split are validation rows."""
        keys = row_keys(self.seed, ids)
        ids = ids.astype(np.uint64)
        val = np.zeros(len(ids), bool)
        for label, cutoff in self.cutoffs.items():
            members = labels == label
            if cutoff is None:
                val |= members
            else:
                key, row_id = np.uint64(cutoff[0]), np.uint64(cutoff[1])
                val |= members & ((keys < key) | ((keys == key) & (ids < row_id)))
        return val

    def summary(self) -> dict:
        """What run.json records about the split."""
        return {"seed": self.seed, "val_fraction": self.val_fraction, "stratified_by": "label",
                "counts": self.counts, "class_counts": self.class_counts}


def plan(ids: np.ndarray, labels: np.ndarray, test_rows: int | None, *, seed: int, val_fraction: float,
         rows_per_shard: int) -> SplitPlan:
    """Plan the split of the labelled train split (ids, labels) and the shard count of each output split."""
    keys = row_keys(seed, ids)
    cutoffs: dict[int, tuple[int, int] | None] = {}
    class_counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = members[np.lexsort((ids[members], keys[members]))]
        n_val = math.floor(val_fraction * len(order) + 0.5)
        if n_val == 0 and len(order) > 1:  # tiny data (a quick --set ingest.limit run): every class validated
            n_val = 1
        cutoffs[int(label)] = None if n_val == len(order) else (int(keys[order[n_val]]), int(ids[order[n_val]]))
        class_counts["val"][str(int(label))] = n_val
        class_counts["train"][str(int(label))] = len(order) - n_val
    counts = {"train": sum(class_counts["train"].values()), "val": sum(class_counts["val"].values())}
    if test_rows is not None:
        counts["test"] = test_rows
    shards = {split: max(1, math.ceil(n / rows_per_shard)) for split, n in counts.items()}
    return SplitPlan(seed=seed, val_fraction=val_fraction, cutoffs=cutoffs, counts=counts, shards=shards,
                     class_counts=class_counts)
