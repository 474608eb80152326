"""Kaggle "Digit Recognizer": train.csv (label,pixel0..pixel783) and test.csv (pixel0..pixel783).

Read from a folder or from the competition zip in place. Test ids are Kaggle's ImageId: 1..N in
file order; train ids are 1..N in file order too.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from components.files import check_regular_file
from components.ingest.splits import ReadOptions, SplitData, keep_good_rows
from components.ingest.text import ValueRule, other_separator, parse_numeric, shorten, split_text
from schemas.dataset import (IMAGE_SIDE, KAGGLE_TEST_HEADER, KAGGLE_TRAIN_HEADER, N_PIXELS, PIXEL_MAX,
                             Split)
from schemas.errors import DataFormatError

_FILES = {Split.train: "train.csv", Split.test: "test.csv"}


def read(data: Path, options: ReadOptions) -> tuple[dict[Split, SplitData], dict[str, str]]:
    """Read both splits from a folder or a zip. Returns (splits, sha256 fingerprint per input file)."""
    raw, fingerprints = _load_bytes(data)
    splits = {split: _read_split(name, content, split, limit=options.limit, strict=options.strict)
              for split, (name, content) in raw.items()}
    return splits, fingerprints


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


def _load_bytes(data: Path) -> tuple[dict[Split, tuple[str, bytes]], dict[str, str]]:
    layout(data)
    if data.is_dir():
        out, prints = {}, {}
        for split, name in _FILES.items():
            path = data / name
            content = path.read_bytes()
            out[split] = (str(path), content)
            prints[str(path)] = hashlib.sha256(content).hexdigest()
        return out, prints
    content = data.read_bytes()
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile:
        raise DataFormatError(data, "not a zip archive (expected the Kaggle folder or digit-recognizer.zip)") from None
    by_name = {Path(info.filename).name: info for info in archive.infolist() if not info.is_dir()}
    out = {}
    for split, name in _FILES.items():
        if name not in by_name:
            raise DataFormatError(data, f"the archive has no {name} (found: {', '.join(sorted(by_name)) or 'nothing'})")
        try:
            out[split] = (f"{data}:{by_name[name].filename}", archive.read(by_name[name]))
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataFormatError(data, f"cannot read {name} from the archive: {exc}") from None
    return out, {str(data): hashlib.sha256(content).hexdigest()}


def _read_split(path: str, raw: bytes, split: Split, *, limit: int | None, strict: bool) -> SplitData:
    text = split_text(path, raw, header="required").take(limit)
    expected = KAGGLE_TRAIN_HEADER if split is Split.train else KAGGLE_TEST_HEADER
    _check_header(path, text.header, expected, split)
    rows = parse_numeric(text, delimiter=",", n_fields=len(expected))
    rules = [ValueRule(slice(1 if split is Split.train else 0, None), "pixel", 0, PIXEL_MAX, True)]
    if split is Split.train:
        rules.insert(0, ValueRule(slice(0, 1), "label", 0, 9, True))
    n_read = len(rows.values) + len(rows.rejects)
    values, lines = keep_good_rows(path, rows, rules, strict=strict)
    pixels = values[:, -N_PIXELS:].astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    labels = values[:, 0].astype(np.int8) if split is Split.train else None
    return SplitData(ids=lines - text.first_line + 1, labels=labels, pixels=pixels, rows_read=n_read,
                     rejects=rows.rejects)


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
