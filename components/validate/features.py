"""Per-row features of the canonical dataset, computed vectorised: what the suites check.

One expectation per pixel column took minutes on 42,000 rows; a handful of derived columns say
more (blank, inverted or mis-oriented images) and validate in well under a second.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

from schemas.dataset import ID, IMAGE_SIDE, LABEL, pixels_of
from schemas.features import ROW_COLUMNS

INK_THRESHOLD = 127  # clean sources: a pixel is ink above this
NOISY_INK_THRESHOLD = 204  # noisy source: the 3x3 mean above this (uniform noise averages 127.5)
BORDER = 2  # width of the frame whose mean tells background from an inverted image


def row_features(table: pa.Table, *, noisy: bool) -> pd.DataFrame:
    """One row per image: id, label, pixel range and mean, ink mask size, its bounding box, border mean."""
    pixels = pixels_of(table)
    mask = _box_mean3(pixels) > NOISY_INK_THRESHOLD if noisy else pixels > INK_THRESHOLD
    rows_with_ink, cols_with_ink = mask.any(axis=2), mask.any(axis=1)
    frame = np.ones((IMAGE_SIDE, IMAGE_SIDE), dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    return pd.DataFrame({
        "id": table.column(ID).to_numpy(),
        "label": table.column(LABEL).to_pandas(types_mapper={pa.int8(): pd.Int8Dtype()}.get),
        "min_pixel": pixels.min(axis=(1, 2)).astype(np.int16),
        "max_pixel": pixels.max(axis=(1, 2)).astype(np.int16),
        "mean_pixel": pixels.mean(axis=(1, 2), dtype=np.float32),
        "ink_pixels": mask.sum(axis=(1, 2)).astype(np.int16),
        "bbox_height": _extent(rows_with_ink),
        "bbox_width": _extent(cols_with_ink),
        "border_mean": pixels[:, frame].mean(axis=1, dtype=np.float32),
    }, columns=list(ROW_COLUMNS))


def drift(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    """Two-sample Kolmogorov-Smirnov statistics between train and test feature distributions."""
    return {"ink_ks_statistic": float(stats.ks_2samp(train["ink_pixels"], test["ink_pixels"]).statistic),
            "intensity_ks_statistic": float(stats.ks_2samp(train["mean_pixel"], test["mean_pixel"]).statistic)}


def _extent(any_ink: np.ndarray) -> np.ndarray:
    """Rows (or columns) from the first to the last with ink; 0 for an image with none."""
    first = any_ink.argmax(axis=1)
    last = any_ink.shape[1] - any_ink[:, ::-1].argmax(axis=1)
    return np.where(any_ink.any(axis=1), last - first, 0).astype(np.int16)


def _box_mean3(pixels: np.ndarray) -> np.ndarray:
    """Mean over each pixel's 3x3 neighbourhood (zero-padded), via summed-area tables."""
    padded = np.pad(pixels.astype(np.float32), ((0, 0), (1, 1), (1, 1)))
    area = np.pad(padded.cumsum(axis=1).cumsum(axis=2), ((0, 0), (1, 0), (1, 0)))
    return (area[:, 3:, 3:] - area[:, :-3, 3:] - area[:, 3:, :-3] + area[:, :-3, :-3]) / 9
