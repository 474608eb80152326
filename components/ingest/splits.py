"""What a source reader hands back: one split's arrays, its rejects and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from components.ingest.text import NumericRows, Reject, ValueRule, check_values
from schemas.dataset import Split
from schemas.errors import DataFormatError


@dataclass
class SplitData:
    """One split in canonical form: ids (n,), labels (n,) int8 or None, pixels (n, 28, 28) uint8 upright."""

    ids: np.ndarray
    labels: np.ndarray | None
    pixels: np.ndarray
    rows_read: int
    rejects: list[Reject] = field(default_factory=list)
    files: list[str] | None = None  # per row, the file it was read from (sources of one file per image)
    skipped: list[str] = field(default_factory=list)  # files left out as not images by their suffix (Thumbs.db)


@dataclass(frozen=True)
class ReadOptions:
    """How a reader reads: every reader takes the same options and uses those that apply to it."""

    limit: int | None = None  # keep only the first N rows (or files) of each split
    strict: bool = True  # the first bad row stops reading; False: bad rows become rejects
    tfds_dir: Path | None = None  # where TFDS prepares its data sets (the mnist source)
    max_image_pixels: int = 40_000_000  # one file per image: larger images are refused before decoding


Reader = Callable[[Path | None, ReadOptions], tuple[dict[Split, SplitData], dict[str, str]]]
"""A source's reader (schemas.sources names one per source): (data, options) -> (splits, sha256 per input)."""


def keep_good_rows(path: str, rows: NumericRows, rules: list[ValueRule], *, strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """Apply the value rules; return (values, line numbers) of the good rows and append rejects to rows.

    In strict mode the first bad row (by line) raises DataFormatError, with the count of the rest.
    """
    good, value_rejects = check_values(path, rows, rules)
    rows.rejects = sorted(rows.rejects + value_rejects, key=lambda r: r.line)
    if strict and rows.rejects:
        first = rows.rejects[0]
        more = len(rows.rejects) - 1
        suffix = (f" ({more} more bad row{'s' if more > 1 else ''}; "
                  "--set ingest.on_bad_rows=quarantine sets bad rows aside)") if more else ""
        raise DataFormatError(first.path, first.reason + suffix, line=first.line, column=first.column)
    if not good.any():
        raise DataFormatError(path, "no valid rows: every row was rejected (see ingest/rejected.csv)"
                              if rows.rejects else "no data rows")
    if good.all():  # the common case: no copy of what may be hundreds of MB
        return rows.values, rows.lines
    return rows.values[good], rows.lines[good]
