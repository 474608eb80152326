"""The ingest stage: read a source with its real loader, write the canonical Parquet per split + EDA."""

from __future__ import annotations

import csv
import hashlib
import importlib
import os
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from components.ingest import eda
from components.ingest.splits import ReadOptions, Reader, pieces
from schemas.artifacts import Examples
from schemas.config import IngestConfig, OnBadRows
from schemas.dataset import N_PIXELS, ROW_GROUP_ROWS, SCHEMA, Source, Split, to_table
from schemas.errors import DigitsInputError
from schemas.runs import write_csv_atomic

REJECTED_CSV = "rejected.csv"
PROGRESS_EVERY_S = 10  # rows read so far, said at most this often


def reader_of(source: Source | str) -> Reader:
    """The reader schemas.sources names for a source, imported now (a run imports only its own)."""
    return _named(Source(source).spec.reader)


def input_files(source: Source | str, data: Path) -> list[Path]:
    """The files ingest will read from data for this source, its layout checked without reading them (the
    source's `layout` in schemas.sources): a wrong --data is one line (DataFormatError) in milliseconds."""
    return _named(Source(source).spec.layout)(Path(data).expanduser())


def _named(ref: str) -> Callable:
    module, _, function = ref.partition(":")
    return getattr(importlib.import_module(module), function)


def source_fingerprint(source: Source, config: IngestConfig) -> str | None:
    """sha256 over the bytes ingest will read (input_files, with their names relative to --data), so equal
    fingerprints mean equal input whatever the path; the layout is checked first, so a wrong --data is one
    line before any byte is hashed. None when the source is a download (mnist without --data): what it
    would fetch is unknown until it is fetched."""
    if not config.data:
        return None
    data = Path(config.data).expanduser()
    digest = hashlib.sha256(source.value.encode())
    for path in input_files(source, data):
        digest.update(os.fsencode(path.relative_to(data) if path != data else path.name) + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    if config.review:  # the label fixes are input too: another review file, another dataset
        from components.ingest import review

        digest.update(b"\0review\0" + review.read(Path(config.review)).sha256.encode())
    return digest.hexdigest()


def run(source: Source, config: IngestConfig, out_dir: Path, *, tfds_dir: Path,
        progress: Callable[[str], None] = lambda _: None, dask_address: str | None = None) -> Examples:
    """Read `source` from config.data into canonical Parquet files in out_dir.

    Returns the Examples artifact (split files, row counts, rejects, input fingerprints).
    Raises DigitsInputError (DataFormatError with file/line/column) for bad input.
    """
    data = Path(config.data).expanduser() if config.data else None
    spec = source.spec
    if data is None and spec.needs_data:
        raise DigitsInputError(f"the {source.value} source needs --data: {spec.data_help}")
    progress(f"reading {source.value} from {data or 'its download'}")
    if data is not None and not spec.streams:
        _check_memory(data)
    splits, fingerprints = reader_of(source)(data, ReadOptions(
        limit=config.limit, strict=config.on_bad_rows is OnBadRows.strict, tfds_dir=tfds_dir,
        max_image_pixels=config.max_image_pixels, dask_address=dask_address))
    decisions = None
    if config.review:
        from components.ingest import review

        decisions = review.Applying(review.read(Path(config.review)))
        if Split.train not in splits:
            raise DigitsInputError(f"ingest.review={config.review}: this source has no labelled train split to review")
    out_dir.mkdir(parents=True, exist_ok=True)
    explorer = eda.Explorer()
    counts, rows_read, rejected, labelled, skipped = {}, {}, {}, {}, {}
    named, said = False, time.monotonic()
    with _CsvRows(out_dir / REJECTED_CSV, ("split", "file", "line", "column", "reason")) as rejects, \
            _CsvRows(out_dir / Examples.FILES_CSV, ("split", "id", "file")) as files:
        for split, part in splits.items():
            progress(f"reading and writing {split.value} as Parquet")
            counts[split.value] = rows_read[split.value] = rejected[split.value] = 0
            with _RowGroups(out_dir / Examples.file_name(split)) as writer:
                for piece in pieces(part):
                    if decisions is not None and split is Split.train:
                        piece = decisions.apply(piece)
                    pixels = piece.pixels.reshape(len(piece.pixels), N_PIXELS)
                    writer.write(to_table(piece.ids, piece.labels, pixels, source))
                    explorer.add(split, piece)
                    counts[split.value] += len(piece.ids)
                    rows_read[split.value] += piece.rows_read
                    rejected[split.value] += len(piece.rejects)
                    labelled[split.value] = piece.labels is not None
                    rejects.write([split.value, r.path, r.line, "" if r.column is None else r.column, r.reason]
                                  for r in piece.rejects)
                    if piece.files is not None:
                        named = True
                        files.write([split.value, row_id, name] for row_id, name in zip(piece.ids.tolist(), piece.files))
                    if piece.skipped:
                        skipped[split.value] = skipped.get(split.value, 0) + len(piece.skipped)
                    if time.monotonic() - said >= PROGRESS_EVERY_S:  # a large file: a line every few seconds
                        progress(f"{split.value}: {counts[split.value]:,} rows")
                        said = time.monotonic()
    reviewed = None
    if decisions is not None:
        reviewed, changes = decisions.finish()
        progress(f"review {config.review}: {reviewed['relabelled']} relabelled, {reviewed['dropped']} dropped")
        write_csv_atomic(out_dir / Examples.REVIEW_APPLIED, ("id", "given_label", "decision"), changes)
    progress("exploring (EDA)")
    summary = explorer.write(out_dir / "eda")
    return Examples(
        dir=out_dir, source=source, counts=counts, rows_read=rows_read, rejected=rejected, labelled=labelled,
        fingerprints=fingerprints,
        duplicates=summary["duplicates"],
        named=named,
        skipped=skipped,
        review=reviewed,
    )


class _RowGroups:
    """A Parquet file written as pieces come, in row groups of ROW_GROUP_ROWS whatever the pieces' sizes: the
    same file as pq.write_table of the whole split would write."""

    def __init__(self, path: Path) -> None:
        self.writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
        self.pending: list[pa.Table] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= ROW_GROUP_ROWS:
            whole = pa.concat_tables(self.pending)
            cut = self.rows - self.rows % ROW_GROUP_ROWS
            self.writer.write_table(whole.slice(0, cut).combine_chunks(), row_group_size=ROW_GROUP_ROWS)
            self.pending, self.rows = [whole.slice(cut)], self.rows - cut

    def __enter__(self) -> _RowGroups:
        return self

    def __exit__(self, kind, *exc) -> None:
        try:
            if kind is None and self.rows:
                self.writer.write_table(pa.concat_tables(self.pending).combine_chunks(), row_group_size=ROW_GROUP_ROWS)
        finally:
            self.writer.close()


class _CsvRows:
    """A CSV file written row by row as pieces come, left on disk only when a row was written."""

    def __init__(self, path: Path, header: tuple[str, ...]) -> None:
        self.path, self.header, self.fh, self.writer = path, header, None, None

    def write(self, rows) -> None:
        for row in rows:
            if self.writer is None:
                self.fh = self.path.open("w", newline="")
                self.writer = csv.writer(self.fh)
                self.writer.writerow(self.header)
            self.writer.writerow(row)

    def __enter__(self) -> _CsvRows:
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            self.fh.close()


MEMORY_PER_INPUT_BYTE = 3  # measured: the noisy .amat pair (536 MB of text) peaked at 1,260 MB


def _check_memory(data: Path) -> None:
    """Refuse, in one line, an input that cannot be read in the memory this machine has free: the text
    readers hold a whole file while they parse it (a zip counts by its uncompressed size)."""
    import zipfile

    import psutil

    if data.is_file() and zipfile.is_zipfile(data):
        with zipfile.ZipFile(data) as archive:
            size = sum(info.file_size for info in archive.infolist())
    elif data.is_file():
        size = data.stat().st_size
    else:
        size = max((p.stat().st_size for p in data.iterdir() if p.is_file()), default=0) if data.is_dir() else 0
    needed, available = size * MEMORY_PER_INPUT_BYTE, psutil.virtual_memory().available
    if needed > available:
        raise DigitsInputError(f"{data}: reading {size / 2**30:.1f} GiB of input needs about {needed / 2**30:.1f} GiB "
                               f"of memory and {available / 2**30:.1f} GiB is free; split the file or use a larger "
                               "machine")


