"""Throughput of ensemble members: a 4-member ensemble (1 epoch each) trained in one process vs on a
2-worker Dask LocalCluster through Prefect, on MNIST-train, side by side in one script.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_ensemble_workers.py   (about 12 minutes on 2 cores)
Reports the members' wall time each way and the ratio (issue 17: the scale measurement).
"""

from __future__ import annotations

import json

import pytest
from test_bench_train import mnist_run  # noqa: F401  (the converted MNIST run, a fixture)

from measure import in_fresh_process as _measure

pytestmark = pytest.mark.benchmark

ENSEMBLE = ["train.model=digits-net", "train.members=4", "train.epochs=1"]


def test_four_members_one_worker_vs_two(mnist_run):  # noqa: F811
    home, run_id = mnist_run
    results = {}
    for workers in (1, 2, 1, 2):  # interleaved: the machine's speed drifts
        result = _measure("train", home, run_id, *ENSEMBLE, f"train.workers={workers}")
        results.setdefault(workers, []).append(result)
        print(json.dumps({"workers": workers, "seconds": result["seconds"], "process_s": round(result["process_s"], 1),
                          "test_accuracy": result["test_accuracy"]}))
    one = sorted(r["seconds"] for r in results[1])
    two = sorted(r["seconds"] for r in results[2])
    print(f"4 members x 1 epoch: 1 worker {one} s, 2 workers {two} s; throughput ratio (1 worker / 2 workers, "
          f"best of 2 each) {one[0] / two[0]:.2f}")
    assert all(r["test_accuracy"] > 0.98 for rs in results.values() for r in rs)
