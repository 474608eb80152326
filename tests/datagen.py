"""Tiny, deterministic fixtures in every source layout, built from PIL-rendered digits.

Tests never need ../shared/data: these write the Kaggle CSV/zip and the noisy .amat/CSV layouts
from a few hundred synthetic digits that look like MNIST (white ink on black, centred, 28x28).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIDE = 28
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when that folder is absent (a user's machine)."""
    import pytest

    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (../shared/data is absent)")
    return path


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic digits: (labels int (n,), pixels uint8 (n, 28, 28)).

    Labels are shuffled within each block of ten rows, so every prefix of 10k rows is balanced.
    """
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.permutation(10) for _ in range(-(-n // 10))])[:n]
    font = ImageFont.load_default(size=22)
    images = np.empty((n, SIDE, SIDE), np.uint8)
    for i, label in enumerate(labels):
        canvas = Image.new("L", (SIDE, SIDE), 0)
        dx, dy = rng.integers(-2, 3, size=2)
        ImageDraw.Draw(canvas).text((SIDE / 2 + dx, SIDE / 2 + dy), str(label), fill=255, font=font, anchor="mm",
                                    stroke_width=1, stroke_fill=int(rng.integers(180, 256)))
        images[i] = np.asarray(canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR))
    return labels, images


def kaggle_csv_text(labels: np.ndarray | None, pixels: np.ndarray) -> str:
    """A Kaggle train.csv (labels given) or test.csv (labels None), header included."""
    flat = pixels.reshape(len(pixels), -1).astype(int)
    header = ([] if labels is None else ["label"]) + [f"pixel{i}" for i in range(flat.shape[1])]
    body = flat if labels is None else np.column_stack([labels, flat])
    return ",".join(header) + "\n" + "\n".join(",".join(map(str, row)) for row in body) + "\n"


def write_kaggle(folder: Path, n_train: int = 60, n_test: int = 30, seed: int = 0) -> dict:
    """Kaggle folder with train.csv and test.csv. Returns the arrays written."""
    labels, train = digits(n_train, seed)
    _, test = digits(n_test, seed + 1)
    return write_kaggle_arrays(folder, labels, train, test)


def write_kaggle_arrays(folder: Path, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict:
    """Kaggle folder holding these arrays (train labelled, test not). Returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.csv").write_text(kaggle_csv_text(labels, train))
    (folder / "test.csv").write_text(kaggle_csv_text(None, test))
    return {"labels": labels, "train": train, "test": test}


def write_kaggle_zip(path: Path, n_train: int = 60, n_test: int = 30, seed: int = 0) -> dict:
    """The Kaggle competition zip (train.csv, test.csv, sample_submission.csv)."""
    labels, train = digits(n_train, seed)
    _, test = digits(n_test, seed + 1)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("train.csv", kaggle_csv_text(labels, train))
        archive.writestr("test.csv", kaggle_csv_text(None, test))
        archive.writestr("sample_submission.csv",
                         "ImageId,Label\n" + "".join(f"{i},0\n" for i in range(1, n_test + 1)))
    return {"labels": labels, "train": train, "test": test}


def noisy_rows(labels: np.ndarray | None, pixels: np.ndarray, seed: int, delimiter: str,
               label_fmt: str, transposed: bool = True) -> list[str]:
    """Rows as the noisy set stores them: noise background, floats in [0, 1], transposed, label last.

    transposed=False writes the images upright: a file someone "fixed" before it reached us.
    """
    rng = np.random.default_rng(seed)
    x = pixels.astype(np.float32) / 255
    x = np.where(pixels == 0, rng.random(x.shape, dtype=np.float32), x)
    flat = (x.transpose(0, 2, 1) if transposed else x).reshape(len(x), -1)
    rows = [delimiter.join(f"{v:.8f}" for v in row) for row in flat]
    if labels is not None:
        rows = [f"{row}{delimiter}{label_fmt % label}" for row, label in zip(rows, labels)]
    return rows


def write_noisy(folder: Path, style: str = "amat", n_train: int = 40, n_test: int = 20, seed: int = 0,
                test_labels: bool | None = None, transposed: bool = True) -> dict:
    """The noisy set in 'amat' (labels in both files) or 'csv' (no header; test unlabelled by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels, train = digits(n_train, seed)
    test_y, test = digits(n_test, seed + 1)
    if style == "amat":
        names, delimiter, fmt = ("mnist_background_random_train.amat", "mnist_background_random_test.amat"), " ", "%.8e"
        test_labels = True if test_labels is None else test_labels
    else:
        names, delimiter, fmt = ("train.csv", "test.csv"), ",", "%d"
        test_labels = False if test_labels is None else test_labels
    (folder / names[0]).write_text("\n".join(noisy_rows(labels, train, seed, delimiter, fmt, transposed)) + "\n")
    (folder / names[1]).write_text("\n".join(
        noisy_rows(test_y if test_labels else None, test, seed + 1, delimiter, fmt, transposed)) + "\n")
    return {"labels": labels, "train": train, "test": test, "test_labels": test_y, "files": names}
