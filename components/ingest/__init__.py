"""The ingest stage: read a source with its real loader, write the canonical Parquet per split + EDA."""

from __future__ import annotations

import csv
import hashlib
import importlib
import os
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from components.ingest import eda
from components.ingest.splits import ReadOptions, Reader, SplitData
from schemas.artifacts import Examples
from schemas.config import IngestConfig, OnBadRows
from schemas.dataset import N_PIXELS, ROW_GROUP_ROWS, Source, Split, to_table
from schemas.errors import DigitsInputError
from schemas.runs import write_csv_atomic

REJECTED_CSV = "rejected.csv"


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
        progress: Callable[[str], None] = lambda _: None) -> Examples:
    """Read `source` from config.data into canonical Parquet files in out_dir.

    Returns the Examples artifact (split files, row counts, rejects, input fingerprints).
    Raises DigitsInputError (DataFormatError with file/line/column) for bad input.
    """
    data = Path(config.data).expanduser() if config.data else None
    spec = source.spec
    if data is None and spec.needs_data:
        raise DigitsInputError(f"the {source.value} source needs --data: {spec.data_help}")
    progress(f"reading {source.value} from {data or 'its download'}")
    if data is not None:
        _check_memory(data)
    splits, fingerprints = reader_of(source)(data, ReadOptions(
        limit=config.limit, strict=config.on_bad_rows is OnBadRows.strict, tfds_dir=tfds_dir,
        max_image_pixels=config.max_image_pixels))
    reviewed, changes = None, []
    if config.review:
        reviewed, changes = _apply_review(splits, Path(config.review))
        progress(f"review {config.review}: {reviewed['relabelled']} relabelled, {reviewed['dropped']} dropped")
    out_dir.mkdir(parents=True, exist_ok=True)
    if reviewed is not None:
        write_csv_atomic(out_dir / Examples.REVIEW_APPLIED, ("id", "given_label", "decision"), changes)
    progress("writing Parquet")
    for split, part in splits.items():
        table = to_table(part.ids, part.labels, part.pixels.reshape(len(part.pixels), N_PIXELS), source)
        pq.write_table(table, out_dir / Examples.file_name(split), compression="zstd",
                       row_group_size=ROW_GROUP_ROWS)
    rejects = [reject for part in splits.values() for reject in part.rejects]
    if rejects:
        _write_rejects(splits, out_dir / REJECTED_CSV)
    named = any(part.files is not None for part in splits.values())
    if named:
        _write_files(splits, out_dir / Examples.FILES_CSV)
    progress("exploring (EDA)")
    summary = eda.write(splits, out_dir / "eda")
    return Examples(
        dir=out_dir, source=source,
        counts={split.value: len(part.ids) for split, part in splits.items()},
        rows_read={split.value: part.rows_read for split, part in splits.items()},
        rejected={split.value: len(part.rejects) for split, part in splits.items()},
        labelled={split.value: part.labels is not None for split, part in splits.items()},
        fingerprints=fingerprints,
        duplicates=summary["duplicates"],
        named=named,
        skipped={split.value: len(part.skipped) for split, part in splits.items() if part.skipped},
        review=reviewed,
    )


def _apply_review(splits: dict[Split, SplitData], path: Path) -> tuple[dict, list]:
    """The review file's decisions applied to the train split in place (components.ingest.review)."""
    import dataclasses

    import numpy as np

    from components.ingest import review

    decisions = review.read(path)
    train = splits.get(Split.train)
    if train is None or train.labels is None:
        raise DigitsInputError(f"ingest.review={path}: this source has no labelled train split to review")
    files = np.asarray(train.files, dtype=object) if train.files is not None else None
    summary, ids, labels, (pixels, files), changes = review.apply(decisions, train.ids, train.labels, train.pixels,
                                                                  files)
    splits[Split.train] = dataclasses.replace(train, ids=ids, labels=labels, pixels=pixels,
                                              files=None if files is None else files.tolist())
    return summary, changes


def _write_rejects(splits: dict[Split, SplitData], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "file", "line", "column", "reason"])
        for split, part in splits.items():
            for r in part.rejects:
                writer.writerow([split.value, r.path, r.line, "" if r.column is None else r.column, r.reason])


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


def _write_files(splits: dict[Split, SplitData], path: Path) -> None:
    """split,id,file for sources of one file per image: which file each canonical row came from."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "id", "file"])
        for split, part in splits.items():
            for row_id, name in zip(part.ids.tolist(), part.files or ()):
                writer.writerow([split.value, row_id, name])
