"""Kaggle "Digit Recognizer": train.csv (label,pixel0..pixel783) and test.csv (pixel0..pixel783).

Read from a folder or from the competition zip in place. Test ids are Kaggle's ImageId: 1..N in
file order; train ids are 1..N in file order too.
"""

from __future__ import annotations

import functools
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from components.files import check_regular_file
from components.ingest.splits import ReadOptions, SplitData, checked_blocks
from components.ingest.text import (NumericRows, TextBody, ValueRule, hashed_pieces, other_separator, parse_numeric,
                                    shorten, text_blocks)
from components.parallel import ordered_map
from schemas.artifacts import sha256_file
from schemas.dataset import (IMAGE_SIDE, KAGGLE_TEST_HEADER, KAGGLE_TRAIN_HEADER, N_PIXELS, PIXEL_MAX,
                             Split)
from schemas.errors import DataFormatError

_FILES = {Split.train: "train.csv", Split.test: "test.csv"}


def read(data: Path, options: ReadOptions) -> tuple[dict[Split, Iterator[SplitData]], dict[str, str]]:
    """Both splits from a folder or a zip, each streamed in blocks of rows (memory holds one block, whatever the
    file's size). Returns (pieces per split, sha256 per input file: filled as the files are read)."""
    layout(data)
    fingerprints: dict[str, str] = {}
    if data.is_dir():
        splits = {split: hashed_pieces(data / name, fingerprints, functools.partial(
            _read_split, split=split, limit=options.limit, strict=options.strict, dask_address=options.dask_address))
            for split, name in _FILES.items()}
        return splits, fingerprints
    try:
        with zipfile.ZipFile(data) as archive:
            by_name = {Path(info.filename).name: info for info in archive.infolist() if not info.is_dir()}
    except zipfile.BadZipFile:
        raise DataFormatError(data, "not a zip archive (expected the Kaggle folder or digit-recognizer.zip)") from None
    for name in _FILES.values():
        if name not in by_name:
            raise DataFormatError(data, f"the archive has no {name} (found: {', '.join(sorted(by_name)) or 'nothing'})")
    fingerprints[str(data)] = sha256_file(data)
    return {split: _stream_member(data, by_name[name].filename, split, options) for split, name in _FILES.items()}, \
        fingerprints


def layout(data: Path) -> list[Path]:
    """The files read from data (the folder's train.csv and test.csv, or the zip), checked to be there and to be
    regular files without reading them: a wrong --data is one line in milliseconds."""
    if data.is_dir():
        files = [data / name for name in _FILES.values()]
        for path in files:
            check_regular_file(path, f"missing: a Kaggle folder holds {' and '.join(_FILES.values())}")
        return files
    check_regular_file(data, "no such file or folder (expected the Kaggle folder or digit-recognizer.zip)")
    if not zipfile.is_zipfile(data):
        raise DataFormatError(data, "not a zip archive (expected the Kaggle folder or digit-recognizer.zip)")
    return [data]


def _stream_member(data: Path, member: str, split: Split, options: ReadOptions) -> Iterator[SplitData]:
    name = f"{data}:{member}"
    try:
        with zipfile.ZipFile(data) as archive, archive.open(member) as fh:
            yield from _read_split(name, fh, split, limit=options.limit, strict=options.strict,
                                   dask_address=options.dask_address)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a damaged member (a bad CRC) found while reading
        raise DataFormatError(data, f"cannot read {Path(member).name} from the archive: {exc}") from None


def _read_split(path: str, stream: BinaryIO, split: Split, *, limit: int | None, strict: bool,
                dask_address: str | None = None) -> Iterator[SplitData]:
    expected = KAGGLE_TRAIN_HEADER if split is Split.train else KAGGLE_TEST_HEADER
    rules = [ValueRule(slice(1 if split is Split.train else 0, None), "pixel", 0, PIXEL_MAX, True)]
    if split is Split.train:
        rules.insert(0, ValueRule(slice(0, 1), "label", 0, 9, True))
    first_line: list[int] = []

    def headed() -> Iterator[TextBody]:
        for text in text_blocks(path, stream, header="required", limit=limit):
            if not first_line:
                _check_header(path, text.header, expected, split)
                first_line.append(text.first_line)
            yield text

    def parsed() -> Iterator[tuple[NumericRows, list[ValueRule]]]:  # here, or on the workers of dask.address
        for rows in ordered_map(functools.partial(parse_numeric, delimiter=",", n_fields=len(expected)), headed(),
                                dask_address):
            yield rows, rules

    for values, lines, rejects, n_read in checked_blocks(path, parsed(), strict=strict):
        pixels = values[:, -N_PIXELS:].astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        labels = values[:, 0].astype(np.int8) if split is Split.train else None
        yield SplitData(ids=lines - first_line[0] + 1, labels=labels, pixels=pixels, rows_read=n_read, rejects=rejects)


def _check_header(path: str, header: str | None, expected: tuple[str, ...], split: Split) -> None:
    names = [name.strip().strip('"') for name in (header or "").split(",")]
    if names == list(expected):
        return
    separator = other_separator(header or "")
    if len(names) == 1 and separator:
        raise DataFormatError(path, f"columns separated by {separator!r}, where a Kaggle CSV separates them by ',' "
                                    f"(header: {shorten(header or '')}); save it as comma-separated", line=1, column=1)
    if split is Split.test and names and names[0] == "label":
        raise DataFormatError(path, "the test file carries a 'label' column; Kaggle's test.csv has none "
                                    "(expected header pixel0..pixel783)", line=1, column=1)
    seen: dict[str, int] = {}
    for j, name in enumerate(names):
        if name in seen:
            raise DataFormatError(path, f"duplicated header column '{name}' (also column {seen[name] + 1})",
                                  line=1, column=j + 1)
        seen[name] = j
    for j, (got, want) in enumerate(zip(names, expected)):
        if got != want:
            raise DataFormatError(path, f"wrong header: expected '{want}', found '{shorten(got)}' "
                                        f"(header must be {expected[0]},...,{expected[-1]})", line=1, column=j + 1)
    raise DataFormatError(path, f"wrong header: expected {len(expected)} columns "
                                f"({expected[0]},...,{expected[-1]}), found {len(names)}",
                          line=1, column=min(len(names), len(expected)) + 1)
