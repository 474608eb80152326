"""The noisy set (MNIST background-random layout): 784 floats in [0, 1] then the label, LAST column.

Two layouts: `mnist_background_random_{train,test}.amat` (whitespace-separated, label as a float,
labels in both files) or `train.csv`/`test.csv` (comma-separated, header optional, test labels
optional). Images are stored transposed (column-major); ingest turns them upright.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from components.files import check_regular_file
from components.ingest.splits import ReadOptions, SplitData, checked_blocks
from components.ingest.text import NumericRows, TextBody, ValueRule, hashed_pieces, parse_numeric, text_blocks
from components.parallel import ordered_map
from schemas.dataset import IMAGE_SIDE, N_PIXELS, PIXEL_MAX, Split
from schemas.errors import DataFormatError

AMAT = {Split.train: "mnist_background_random_train.amat", Split.test: "mnist_background_random_test.amat"}
CSV = {Split.train: "train.csv", Split.test: "test.csv"}
_LABEL_NAMES = {"label", "labels", "y", "target", "class", "digit"}


def layout(data: Path) -> list[Path]:
    """The two files read from data (the .amat pair, else the CSV pair), checked to be there as regular files."""
    files, _ = _pair(data)
    return [data / name for name in files.values()]


def _pair(data: Path) -> tuple[dict[Split, str], str]:
    """(file name per split, delimiter) of the pair data holds."""
    if not data.is_dir():
        raise DataFormatError(data, "not a folder (expected one holding "
                                    f"{' and '.join(AMAT.values())}, or {' and '.join(CSV.values())})")
    for files, delimiter in ((AMAT, " "), (CSV, ",")):
        if all((data / name).exists() for name in files.values()):
            for name in files.values():
                check_regular_file(data / name)
            return files, delimiter
    raise DataFormatError(data, f"missing files: expected {' and '.join(AMAT.values())}, "
                                f"or {' and '.join(CSV.values())}")


def read(data: Path, options: ReadOptions) -> tuple[dict[Split, Iterator[SplitData]], dict[str, str]]:
    """Both splits from a folder holding the .amat pair or the CSV pair, each streamed in blocks of rows (memory
    holds one block whatever the file's size); the sha256 per file is filled as the files are read."""
    files, delimiter = _pair(data)
    prints: dict[str, str] = {}
    return {split: hashed_pieces(data / name, prints, functools.partial(
        _read_split, split=split, delimiter=delimiter, limit=options.limit, strict=options.strict,
        dask_address=options.dask_address))
        for split, name in files.items()}, prints


def _read_split(path: str, stream: BinaryIO, split: Split, delimiter: str, *, limit: int | None,
                strict: bool, dask_address: str | None = None) -> Iterator[SplitData]:
    """One split's pieces: the label (last column) checked, pixels scaled to 0..255 and turned upright."""
    first: dict = {}

    def parsed() -> Iterator[tuple[NumericRows, list[ValueRule]]]:
        blocks = text_blocks(path, stream, header="auto" if delimiter == "," else "none", limit=limit)
        for text in blocks:  # the first block, here: the file's layout, from its header or first row
            n_fields = _field_count(text, delimiter, split)
            rules = [ValueRule(slice(0, N_PIXELS), "pixel", 0.0, 1.0, False)]
            if n_fields == N_PIXELS + 1:
                rules.insert(0, ValueRule(slice(N_PIXELS, N_PIXELS + 1), "label", 0, 9, True))
            first.update(n_fields=n_fields, rules=rules, line=text.first_line)
            rows = parse_numeric(text, delimiter=delimiter, n_fields=n_fields)
            if n_fields == N_PIXELS + 1:
                _refuse_label_first(path, rows.values, text.first_line)
            yield rows, rules
            break
        if first:  # the rest: here, or on the workers of dask.address
            for rows in ordered_map(functools.partial(parse_numeric, delimiter=delimiter, n_fields=first["n_fields"]),
                                    blocks, dask_address):
                yield rows, first["rules"]

    for values, lines, rejects, n_read in checked_blocks(path, parsed(), strict=strict):
        labels = values[:, N_PIXELS].astype(np.int8) if first["n_fields"] == N_PIXELS + 1 else None
        scaled = values[:, :N_PIXELS]
        scaled *= PIXEL_MAX  # in place: these float rows are ours
        np.rint(scaled, out=scaled)
        # Stored column-major: reshape gives the transpose, so swap the axes back to upright.
        pixels = scaled.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 1).copy()
        yield SplitData(ids=lines - first["line"] + 1, labels=labels, pixels=pixels, rows_read=n_read, rejects=rejects)


def _field_count(text: TextBody, delimiter: str, split: Split) -> int:
    """785 (labelled) or 784 (unlabelled test), from the header or the first data row."""
    if text.header is not None:
        names = [n.strip().strip('"').lower() for n in text.header.split(",")]
        label_at = [j for j, n in enumerate(names) if n in _LABEL_NAMES]
        if label_at and label_at[0] != len(names) - 1:
            raise DataFormatError(text.path, f"the label column '{names[label_at[0]]}' is column "
                                             f"{label_at[0] + 1}; noisy files carry the label in the LAST column",
                                  line=1, column=label_at[0] + 1)
        count, line = len(names), 1
    else:
        first = bytes(text.data[: 1 << 16]).split(b"\n", 1)[0].strip()
        count = len(first.split() if delimiter == " " else first.split(delimiter.encode()))
        line = text.first_line
    allowed = (N_PIXELS + 1,) if split is Split.train else (N_PIXELS + 1, N_PIXELS)
    if count not in allowed:
        expected = " or ".join(f"{n} ({'784 pixels + label' if n > N_PIXELS else '784 pixels'})" for n in allowed)
        raise DataFormatError(text.path, f"expected {expected} fields per row, found {count}", line=line,
                              column=min(count, max(allowed)) + 1)
    return count


def _refuse_label_first(path: str, values: np.ndarray, first_line: int) -> None:
    """A file whose first column holds the digits 0..9 and whose last does not: the label is misplaced."""
    if not len(values):
        return
    first, last = values[:, 0], values[:, -1]
    first_is_label = np.all((first >= 0) & (first <= 9) & (first == np.rint(first))) and np.any(first > 1)
    last_is_label = np.all(last == np.rint(last))
    if first_is_label and not last_is_label:
        raise DataFormatError(path, "the label is in the first column (integers 0..9 there, fractions in the "
                                    "last); noisy files carry the label in the LAST column",
                              line=first_line, column=1)
