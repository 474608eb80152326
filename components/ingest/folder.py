"""A folder of a person's own digit images, in the layout Keras' `image_dataset_from_directory` reads:

    DATA/train/<digit>/*.png|jpg|jpeg     labelled: the class folder's name (0..9) is the label
    DATA/test/*.png|jpg|jpeg              optional, unlabelled (what a submission is made for)

Every image is prepared exactly as `digits predict` prepares one (components.predict: grayscale, ink
polarity, crop, fit 20x20, centre of mass in 28x28), so training sees what prediction will see. Ids
are 1..N in file order by relative path; which file each row came from goes to ingest/files.csv and
the submission. Hidden files (`.DS_Store`, `._x.png`) are skipped, and so are files of other suffixes
(`Thumbs.db`, `notes.txt`), counted as Keras' loader counts them; anything that is not a regular file (a FIFO,
a device) or whose name is not valid UTF-8 is refused in one line.

A split streams: its files are listed first (names only), then read PIECE_FILES at a time, each file's bytes read
once for both its image and the split's fingerprint, so memory holds one piece of images whatever the folder's size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from components.ingest.splits import ReadOptions, SplitData
from components.files import check_regular_file
from components.predict import SUFFIXES
from components.ingest.text import Reject
from schemas.dataset import IMAGE_SIDE, Split
from schemas.errors import DataFormatError, DigitsInputError

LAYOUT = "train/<digit>/*.png|jpg|jpeg (+ optional test/*.png|jpg|jpeg)"
PIECE_FILES = 10_000  # images prepared and handed on at a time (~8 MB of 28x28 pixels)


def layout(data: Path) -> list[Path]:
    """The image files read from data (train/<digit>/ then test/), listed and checked without reading them."""
    listed, _ = _listing(data)
    return [path for files in listed.values() for path, _ in files]


def _listing(data: Path) -> tuple[dict[Split, list[tuple[Path, int | None]]], dict[Split, list[Path]]]:
    """((file, label or None) per split, the non-image files left out per split)."""
    if not data.is_dir():
        raise DataFormatError(data, f"not a folder (expected {LAYOUT})")
    train_dir = data / "train"
    if not train_dir.is_dir():
        raise DataFormatError(train_dir, f"missing: a folder of images holds {LAYOUT}")
    skipped: dict[Split, list[Path]] = {Split.train: [], Split.test: []}
    listed: dict[Split, list[tuple[Path, int | None]]] = {Split.train: _labelled_files(train_dir, skipped[Split.train])}
    if (data / "test").is_dir():
        test = _images_in(data / "test", skipped[Split.test])
        if not test:
            raise DataFormatError(data / "test", "empty: an optional test/ folder holds .png, .jpg or .jpeg images")
        listed[Split.test] = [(path, None) for path in test]
    return listed, skipped


def read(data: Path, options: ReadOptions) -> tuple[dict[Split, Iterator[SplitData]], dict[str, str]]:
    """Both splits (test only when DATA/test exists), each streamed in pieces of up to PIECE_FILES images; the
    layout is checked (every file listed) before any image is read. Returns (splits, sha256 of each split's files:
    filled once the split has been read to its end)."""
    listed, skipped = _listing(data)
    splits, prints = {}, {}
    for split, files in listed.items():
        if options.limit:
            files = _first(files, options.limit)
        left_out = [path.relative_to(data).as_posix() for path in skipped[split]]
        splits[split] = _read_split(data, split, files, left_out, prints, strict=options.strict,
                                    max_pixels=options.max_image_pixels)
    return splits, prints


def _first(files: list[tuple[Path, int | None]], n: int) -> list[tuple[Path, int | None]]:
    """The first n files taken class by class in turn (the first of each class, then the second, ...), so
    a limited run still sees every class; returned in file order."""
    rank: dict[int | None, int] = {}
    order = []
    for index, (_, label) in enumerate(files):
        order.append((rank.get(label, 0), index))
        rank[label] = rank.get(label, 0) + 1
    return [files[index] for index in sorted(index for _, index in sorted(order)[:n])]


def _labelled_files(train_dir: Path, skipped: list[Path]) -> list[tuple[Path, int]]:
    """(file, label) of every image under train/<digit>/, by class then name. Refuses a class folder that
    is not a digit, an empty one, and image files outside class folders (others are added to skipped)."""
    found: list[tuple[Path, int]] = []
    for entry in sorted(_visible(train_dir)):
        if not entry.is_dir() and entry.suffix.lower() not in SUFFIXES:
            skipped.append(entry)
            continue
        if not entry.is_dir():
            raise DataFormatError(entry, f"a file outside a class folder: train/ holds one folder per digit "
                                         f"({LAYOUT})")
        if entry.name not in {str(d) for d in range(10)}:
            raise DataFormatError(entry, "not a class folder: train/ holds folders named 0 to 9, one per digit")
        images = _images_in(entry, skipped)
        if not images:
            raise DataFormatError(entry, "empty class folder: no .png, .jpg or .jpeg images")
        found += [(path, int(entry.name)) for path in images]
    if not found:
        raise DataFormatError(train_dir, f"no class folders (expected {LAYOUT})")
    return found


def _images_in(folder: Path, skipped: list[Path]) -> list[Path]:
    """The image files of a folder (by suffix: .png, .jpg, .jpeg), by name; other files are added to skipped.
    A sub-folder, or an image name that is not a regular file (a FIFO would block the read), is refused; a
    file with an image suffix that is not a PNG or JPEG is kept (reading it fails, naming it: strict mode
    stops there, quarantine sets it aside)."""
    files = []
    for entry in sorted(_visible(folder)):
        if entry.is_dir():
            raise DataFormatError(entry, f"unexpected folder: images go directly in {folder.name}/")
        if entry.suffix.lower() not in SUFFIXES:
            skipped.append(entry)
            continue
        try:
            check_regular_file(entry)
        except DigitsInputError as exc:
            raise DataFormatError(entry, str(exc).removeprefix(f"{entry}: ")) from None
        files.append(entry)
    return files


def _visible(folder: Path) -> list[Path]:
    """The entries of a folder but hidden ones; a name that is not valid UTF-8 is refused (it could not be
    written to files.csv, the submission or run.json)."""
    entries = []
    for path in folder.iterdir():
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataFormatError(folder, f"a file name that is not valid UTF-8: {os.fsencode(path.name)!r}; rename "
                                          "it (or move it out)") from None
        if not path.name.startswith("."):
            entries.append(path)
    return entries


def _read_split(data: Path, split: Split, files: list[tuple[Path, int | None]], skipped: list[str],
                prints: dict[str, str], *, strict: bool, max_pixels: int) -> Iterator[SplitData]:
    """The split's pieces: PIECE_FILES files at a time, each prepared as `digits predict` prepares one (ids are
    1-based file numbers; a rejected file keeps its number unused). The sha256 of the split's files (each relative
    name, then its bytes) goes to prints once the last file is read."""
    digest = hashlib.sha256()
    labelled = files[0][1] is not None
    good_rows = 0
    for start in range(0, len(files), PIECE_FILES):
        piece = files[start:start + PIECE_FILES]
        good, pixels, rejects = [], [], []
        for index, (path, _) in enumerate(piece, start):
            outcome = _prepared(data, path, digest, max_pixels)
            if isinstance(outcome, str):
                if strict:
                    raise DigitsInputError(outcome + " (--set ingest.on_bad_rows=quarantine sets bad files aside)")
                rejects.append(Reject(str(path), None, None, outcome.removeprefix(f"{path}: ")))
            else:
                good.append(index)
                pixels.append(outcome)
        good_rows += len(good)
        yield SplitData(
            ids=np.asarray(good, np.int64) + 1,
            labels=np.asarray([files[i][1] for i in good], np.int8) if labelled else None,
            pixels=(np.stack(pixels).astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE) if pixels
                    else np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8)),
            rows_read=len(piece), rejects=rejects, files=[files[i][0].relative_to(data).as_posix() for i in good],
            skipped=skipped if start == 0 else [])
    if not good_rows:
        first = files[0][0]
        raise DataFormatError(first.parent.parent if labelled else first.parent,
                              "no readable images: every file was rejected (see ingest/rejected.csv)")
    prints[str(data / split.value)] = digest.hexdigest()


def _prepared(data: Path, path: Path, digest, max_pixels: int) -> np.ndarray | str:
    """The file prepared as `digits predict` prepares it (about 0.35 ms a small PNG here, in this process: a pool
    re-imports the main module in every worker, which a Prefect worker's is not made for), or the one-line reason
    it could not be; its name and bytes go into digest either way (the file is read once, for both)."""
    from components import predict

    digest.update(path.relative_to(data).as_posix().encode() + b"\0")  # names are UTF-8 (_visible)
    try:
        raw = predict.file_bytes(path)
        digest.update(raw)
        return predict.prepare(predict.decode(raw, str(path), max_pixels), str(path))
    except DigitsInputError as exc:
        return str(exc)
