"""The features the validation suites check: per-row values derived from each canonical image, and
whole-dataset values. components.validate.features computes exactly these columns (a test holds the
suites, this list and the computation together).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureColumn:
    name: str
    dtype: str  # the pandas dtype of the computed column
    doc: str


ROW_FEATURES: tuple[FeatureColumn, ...] = (
    FeatureColumn("id", "int64", "the canonical row id"),
    FeatureColumn("label", "Int8", "the label (nullable: unlabelled test rows)"),
    FeatureColumn("min_pixel", "int16", "darkest pixel"),
    FeatureColumn("max_pixel", "int16", "brightest pixel (strong ink)"),
    FeatureColumn("mean_pixel", "float32", "mean intensity"),
    FeatureColumn("ink_pixels", "int16", "pixels of the ink mask (> 127, or a 3x3 mean > 204 under background noise)"),
    FeatureColumn("bbox_height", "int16", "rows from the first to the last with ink"),
    FeatureColumn("bbox_width", "int16", "columns from the first to the last with ink"),
    FeatureColumn("border_mean", "float32", "mean of the 2-pixel frame (high when the image is inverted)"),
)

DATASET_FEATURES: tuple[FeatureColumn, ...] = (
    FeatureColumn("train_test_shared_rows", "int64", "test rows whose exact image is also in train (leakage)"),
    FeatureColumn("ink_ks_statistic", "float64", "two-sample KS statistic of ink_pixels, train vs test (drift)"),
    FeatureColumn("intensity_ks_statistic", "float64", "two-sample KS statistic of mean_pixel, train vs test"),
)

ROW_COLUMNS = tuple(f.name for f in ROW_FEATURES)
DATASET_COLUMNS = tuple(f.name for f in DATASET_FEATURES)
