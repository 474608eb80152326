"""A label-review file applied on ingest (`--set ingest.review=PATH`): the fixes a person decided on, fed back.

The file is CSV with the header `id,decision` — what the review stage writes as review-decisions.csv, edited:
each row names a train row by its id (the canonical `id`: 1-based row number of the source's train split) and
says a digit 0-9 (relabel it) or `drop` (leave it out). A row deleted from the file keeps its label. Ingest applies
it to the train split before anything is written, so validation, the split, training and the data fingerprint all
see the fixed labels; the canonical dataset records what was changed (Examples.REVIEW_APPLIED, review-applied.csv:
id, given label, decision) and the file's sha256.

Refused in one line (file, line, column): a header other than `id,decision`, an id that is not a whole number or
not a train row, a decision that is not a digit or `drop`, an id named twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas.dataset import N_CLASSES
from schemas.errors import DataFormatError, DigitsInputError

HEADER = ("id", "decision")
DROP = "drop"


@dataclass(frozen=True)
class Decisions:
    path: Path
    sha256: str
    relabel: dict[int, int]  # id -> the new label
    drop: frozenset[int]
    lines: dict[int, int]  # id -> its line in the file, for errors found later (an id the data does not have)


def read(path: Path) -> Decisions:
    """Parse and check a review file (everything that can be checked without the data)."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise DigitsInputError(f"ingest.review={path}: a folder; expected a CSV file `id,decision`") from None
    except FileNotFoundError:
        raise DigitsInputError(f"ingest.review={path}: no such file") from None
    except OSError as exc:
        raise DigitsInputError(f"ingest.review={path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"not UTF-8 text (byte {exc.start})") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header is None or tuple(h.strip().lower() for h in header) != HEADER:
        raise DataFormatError(path, f"expected the header `id,decision`; got `{','.join(header or [])}`", line=1)
    relabel: dict[int, int] = {}
    drop: set[int] = set()
    lines: dict[int, int] = {}
    for number, row in enumerate(rows, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue  # a blank line
        if len(row) != 2:
            raise DataFormatError(path, f"expected 2 fields (id,decision); got {len(row)}", line=number)
        text_id, decision = row[0].strip(), row[1].strip().lower()
        if not text_id.isdigit() or int(text_id) < 1:
            raise DataFormatError(path, f"id `{row[0]}` is not a row id (a whole number from 1)", line=number, column=1)
        row_id = int(text_id)
        if row_id in lines:
            raise DataFormatError(path, f"id {row_id} is named twice (first on line {lines[row_id]})", line=number,
                                  column=1)
        if decision == DROP:
            drop.add(row_id)
        elif decision.isdigit() and int(decision) < N_CLASSES:
            relabel[row_id] = int(decision)
        else:
            raise DataFormatError(path, f"decision `{row[1]}` is neither a digit 0-9 nor `drop`", line=number, column=2)
        lines[row_id] = number
    return Decisions(path, hashlib.sha256(raw).hexdigest(), relabel, frozenset(drop), lines)


class Applying:
    """The decisions applied to a train split that streams past piece by piece (`apply` each piece in order,
    then `finish`): what apply() does for a whole split, with the same summary, changes and errors."""

    def __init__(self, decisions: Decisions) -> None:
        self.decisions = decisions
        self.found: dict[int, int] = {}  # id -> its given label, for the ids the decisions name
        self.rows = 0

    def apply(self, piece):
        """The piece with its named rows relabelled and dropped (a SplitData: ids, labels, pixels, files)."""
        import dataclasses

        self.rows += len(piece.ids)
        named = np.isin(piece.ids, np.fromiter(self.decisions.lines, np.int64, len(self.decisions.lines)))
        if not named.any():
            return piece
        labels = piece.labels.copy()
        keep = np.ones(len(piece.ids), bool)
        for at in np.flatnonzero(named):
            row_id = int(piece.ids[at])
            self.found[row_id] = int(labels[at])
            if row_id in self.decisions.drop:
                keep[at] = False
            else:
                labels[at] = self.decisions.relabel[row_id]
        files = None if piece.files is None else [f for f, k in zip(piece.files, keep) if k]
        return dataclasses.replace(piece, ids=piece.ids[keep], labels=labels[keep], pixels=piece.pixels[keep],
                                   files=files)

    def finish(self) -> tuple[dict, list]:
        """(summary, the changes as (id, given label, decision) rows); an id the split did not have is one line."""
        decisions = self.decisions
        missing = [i for i in decisions.lines if i not in self.found]
        if missing:
            first = min(missing, key=lambda i: decisions.lines[i])
            raise DataFormatError(decisions.path, f"id {first} is not a row of this train split (ids 1..{self.rows}"
                                  f"{'' if len(missing) == 1 else f'; {len(missing)} such ids'})",
                                  line=decisions.lines[first], column=1)
        changes = [(row_id, self.found[row_id], str(label)) for row_id, label in sorted(decisions.relabel.items())]
        changes += [(row_id, self.found[row_id], DROP) for row_id in sorted(decisions.drop)]
        relabelled = sum(self.found[row_id] != label for row_id, label in decisions.relabel.items())
        summary = {"file": str(decisions.path), "sha256": decisions.sha256, "relabelled": relabelled,
                   "unchanged": len(decisions.relabel) - relabelled, "dropped": len(decisions.drop)}
        return summary, changes
