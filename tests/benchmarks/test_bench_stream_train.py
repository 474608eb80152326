"""Training from streamed TFRecords (issue 40): memory that does not grow with the data, epoch time and accuracy
beside the in-memory path.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_stream_train.py
     (DIGITS_BENCH_DIR=PATH keeps the 10x data between runs; DIGITS_BENCH_SEEDS=3 for the accuracy comparison)

- memory: `digits train --set train.epochs=1` on the Kaggle layout at 1x (37,800 train rows: held in memory, the
  default below train.in_memory_rows=100,000) and at 10x (378,000: streamed), each a fresh process; peak RSS of
  the process tree (psutil, every 50 ms). Target: 10x within +300 MB of 1x. DIGITS_BENCH_TRAIN_TIMES=1,100 trains
  at 1x and 100x instead (4.2 M rows, ~8 GB of CSV made under DIGITS_BENCH_DIR; the epoch takes ~2 h on 2 CPUs):
  the issue asks that it completes; its memory is held to the same +300 MB.
- epoch time: on the real Kaggle train.csv (the shared zip), one converted run, 1-epoch trainings alternated
  between the in-memory path and the streamed one (train.in_memory_rows=0), 3 of each; the trained model's own
  epoch seconds (history.csv, imports and loading excluded). Target: streamed median <= 1.1x in-memory median.
- accuracy: the default 6-epoch digits-net on the same run, in memory and streamed, for each of
  DIGITS_BENCH_SEEDS seeds (default 1): val accuracy on the same 4,200 val rows.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path

import pytest
from test_bench_scale import _data, measured

import datagen

pytestmark = pytest.mark.benchmark
DIGITS = str(Path(sys.executable).with_name("digits"))
GROWTH_LIMIT_MB = 300
SEEDS = int(os.environ.get("DIGITS_BENCH_SEEDS", "1"))
TRAIN_TIMES = tuple(int(t) for t in os.environ.get("DIGITS_BENCH_TRAIN_TIMES", "1,10").split(","))


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    given = os.environ.get("DIGITS_BENCH_DIR")
    return Path(given) if given else tmp_path_factory.mktemp("scale")


def _converted(data: Path, home: Path, *settings: str) -> tuple[str, dict]:
    """Ingest, validate and convert the Kaggle layout at data in a home of its own; settings: --set for ingest."""
    env = {**os.environ, "DIGITS_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    ingested = measured([DIGITS, "ingest", "--source", "kaggle", "--data", str(data),
                         *(arg for setting in settings for arg in ("--set", setting))], env)
    run_id = re.search(r"^run (\S+)", ingested["stdout"], re.M).group(1)
    for stage in ("validate", "convert"):
        measured([DIGITS, stage, "--run", run_id], env)
    return run_id, env


def _trained(home: Path, run_id: str) -> dict:
    return json.loads((home / "runs" / run_id / "run.json").read_text())["stages"]["train"]["outputs"]


def test_training_memory_does_not_grow_with_the_data(bench_root, tmp_path):
    results = {}
    for times in TRAIN_TIMES:
        home = tmp_path / f"home-x{times}"
        run_id, env = _converted(_data(times, bench_root), home)
        train = measured([DIGITS, "train", "--run", run_id, "--set", "train.epochs=1"], env)
        outputs = _trained(home, run_id)
        streamed = "streamed from TFRecords" in train["stdout"]
        results[times] = {"train_rows": outputs["train_rows"], "streamed": streamed, "seconds": train["seconds"],
                          "peak_rss_mb": train["peak_rss_mb"], "seconds_per_epoch": outputs["seconds_per_epoch"],
                          "val_accuracy": round(outputs["val_accuracy"], 4)}
        print(f"\nx{times}: {json.dumps(results[times])}", flush=True)
    print(f"\ntraining memory: {json.dumps(results)}")
    assert TRAIN_TIMES[0] == 1 and not results[1]["streamed"], results
    for times in TRAIN_TIMES[1:]:
        assert results[times]["streamed"], results
        assert results[times]["peak_rss_mb"] <= results[1]["peak_rss_mb"] + GROWTH_LIMIT_MB, results


def test_streamed_epochs_beside_in_memory_ones(tmp_path):
    home = tmp_path / "home"
    run_id, env = _converted(datagen.shared_data("kaggle", "digit-recognizer.zip"), home)  # read in place
    seconds = {"in-memory": [], "streamed": []}
    for attempt in range(3):
        for path, rows in (("in-memory", "100000"), ("streamed", "0")):
            measured([DIGITS, "train", "--run", run_id, "--force", "--set", "train.epochs=1", "--set",
                      f"train.in_memory_rows={rows}"], env)
            seconds[path].append(_trained(home, run_id)["seconds_per_epoch"])
            print(f"\n{path} epoch {attempt + 1}: {seconds[path][-1]} s", flush=True)
    medians = {path: statistics.median(values) for path, values in seconds.items()}
    ratio = medians["streamed"] / medians["in-memory"]
    print(f"\nepoch seconds: {json.dumps(seconds)}; medians {json.dumps(medians)}; streamed / in-memory {ratio:.3f}")
    assert ratio <= 1.1

    accuracy = {"in-memory": [], "streamed": []}
    for seed in range(42, 42 + SEEDS):
        for path, rows in (("in-memory", "100000"), ("streamed", "0")):
            measured([DIGITS, "train", "--run", run_id, "--force", "--set", f"seed={seed}", "--set", "train.epochs=6",
                      "--set", f"train.in_memory_rows={rows}"], env)  # a run keeps its --set: epochs said again
            accuracy[path].append(round(_trained(home, run_id)["val_accuracy"], 4))
            print(f"\n{path} seed {seed}: val {accuracy[path][-1]:.2%}", flush=True)
    print(f"\nval accuracy (6 epochs): {json.dumps(accuracy)}")


def test_malloc_allocator_beside_onednn_pool(tmp_path):
    """TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 (digits' default since flows.setup sets it) beside TensorFlow's own
    default, oneDNN's BFC pool: 1-epoch trainings of the real Kaggle train.csv's first 12,000 rows, alternated, 3 of
    each; the model's epoch seconds and the command's CPU seconds (user + system, less sensitive to a busy machine
    than wall time). Target: malloc's medians within 1.1x of the pool's, the same model (val accuracy) on both."""
    home = tmp_path / "home"
    run_id, env = _converted(datagen.shared_data("kaggle", "digit-recognizer.zip"), home, "ingest.limit=12000")
    results: dict[str, dict[str, list]] = {"pool": {"epoch": [], "cpu": [], "val": []},
                                           "malloc": {"epoch": [], "cpu": [], "val": []}}
    for attempt in range(3):
        for name, value in (("pool", "0"), ("malloc", "1")):
            before = os.times()
            measured([DIGITS, "train", "--run", run_id, "--force", "--set", "train.epochs=1"],
                     {**env, "TF_ONEDNN_USE_SYSTEM_ALLOCATOR": value})
            after = os.times()
            trained = _trained(home, run_id)
            results[name]["epoch"].append(trained["seconds_per_epoch"])
            results[name]["cpu"].append(round(after.children_user + after.children_system
                                              - before.children_user - before.children_system, 1))
            results[name]["val"].append(round(trained["val_accuracy"], 4))
            print(f"\n{name} {attempt + 1}: epoch {results[name]['epoch'][-1]} s, cpu {results[name]['cpu'][-1]} s",
                  flush=True)
    medians = {name: {k: statistics.median(v) for k, v in r.items() if k != "val"} for name, r in results.items()}
    ratios = {k: round(medians["malloc"][k] / medians["pool"][k], 3) for k in ("epoch", "cpu")}
    print(f"\nallocators: {json.dumps(results)}; medians {json.dumps(medians)}; malloc / pool {json.dumps(ratios)}")
    assert ratios["epoch"] <= 1.1 and ratios["cpu"] <= 1.1, ratios
    assert results["pool"]["val"] == results["malloc"]["val"], results
