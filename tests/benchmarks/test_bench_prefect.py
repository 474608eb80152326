"""Prefect's overhead on the default pipeline: `digits run train-mnist`'s flow against the same stages
called directly, each in a fresh process of the same script, each with its own empty DIGITS_HOME.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_prefect.py   (~10 min: the pipeline twice)
Target (issue 8): the flow's wall time at most 5 % above the direct calls'.
"""

from __future__ import annotations

import json

import pytest

import datagen
from measure import in_fresh_process as _measure

pytestmark = pytest.mark.benchmark


def test_prefect_overhead_on_the_default_pipeline(tmp_path):
    data = str(datagen.shared_data("mnist"))
    direct = _measure("pipeline", "direct", str(tmp_path / "direct"), data)
    flow = _measure("pipeline", "flow", str(tmp_path / "flow"), data)
    overhead = flow["seconds"] / direct["seconds"] - 1
    print(f"\ndirect: {json.dumps(direct)}\nflow: {json.dumps(flow)}\nPrefect overhead: {overhead:.1%} "
          f"({flow['seconds'] - direct['seconds']:.1f} s)")
    assert direct["status"] == flow["status"] == "completed"
    assert overhead <= 0.05
