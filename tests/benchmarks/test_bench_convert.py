"""Convert speed on the real Kaggle set (70,000 rows), against a plain tf.io.TFRecordWriter loop.

Run: make bench   (or: pytest -m benchmark -s tests/benchmarks/test_bench_convert.py)
Targets (issue 4): the conversion <= 20 s on this machine; Beam at least half the plain writer's
throughput; per-class proportions of train and val within 0.5 points.
"""

from __future__ import annotations

import json
import statistics

import pytest

import datagen
from measure import in_fresh_process as _measure

pytestmark = pytest.mark.benchmark
REPEATS = 3



def test_kaggle_conversion_against_a_plain_writer():
    archive = str(datagen.shared_data("kaggle", "digit-recognizer.zip"))
    cold = [_measure("convert_cold", "kaggle", archive) for _ in range(REPEATS)]
    same_process = _measure("convert_vs_plain", "kaggle", archive, str(REPEATS))
    dask = _measure("convert_cold", "kaggle", archive, "dask")
    summary = {"stage_fresh_process_median_s": round(statistics.median(r["seconds"] for r in cold), 2),
               "stage_peak_rss_mb": round(max(r["peak_rss_mb"] for r in cold)),
               "dask_local_cluster_2_workers_s": round(dask["seconds"], 2),
               "class_proportion_gap_pt": cold[0]["class_proportion_gap_pt"], "rows": cold[0]["rows"],
               "shards": cold[0]["shards"], "same_process": same_process}
    print(f"\nkaggle convert: {json.dumps(summary)}")
    assert cold[0]["rows"] == {"train": 37800, "val": 4200, "test": 28000}
    assert summary["stage_fresh_process_median_s"] <= 20
    assert summary["class_proportion_gap_pt"] < 0.5
    assert same_process["beam_vs_plain_throughput"] >= 0.5
