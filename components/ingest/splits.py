"""What a source reader hands back: one split's arrays, its rejects and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

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
    dask_address: str | None = None  # text sources parse their blocks on this Dask scheduler's workers (in order)


Part = SplitData | Iterable[SplitData]
Reader = Callable[[Path | None, ReadOptions], tuple[dict[Split, Part], dict[str, str]]]
"""A source's reader (schemas.sources names one per source): (data, options) -> (splits, sha256 per input).

A split is one SplitData, or an iterable of SplitData pieces in order (a streaming reader: memory holds one
piece at a time, read once); a streaming reader fills the fingerprints as its files are read to their end."""


def pieces(part: Part) -> Iterator[SplitData]:
    """A split's pieces in order (a whole split is one piece)."""
    if isinstance(part, SplitData):
        yield part
    else:
        yield from part


def collect(part: Part) -> SplitData:
    """A split as one SplitData (its pieces concatenated): for callers that want the whole split in memory."""
    if isinstance(part, SplitData):
        return part
    got = list(part)
    if len(got) == 1:
        return got[0]
    labelled = got[0].labels is not None
    return SplitData(ids=np.concatenate([p.ids for p in got]),
                     labels=np.concatenate([p.labels for p in got]) if labelled else None,
                     pixels=np.concatenate([p.pixels for p in got]), rows_read=sum(p.rows_read for p in got),
                     rejects=[r for p in got for r in p.rejects],
                     files=[f for p in got for f in p.files] if got[0].files is not None else None,
                     skipped=[f for p in got for f in p.skipped])


def checked_blocks(path: str, blocks: Iterable[tuple[NumericRows, list[ValueRule]]], *,
                   strict: bool) -> Iterator[tuple[np.ndarray, np.ndarray, list[Reject], int]]:
    """The value rules applied to a file parsed block by block: (values, line numbers, rejects, rows read) of each
    block, its good rows kept. In strict mode the first bad row raises DataFormatError once the rest of the file has been
    read to count the other bad rows (the same line, and the same count, as for the file read whole)."""
    blocks = iter(blocks)
    bad = good = 0
    for rows, rules in blocks:
        ok, value_rejects = check_values(path, rows, rules)
        rejects = sorted(rows.rejects + value_rejects, key=lambda r: r.line)
        if strict and rejects:
            more = len(rejects) - 1
            for later, later_rules in blocks:
                more += len(later.rejects) + (~check_values(path, later, later_rules)[0]).sum()
            raise _strict_error(rejects[0], int(more))
        bad += len(rejects)
        good += int(ok.sum())
        n_read = len(rows.values) + len(rows.rejects)
        if ok.all():
            yield rows.values, rows.lines, rejects, n_read
        else:
            yield rows.values[ok], rows.lines[ok], rejects, n_read
    if not good:
        raise DataFormatError(path, "no valid rows: every row was rejected (see ingest/rejected.csv)"
                              if bad else "no data rows")


def _strict_error(first: Reject, more: int) -> DataFormatError:
    suffix = (f" ({more} more bad row{'s' if more > 1 else ''}; "
              "--set ingest.on_bad_rows=quarantine sets bad rows aside)") if more else ""
    return DataFormatError(first.path, first.reason + suffix, line=first.line, column=first.column)
