"""Strict, vectorised reading of delimited numeric text (Kaggle CSV, noisy .amat / CSV).

The fast path hands the whole buffer to pyarrow's multi-threaded CSV reader. pyarrow's errors name
no row, so when it refuses a file the buffer is re-read in blocks and only the refused blocks are
examined line by line, to name each bad row's line and column. Good files never pay for that.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from schemas.errors import DataFormatError

T = TypeVar("T")
_BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\r\n"
_DIAGNOSE_BLOCK = 2048
# What a numeric field may look like (pyarrow's float parser accepts the same, NaN/inf included).
_NUMBER = re.compile(rb'\s*"?[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)"?\s*', re.I)
_WHITESPACE_RUN = re.compile(rb"[ \t]+")
_EDGE_SPACE = re.compile(rb"^ | $", re.M)
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class Reject:
    """One row set aside: where it is and why."""

    path: str
    line: int | None  # None: a whole file (one file per image)
    column: int | None
    reason: str

    def error(self) -> DataFormatError:
        return DataFormatError(self.path, self.reason, line=self.line, column=self.column)


@dataclass
class NumericRows:
    """Rows that parsed as numbers: values (n, n_fields) float32 and each row's 1-based line number."""

    values: np.ndarray
    lines: np.ndarray
    rejects: list[Reject] = field(default_factory=list)


@dataclass(frozen=True)
class TextBody:
    """A text file's data rows: raw[start:end], after its BOM, header and trailing blank lines."""

    path: str
    header: str | None
    raw: bytes
    start: int
    end: int
    first_line: int  # line number of the first data row

    @property
    def data(self) -> memoryview:
        return memoryview(self.raw)[self.start:self.end]

    def take(self, limit: int | None) -> TextBody:
        """The same file cut after its first `limit` data rows (all of them when limit is None)."""
        pos = self.start
        for _ in range(limit or 0):
            pos = self.raw.find(b"\n", pos, self.end)
            if pos < 0:
                return self
            pos += 1
        return self if limit is None or pos == self.start else replace(self, end=pos - 1)

    def single_spaced(self) -> TextBody:
        """Whitespace-separated rows rewritten single-space separated, no edge spaces (for pyarrow)."""
        data = self.raw[self.start:self.end].replace(b"\r\n", b"\n")
        data = _EDGE_SPACE.sub(b"", _WHITESPACE_RUN.sub(b" ", data))
        return replace(self, raw=data, start=0, end=len(data))


def split_text(path: str, raw: bytes, *, header: str) -> TextBody:
    """Check raw is text and separate its header. header: 'required', 'none' or 'auto'.

    'auto' treats the first line as a header when it holds anything but numbers.
    Raises DataFormatError for an empty, binary or header-only file.
    """
    start = len(_BOM) if raw.startswith(_BOM) else 0
    end = len(raw)
    while end > start and raw[end - 1] in _BLANK:
        end -= 1
    if end == start:
        raise DataFormatError(path, "file is empty (expected a header and data rows)" if header == "required"
                              else "file is empty (expected data rows)", line=1, column=1)
    newline = raw.find(b"\n", start, end)
    if newline < 0 and b"\r" in raw[start:end]:  # the first line holds the whole file: its lines end in CR alone
        raise DataFormatError(path, "lines end in a bare CR (classic Mac OS line endings) where LF or CRLF was "
                                    "expected; save the file with LF or CRLF line endings", line=1, column=1)
    _refuse_binary(path, raw, start, end if newline < 0 else newline)
    first = raw[start:end if newline < 0 else newline].rstrip(b"\r")
    has_header = header == "required" or (
        header == "auto" and any(not _NUMBER.fullmatch(tok) for tok in re.split(rb"[,\s]+", first.strip()) if tok))
    if not has_header:
        return TextBody(path, None, raw, start, end, 1)
    text = first.decode("ascii", errors="replace")
    if newline < 0:
        raise DataFormatError(path, f"header only, no data rows (header: {shorten(text)})", line=2, column=1)
    return TextBody(path, text, raw, newline + 1, end, 2)


BLOCK_BYTES = 32 << 20  # text read at a time by text_blocks: ~18,000 Kaggle rows, ~110 MB of float32 once parsed


def text_blocks(path: str, stream: BinaryIO, *, header: str, limit: int | None = None) -> Iterator[TextBody]:
    """A text file read block by block as TextBody pieces of whole lines, in file order, so that memory holds one
    block whatever the file's size. Together they are what split_text(...).take(limit) gives for the whole file:
    the first carries the header and split_text's checks (BOM, empty or header-only file, bare CR, binary first
    line), each its own first_line (so line numbers in errors are the file's), and blank lines at the end of the
    file are dropped while blank lines between rows stay rows (which the parser rejects)."""
    size = BLOCK_BYTES
    carry, line, first = b"", 1, True
    remaining = limit
    while True:
        data = _read_full(stream, size)
        eof = len(data) < size
        buf = carry + data if carry else data
        if eof:
            body, carry = buf, b""
        else:
            cut = _after_last_filled_line(buf)
            # the first block holds at least one line after the header (else a header-only verdict comes too soon)
            if cut is None or (first and buf.count(b"\n", 0, cut) < 2):
                carry = buf
                continue
            body, carry = buf[:cut], buf[cut:]
        if first:
            text = split_text(path, body, header=header)  # the whole file when eof: every check exactly as before
            if not eof:  # mid-file, the last row keeps its own trailing blanks (split_text strips a file's end)
                text = replace(text, end=len(body) - 1)
        else:
            end = len(body.rstrip(_BLANK)) if eof else len(body) - 1  # a row's own trailing blanks stay mid-file
            if end == 0:
                return
            text = TextBody(path, None, body, 0, end, line)
        if remaining is not None:
            rows = text.raw.count(b"\n", text.start, text.end) + 1
            text = text.take(remaining)
            remaining -= rows
        yield text
        if eof or (remaining is not None and remaining <= 0):
            return
        line += body.count(b"\n")
        first = False


def hashed_pieces(path: Path, fingerprints: dict[str, str], read: Callable[[str, BinaryIO], Iterator[T]]) -> Iterator[T]:
    """What read(path, stream) yields for the file at path, its sha256 put in fingerprints[str(path)] once read to
    its end (the whole file's, also when a limit stopped reading early): a file fingerprinted as it is parsed."""
    with path.open("rb") as fh:
        hashing = HashingReader(fh)
        yield from read(str(path), hashing)
        fingerprints[str(path)] = hashing.finish()


class HashingReader:
    """A binary stream that hashes (sha256) what is read through it: a file fingerprinted as it is parsed."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        """The sha256 of the whole stream: what was not read yet (after a limit) is read and hashed now."""
        while self.read(1 << 22):
            pass
        return self.digest.hexdigest()


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """size bytes, or fewer only at the end of the stream (a zip member's read may return less before it)."""
    data = stream.read(size)
    while 0 < len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _after_last_filled_line(buf: bytes) -> int | None:
    """The offset just after the newline that ends buf's last whole line holding anything but blanks. What follows
    (a partial line, blank lines) is carried to the next block: blank lines at the very end of a file are dropped
    there, not read as rows. None when buf has no such line yet."""
    last = buf.rfind(b"\n")
    filled = len(buf[:last + 1].rstrip(_BLANK)) if last >= 0 else 0
    return None if filled == 0 else buf.index(b"\n", filled) + 1


def _refuse_binary(path: str, raw: bytes, start: int, stop: int) -> None:
    """Refuse a file whose first line is not text: it is no delimited text file at all.

    Binary bytes in a later row make that row bad (see _describe_bad_field), not the whole file.
    """
    head = raw[start:stop]
    if head.isascii() and not _CONTROL.search(head.replace(b"\r", b"")):
        return
    pos = next(i for i, b in enumerate(head) if b > 126 or (b < 32 and b not in b"\t\r"))
    column = len(re.split(rb"[,\s]+", head[:pos].lstrip())) if pos else 1
    raise DataFormatError(path, f"binary data (byte 0x{head[pos]:02x}) where text was expected: "
                                "this is not a delimited text file", line=1, column=column)


def parse_numeric(text: TextBody, *, delimiter: str, n_fields: int) -> NumericRows:
    """Parse every data row of text as n_fields numbers. delimiter " " means any run of whitespace.

    Rows with the wrong number of fields, or a field that is not a number, become Rejects naming
    line and column; the rest are returned. Never raises on row content.
    """
    rows = _read_all(text, delimiter, n_fields)
    if rows is None and delimiter == " ":  # irregular whitespace (runs, tabs, edge spaces) costs only when present
        text = text.single_spaced()
        rows = _read_all(text, delimiter, n_fields)
    if rows is not None:
        return rows
    return _diagnose(text.path, text.raw[text.start:text.end], delimiter, n_fields, text.first_line)


def _read_all(text: TextBody, delimiter: str, n_fields: int) -> NumericRows | None:
    """Every row through pyarrow in one go, or None when pyarrow refuses the text."""
    try:
        values = _read(text.data, delimiter, n_fields)
    except pa.ArrowInvalid:
        return None
    return NumericRows(values, np.arange(text.first_line, text.first_line + len(values), dtype=np.int64))


def _read(data: bytes | memoryview, delimiter: str, n_fields: int) -> np.ndarray:
    names = [f"c{i}" for i in range(n_fields)]
    table = pacsv.read_csv(
        pa.BufferReader(data),
        read_options=pacsv.ReadOptions(column_names=names, block_size=4 << 20),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.float32() for n in names}, null_values=[],
                                             strings_can_be_null=False, quoted_strings_can_be_null=False),
    )
    # Column by column into a column-major buffer (contiguous writes), returned as its (n, fields) view.
    out = np.empty((n_fields, table.num_rows), dtype=np.float32)
    for j, column in enumerate(table.columns):
        offset = 0
        for chunk in column.chunks:
            out[j, offset:offset + len(chunk)] = chunk.to_numpy()
            offset += len(chunk)
    return out.T


def _diagnose(path: str, data: bytes, delimiter: str, n_fields: int, first_line: int) -> NumericRows:
    lines = data.split(b"\n")
    sep = delimiter.encode()
    blocks, line_numbers, rejects = [], [], []
    for block_start in range(0, len(lines), _DIAGNOSE_BLOCK):
        block = lines[block_start:block_start + _DIAGNOSE_BLOCK]
        number0 = first_line + block_start
        try:
            blocks.append(_read(b"\n".join(block), delimiter, n_fields))
            line_numbers.append(np.arange(number0, number0 + len(block)))
            continue
        except pa.ArrowInvalid:
            pass
        good, good_numbers = [], []
        for offset, line in enumerate(block):
            reject = _check_line(path, line.rstrip(b"\r"), sep, n_fields, number0 + offset)
            if reject:
                rejects.append(reject)
            else:
                good.append(line)
                good_numbers.append(number0 + offset)
        if good:
            try:
                blocks.append(_read(b"\n".join(good), delimiter, n_fields))
                line_numbers.append(np.asarray(good_numbers))
            except pa.ArrowInvalid:  # our field check and pyarrow disagree on a row: ask row by row
                for line, number in zip(good, good_numbers):
                    try:
                        blocks.append(_read(line, delimiter, n_fields))
                        line_numbers.append(np.asarray([number]))
                    except pa.ArrowInvalid as exc:
                        rejects.append(Reject(path, number, None, f"unreadable row ({exc})"))
    values = np.concatenate(blocks) if blocks else np.empty((0, n_fields), np.float32)
    numbers = np.concatenate(line_numbers).astype(np.int64) if line_numbers else np.empty(0, np.int64)
    return NumericRows(values, numbers, sorted(rejects, key=lambda r: r.line))


def _check_line(path: str, line: bytes, sep: bytes, n_fields: int, number: int) -> Reject | None:
    if not line.strip():
        return Reject(path, number, 1, f"blank line where a row of {n_fields} fields was expected")
    fields = line.split(sep)
    if len(fields) < n_fields:
        return Reject(path, number, len(fields) + 1, f"too few fields: expected {n_fields}, found {len(fields)}")
    if len(fields) > n_fields:
        return Reject(path, number, n_fields + 1, f"too many fields: expected {n_fields}, found {len(fields)}")
    for j, value in enumerate(fields):
        if not _NUMBER.fullmatch(value):
            return Reject(path, number, j + 1, _describe_bad_field(value))
    return None


def _describe_bad_field(value: bytes) -> str:
    if not value.strip():
        return "empty value where a number was expected"
    if not value.isascii() or _CONTROL.search(value):
        bad = next(b for b in value if b > 126 or b < 32)
        return f"binary data (byte 0x{bad:02x}) where a number was expected"
    return f"expected a number, got {shorten(value.decode('ascii'))!r}"


def shorten(text: str, limit: int = 40) -> str:
    """text cut to limit characters (an error line quotes a header or field, never a whole 7,000-character row)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def other_separator(line: str) -> str | None:
    """The separator a line of a comma-separated file uses instead of ',' (';', a tab or '|'), when it has none."""
    if "," in line:
        return None
    counts = {sep: line.count(sep) for sep in (";", "\t", "|")}
    found = max(counts, key=counts.get)
    return found if counts[found] else None


@dataclass(frozen=True)
class ValueRule:
    """What the values of some columns must be: within [low, high], optionally integers, never NaN."""

    columns: slice
    what: str  # "pixel" or "label": used in messages
    low: float
    high: float
    integer: bool


def check_values(path: str, rows: NumericRows, rules: list[ValueRule]) -> tuple[np.ndarray, list[Reject]]:
    """Vectorised range/integer/NaN checks. Returns (mask of good rows, rejects for the others)."""
    n = len(rows.values)
    first_bad = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    which = np.full(n, -1, dtype=np.int64)
    for k, rule in enumerate(rules):
        block = rows.values[:, rule.columns]
        if block.ndim == 1:
            block = block[:, None]
        bad = ~((block >= rule.low) & (block <= rule.high))  # NaN compares False: bad
        if rule.integer:
            bad |= block != np.rint(block)
        any_bad = bad.any(axis=1)
        col = np.where(any_bad, bad.argmax(axis=1) + rule.columns.indices(rows.values.shape[1])[0], first_bad)
        better = col < first_bad
        first_bad[better], which[better] = col[better], k
    bad_rows = np.flatnonzero(which >= 0)
    rejects = [Reject(path, int(rows.lines[i]), int(first_bad[i]) + 1,
                      _describe_value(float(rows.values[i, first_bad[i]]), rules[which[i]])) for i in bad_rows]
    good = np.ones(n, dtype=bool)
    good[bad_rows] = False
    return good, rejects


def _describe_value(value: float, rule: ValueRule) -> str:
    expected = f"{'an integer ' if rule.integer else ''}{rule.what} in {_num(rule.low)}..{_num(rule.high)}"
    if np.isnan(value):
        return f"NaN where {expected} was expected"
    if rule.low <= value <= rule.high:
        return f"{rule.what} {_num(value)} is not an integer; expected {expected}"
    return f"{rule.what} {_num(value)} out of range; expected {expected}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
