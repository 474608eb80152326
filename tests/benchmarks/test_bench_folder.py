"""Ingesting a folder of images: 10,000 small PNGs (the layout of the `folder` source), the whole ingest
stage in a fresh process (every image read and prepared as `digits predict` prepares one, Parquet, EDA,
sha256 of the inputs), median of 3.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_folder.py
Target (issue 15): <= 30 s on 2 cores.
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from PIL import Image

import datagen
from measure import in_fresh_process as _measure

pytestmark = pytest.mark.benchmark


def test_ten_thousand_pngs_ingest_within_30_seconds(tmp_path):
    labels, images = datagen.digits(2_000, seed=3)
    rng = np.random.default_rng(0)
    for copy in range(5):  # 10,000 files: each digit at five sizes, both polarities
        for i, (label, image) in enumerate(zip(labels, images)):
            folder = tmp_path / "data" / "train" / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            side = int(rng.integers(28, 120))
            picture = Image.fromarray(255 - image if copy % 2 else image).resize((side, side))
            picture.save(folder / f"{copy}-{i:05d}.png")
    runs = [_measure("ours", "folder", str(tmp_path / "data")) for _ in range(3)]
    summary = {"rows": runs[0]["rows"], "median_s": round(statistics.median(r["seconds"] for r in runs), 2),
               "runs_s": [round(r["seconds"], 2) for r in runs], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    print(f"\nfolder ingest: {json.dumps(summary)}")
    assert summary["rows"] == {"train": 10_000} and summary["median_s"] <= 30
