"""MNIST through TensorFlow Datasets (`tfds.load("mnist")`), the loader Keras/TF users know.

Offline, `data` is a folder holding the four original idx `.gz` files: they are checked here
(gzip, idx magic, shapes, counts) and TFDS prepares its dataset from them (it verifies their
checksums), so later `tfds.load("mnist", data_dir=...)` works with no network. `data` may also be a
TFDS data_dir where mnist is already prepared, or None to let TFDS download. Ids are 1..N in TFDS's
own (deterministic) order of each split.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import socket
import struct
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import numpy as np

from components.files import check_regular_file, walk_files
from components.ingest.splits import ReadOptions, SplitData
from components.tensorflow_runtime import import_tfds
from schemas.dataset import IMAGE_SIDE, Split
from schemas.errors import DataFormatError, DigitsInputError

IDX_FILES = {
    "train-images-idx3-ubyte.gz": (2051, 60000),
    "train-labels-idx1-ubyte.gz": (2049, 60000),
    "t10k-images-idx3-ubyte.gz": (2051, 10000),
    "t10k-labels-idx1-ubyte.gz": (2049, 10000),
}
_TFDS_NAME = "mnist"


PIECE_ROWS = 10_000  # images TFDS hands over at a time: a split streams through its iterator


def read(data: Path | None, options: ReadOptions) -> tuple[dict[Split, Iterator[SplitData]], dict[str, str]]:
    """Both splits through TFDS (in options.tfds_dir), preparing it from `data` first when that holds the idx
    files; each split streamed from TFDS's iterator PIECE_ROWS images at a time."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "Variant folder ... has no dataset_info.json" on every first prepare
    try:
        return _read(data, options.tfds_dir, options.limit)
    finally:
        absl.setLevel(level)


def layout(data: Path) -> list[Path]:
    """The files read from data, checked to be there as regular files without decoding them: the 4 idx .gz
    files, or every file of a TFDS data_dir's prepared mnist."""
    if not data.exists():
        raise DataFormatError(data, "no such folder (expected the 4 MNIST idx .gz files or a TFDS data_dir)")
    if not data.is_dir():
        raise DataFormatError(data, "not a folder (expected one holding the 4 MNIST idx .gz files, or a TFDS "
                                    "data_dir)")
    if (data / _TFDS_NAME).is_dir():
        return list(walk_files(data / _TFDS_NAME))
    files = [data / name for name in IDX_FILES]
    for path in files:
        check_regular_file(path, f"missing: an MNIST folder holds {', '.join(IDX_FILES)}")
    return files


def _read(data: Path | None, tfds_dir: Path, limit: int | None) -> tuple[dict[Split, Iterator[SplitData]],
                                                                         dict[str, str]]:
    fingerprints: dict[str, str] = {}
    if data is not None:
        layout(data)
    prepared_dir = data is not None and (data / _TFDS_NAME).is_dir()
    if data is not None and not prepared_dir:
        fingerprints = verify_idx_folder(data)  # before TensorFlow's import: bad files fail fast
    tfds = import_tfds()
    if prepared_dir:
        tfds_dir = data
    elif data is not None:
        _prepare(tfds, tfds_dir, manual_dir=data)
    download = data is None
    if download and not tfds.builder(_TFDS_NAME, data_dir=str(tfds_dir)).is_prepared():
        _check_reachable(tfds)
    splits = {}
    for split, name in ((Split.train, "train"), (Split.test, "test")):
        spec = f"{name}[:{limit}]" if limit else name
        try:
            batches = tfds.load(_TFDS_NAME, split=spec, data_dir=str(tfds_dir), batch_size=PIECE_ROWS,
                                download=download)
        except Exception as exc:  # TFDS raises many types (network, missing files); each is the user's to fix
            raise _unloadable(tfds_dir, exc) from None
        splits[split] = _pieces(tfds.as_numpy(batches), tfds_dir)
    if not fingerprints:
        fingerprints = {f"tfds:{_TFDS_NAME}": _tfds_fingerprint(tfds_dir)}
    return splits, fingerprints


def _pieces(batches, tfds_dir: Path) -> Iterator[SplitData]:
    """A split's pieces from TFDS's batches, in TFDS's own (deterministic) order: ids 1..N across the pieces."""
    start = 1
    try:
        for arrays in batches:
            images = arrays["image"].reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
            n = len(images)
            yield SplitData(ids=np.arange(start, start + n, dtype=np.int64), labels=arrays["label"].astype(np.int8),
                            pixels=np.ascontiguousarray(images, dtype=np.uint8), rows_read=n)
            start += n
    except Exception as exc:  # a prepared file that cannot be read back
        raise _unloadable(tfds_dir, exc) from None


def _unloadable(tfds_dir: Path, exc: BaseException) -> DigitsInputError:
    return DigitsInputError(f"TFDS could not load mnist into {tfds_dir}: {_first_line(exc)} — offline, "
                            "pass --data FOLDER holding the 4 MNIST idx .gz files")


def verify_idx_folder(folder: Path) -> dict[str, str]:
    """Check the four idx .gz files (gzip, magic number, 28x28, counts); return their sha256."""
    prints = {}
    for name, (magic, count) in IDX_FILES.items():
        path = folder / name
        check_regular_file(path, f"missing: an MNIST folder holds {', '.join(IDX_FILES)}")
        raw = path.read_bytes()
        prints[str(path)] = hashlib.sha256(raw).hexdigest()
        try:
            content = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataFormatError(path, f"not a complete gzip file ({exc})") from None
        dims = 3 if magic == 2051 else 1
        if len(content) < 4 + 4 * dims:
            raise DataFormatError(path, f"truncated idx header ({len(content)} bytes)")
        got_magic, *shape = struct.unpack(f">{1 + dims}I", content[: 4 + 4 * dims])
        if got_magic != magic:
            raise DataFormatError(path, f"idx magic number {got_magic}, expected {magic} "
                                        f"({'images' if magic == 2051 else 'labels'})")
        expected_shape = [count, IMAGE_SIDE, IMAGE_SIDE][:dims]
        if shape != expected_shape:
            raise DataFormatError(path, f"idx shape {shape}, expected {expected_shape}")
        if len(content) != 4 + 4 * dims + int(np.prod(shape)):
            raise DataFormatError(path, f"{len(content) - 4 - 4 * dims} data bytes, expected {int(np.prod(shape))}")
        if magic == 2049:
            labels = np.frombuffer(content, np.uint8, offset=8)
            if labels.max() > 9:
                bad = int(np.argmax(labels > 9))
                raise DataFormatError(path, f"label {labels[bad]} at item {bad + 1} outside 0..9")
    return prints


def _idx_array(path: Path) -> np.ndarray:
    """Decode one idx .gz file (no checks: see verify_idx_folder)."""
    content = gzip.decompress(path.read_bytes())
    dims = content[3]
    shape = struct.unpack(f">{dims}I", content[4:4 + 4 * dims])
    return np.frombuffer(content, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _prepare(tfds, tfds_dir: Path, manual_dir: Path) -> None:
    builder = tfds.builder(_TFDS_NAME, data_dir=str(tfds_dir))
    if builder.is_prepared():
        return
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    except Exception as exc:  # checksum mismatch and friends: the files are not the published MNIST
        raise DigitsInputError(f"{manual_dir}: TFDS refused the MNIST files: {_first_line(exc)}") from None


def _check_reachable(tfds) -> None:
    """Fail in seconds, not after TFDS's minutes of retries, when its download hosts are out of reach."""
    hosts = sorted({urlparse(url).hostname for url in tfds.builder_cls(_TFDS_NAME).url_infos or {}} - {None})
    for host in hosts:
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as exc:
            raise DigitsInputError(f"cannot reach {host} to download mnist ({exc}); offline, pass --data FOLDER "
                                   "holding the 4 MNIST idx .gz files") from None


def _tfds_fingerprint(tfds_dir: Path) -> str:
    """sha256 over the prepared dataset's metadata (it lists every shard and its checksum)."""
    digest = hashlib.sha256()
    for info in sorted((tfds_dir / _TFDS_NAME).glob("*/dataset_info.json")):
        digest.update(info.read_bytes())
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
