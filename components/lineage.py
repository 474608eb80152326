"""Lineage of seen images: which digits a model was trained on, kept as compact fingerprints, so that a
later evaluation can tell when it scores the model on images it has already seen.

Each canonical image (uint8 28x28, see schemas.dataset) gets two 64-bit fingerprints (BLAKE2b with an
8-byte digest, so about 1 in 10^19 for two different images to share one):

- `exact`: of its 784 pixel bytes;
- `aligned`: of the image moved to its top-left corner (its ink's bounding box starting at row 0,
  column 0), so the same digit shifted by any number of pixels (none of its ink cut off) matches too.

Re-quantised copies (pixel values changed by a JPEG round trip or another rounding) are not caught:
their bytes differ and a coarser hash would also join genuinely different, similar digits.

A model's seen set (`seen.npz`: the sorted fingerprints plus its `chain`, a JSON list of where they came
from) is its train split's, joined through transfer with its base model's, up the chain: the train and
transfer stages write it beside the model, the registry keeps it with each version, and evaluate and
export look this run's val and test images up in it. 60,000 images take 0.94 MB.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from schemas.errors import DamagedArtifact

SEEN = "seen.npz"
EXAMPLES_SHOWN = 10  # ids listed with an overlap count
_CHUNK = 4096


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _aligned(images: np.ndarray) -> np.ndarray:
    """Each image moved up and left until its ink touches row 0 and column 0 (blank images unchanged)."""
    n, side = images.shape[0], images.shape[1]
    rows, cols = images.any(axis=2), images.any(axis=1)
    top, left = rows.argmax(axis=1), cols.argmax(axis=1)  # 0 for a blank image
    grid = np.arange(side)
    r, c = top[:, None] + grid, left[:, None] + grid  # (n, side) source row / column of each target
    keep = (r < side)[:, :, None] & (c < side)[:, None, :]
    moved = images[np.arange(n)[:, None, None], np.minimum(r, side - 1)[:, :, None], np.minimum(c, side - 1)[:, None, :]]
    return np.where(keep, moved, 0).astype(np.uint8)


def fingerprints(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exact, aligned) uint64 fingerprints of uint8 images (n, 28, 28), in order."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    exact = np.fromiter((_digest(image.tobytes()) for image in images), np.uint64, len(images))
    aligned = np.empty(len(images), np.uint64)
    for start in range(0, len(images), _CHUNK):
        block = _aligned(images[start:start + _CHUNK])
        aligned[start:start + len(block)] = [_digest(image.tobytes()) for image in block]
    return exact, aligned


@dataclass(frozen=True)
class Overlap:
    """How many of some images a seen set holds: exact copies, and shifted copies that are not exact."""

    images: int
    exact: int
    shifted: int
    example_ids: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.exact + self.shifted

    def summary(self) -> dict[str, Any]:
        return {"images": self.images, "seen": self.total, "exact": self.exact, "shifted": self.shifted,
                "example_ids": self.example_ids}

    def describe(self) -> str:
        shifted = f", {self.shifted:,} of them shifted copies" if self.shifted else ""
        return f"{self.total:,} of {self.images:,} images{shifted}"


@dataclass(frozen=True)
class SeenSet:
    """The fingerprints of every image a model was trained on, and where they came from."""

    exact: np.ndarray  # sorted, unique uint64
    aligned: np.ndarray  # sorted, unique uint64
    chain: list[dict[str, Any]]  # one entry per training that contributed, this model's first

    @property
    def complete(self) -> bool:
        """False when a model in the chain has no known seen set (a base from a file, or registered before
        digits recorded them)."""
        return all(link.get("images") is not None for link in self.chain)

    @property
    def images(self) -> int:
        return len(self.exact)

    @classmethod
    def of(cls, images: np.ndarray, link: dict[str, Any]) -> SeenSet:
        return cls.of_batches([images], link)

    @classmethod
    def of_batches(cls, batches: Iterable[np.ndarray], link: dict[str, Any]) -> SeenSet:
        """The set of images that come in batches (a split streamed from its shards): only fingerprints are held."""
        exact, aligned, count = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)], 0
        for images in batches:
            e, a = fingerprints(images)
            exact.append(np.unique(e))
            aligned.append(np.unique(a))
            count += len(images)
        return cls(np.unique(np.concatenate(exact)), np.unique(np.concatenate(aligned)), [{**link, "images": count}])

    def joined(self, base: SeenSet | None, base_link: dict[str, Any]) -> SeenSet:
        """This set with a base model's (None: a base whose seen images are unknown, recorded as such)."""
        if base is None:
            return SeenSet(self.exact, self.aligned, [*self.chain, {**base_link, "images": None}])
        return SeenSet(np.union1d(self.exact, base.exact), np.union1d(self.aligned, base.aligned),
                       [*self.chain, {**base.chain[0], **base_link}, *base.chain[1:]])

    def membership(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(is an exact copy, is a shifted copy and not an exact one) of each image, as boolean arrays."""
        exact, aligned = fingerprints(images)
        is_exact = np.isin(exact, self.exact)
        return is_exact, ~is_exact & np.isin(aligned, self.aligned)

    def overlap(self, images: np.ndarray, ids: np.ndarray) -> Overlap:
        is_exact, is_shifted = self.membership(images)
        seen = np.flatnonzero(is_exact | is_shifted)
        return Overlap(len(images), int(is_exact.sum()), int(is_shifted.sum()),
                       [int(i) for i in np.asarray(ids)[seen[:EXAMPLES_SHOWN]]])

    def save(self, path: Path) -> Path:
        """Write atomically (temp file, then rename)."""
        buffer = io.BytesIO()
        np.savez(buffer, exact=self.exact, aligned=self.aligned, chain=np.array(json.dumps(self.chain)))
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> SeenSet:
        try:
            with np.load(path, allow_pickle=False) as data:
                exact, aligned, chain = data["exact"], data["aligned"], json.loads(str(data["chain"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise DamagedArtifact(path, f"not a seen-image set ({type(exc).__name__})") from None
        if exact.dtype != np.uint64 or aligned.dtype != np.uint64 or not isinstance(chain, list):
            raise DamagedArtifact(path, "not a seen-image set (wrong arrays)")
        return cls(exact, aligned, chain)


def describe_chain(chain: list[dict[str, Any]]) -> str:
    parts = []
    for link in chain:
        what = link.get("model") or "this model"
        count = "unknown images" if link.get("images") is None else f"{link['images']:,} images"
        parts.append(f"{what}: {count}" + (f" ({link['data']})" if link.get("data") else ""))
    return " <- ".join(parts)
