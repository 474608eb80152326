"""Prefect's overhead on the default pipeline: `digits run train-mnist`'s flow against the same stages
called directly, each run in a fresh process of the same script with its own empty DIGITS_HOME.

Three runs of each, interleaved direct, flow, flow, direct, direct, flow so that a slow spell of the
machine (other tenants) lands on both sides; the overhead is the ratio of the medians. The first
flow run also creates Prefect's database (a fresh PREFECT_HOME), as a user's first run does.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_prefect.py   (~30 min: the pipeline 6 times)
Target (issue 8): the flow's wall time at most 5 % above the direct calls'.
"""

from __future__ import annotations

import json
import statistics

import pytest

import datagen
from measure import in_fresh_process as _measure

pytestmark = pytest.mark.benchmark

ORDER = ("direct", "flow", "flow", "direct", "direct", "flow")


def _median(runs: list[dict], key) -> float:
    return statistics.median(key(run) for run in runs)


def test_prefect_overhead_on_the_default_pipeline(tmp_path):
    data = str(datagen.shared_data("mnist"))
    runs: dict[str, list[dict]] = {"direct": [], "flow": []}
    for i, mode in enumerate(ORDER):
        result = _measure("pipeline", mode, str(tmp_path / f"{i}-{mode}"), data)
        print(f"\n{i + 1}/{len(ORDER)} {json.dumps(result)}", flush=True)
        assert result["status"] == "completed"
        runs[mode].append(result)

    direct, flow = (_median(runs[m], lambda r: r["seconds"]) for m in ("direct", "flow"))
    cpu = {m: _median(runs[m], lambda r: r["tree_cpu_s"]) for m in runs}
    outside = {m: _median(runs[m], lambda r: r["seconds"] - sum(r["stages_s"].values())) for m in runs}
    overhead = flow / direct - 1
    print(f"\nwall seconds: direct {[round(r['seconds'], 1) for r in runs['direct']]}, "
          f"flow {[round(r['seconds'], 1) for r in runs['flow']]}")
    for stage in runs["direct"][0]["stages_s"]:
        print(f"  {stage}: median direct {_median(runs['direct'], lambda r: r['stages_s'][stage]):.1f} s, "
              f"flow {_median(runs['flow'], lambda r: r['stages_s'][stage]):.1f} s")
    print(f"  outside the stages: median direct {outside['direct']:.1f} s, flow {outside['flow']:.1f} s")
    print(f"CPU seconds of the process tree (median): direct {cpu['direct']:.1f}, flow {cpu['flow']:.1f} "
          f"({cpu['flow'] / cpu['direct'] - 1:+.1%})")
    print(f"Prefect overhead (medians of wall time): direct {direct:.1f} s, flow {flow:.1f} s -> {overhead:.1%} "
          f"({flow - direct:.1f} s)")
    assert overhead <= 0.05
