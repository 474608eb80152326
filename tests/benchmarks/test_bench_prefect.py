"""Prefect's overhead on the default pipeline: `digits run train-mnist` (the flow `digits`, its local API)
against the same stages called directly, each in a fresh process of the same script with its own empty
DIGITS_HOME. Wall time is the whole process, start-up and exit included, as the parent sees it.

Four runs of each, in adjacent pairs of alternating order (direct, flow, flow, direct, ...) so that a
slow spell of the machine (other tenants) lands on both sides; the overhead is the ratio of the medians,
with the ratio within each pair beside it. The first flow run also creates Prefect's database (a fresh
PREFECT_HOME), as a user's first run does.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_prefect.py   (~40 min: the pipeline 8 times)
Target (issue 8): the flow's wall time at most 5 % above the direct calls'.
"""

from __future__ import annotations

import json
import statistics

import pytest

import datagen
from measure import in_fresh_process as _measure

pytestmark = pytest.mark.benchmark

PAIRS = (("direct", "flow"), ("flow", "direct"), ("direct", "flow"), ("flow", "direct"))


def _median(runs: list[dict], key) -> float:
    return statistics.median(key(run) for run in runs)


def test_prefect_overhead_on_the_default_pipeline(tmp_path):
    data = str(datagen.shared_data("mnist"))
    runs: dict[str, list[dict]] = {"direct": [], "flow": []}
    pair_ratios = []
    for i, pair in enumerate(PAIRS):
        timed = {}
        for mode in pair:
            result = _measure("pipeline", mode, str(tmp_path / f"{i}-{mode}"), data)
            print(f"\npair {i + 1}/{len(PAIRS)} {json.dumps(result)}", flush=True)
            assert result["status"] == "completed"
            runs[mode].append(result)
            timed[mode] = result["process_s"]
        pair_ratios.append(timed["flow"] / timed["direct"] - 1)

    direct, flow = (_median(runs[m], lambda r: r["process_s"]) for m in ("direct", "flow"))
    cpu = {m: _median(runs[m], lambda r: r["tree_cpu_s"]) for m in runs}
    outside = {m: _median(runs[m], lambda r: r["process_s"] - sum(r["stages_s"].values())) for m in runs}
    overhead = flow / direct - 1
    print(f"\nprocess wall seconds: direct {[round(r['process_s'], 1) for r in runs['direct']]}, "
          f"flow {[round(r['process_s'], 1) for r in runs['flow']]}")
    for stage in runs["direct"][0]["stages_s"]:
        print(f"  {stage}: median direct {_median(runs['direct'], lambda r: r['stages_s'][stage]):.1f} s, "
              f"flow {_median(runs['flow'], lambda r: r['stages_s'][stage]):.1f} s")
    print(f"  outside the stages (start-up, imports, API server, exit): median direct {outside['direct']:.1f} s, "
          f"flow {outside['flow']:.1f} s")
    print(f"CPU seconds of the process tree (median): direct {cpu['direct']:.1f}, flow {cpu['flow']:.1f} "
          f"({cpu['flow'] / cpu['direct'] - 1:+.1%})")
    print(f"flow vs direct within each pair: {', '.join(f'{r:+.1%}' for r in pair_ratios)} "
          f"(median {statistics.median(pair_ratios):+.1%})")
    print(f"Prefect overhead (medians of wall time): direct {direct:.1f} s, flow {flow:.1f} s -> {overhead:.1%} "
          f"({flow - direct:.1f} s)")
    assert overhead <= 0.05
