"""The `best` preset (an ensemble) on MNIST-train, scored on MNIST-test (10,000, used for no choice).

Run: pytest -m benchmark -s tests/benchmarks/test_bench_best.py   (about 53 minutes per seed on 2 cores)
Target (issue 17): >= 99.70 % on MNIST-test for each of 3 seeds, each run <= 60 minutes; every member's
accuracy printed beside the ensemble's. Each training runs in a fresh process.

test_best_preset_on_kaggle (about 41 minutes): `digits run train-kaggle --preset best` on the Kaggle zip, the
whole run in its own process; its val accuracy (4,200 rows) and members beside it, and the run's wall time (the
submission is scored on labels we do not have). Asserts the run takes <= 60 minutes and val >= 99.5 %.
"""

from __future__ import annotations

import json
import time

import pytest
from test_bench_noisy import _digits
from test_bench_train import mnist_run  # noqa: F401  (the converted MNIST run, a fixture)

import datagen
from measure import in_fresh_process as _measure
from schemas.presets import preset

pytestmark = pytest.mark.benchmark

SEEDS = (42, 1, 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_best_preset_on_mnist(mnist_run, seed):  # noqa: F811
    home, run_id = mnist_run
    result = _measure("train", home, run_id, *preset("best").overrides, f"seed={seed}")
    print(json.dumps({k: result[k] for k in ("seconds", "process_s", "val_accuracy", "test_accuracy", "members")}))
    for member in result["members"]:
        print(f"  {member['name']} seed {member['seed']}: val {member['val_accuracy']:.4%}, "
              f"MNIST-test {member['test_accuracy']:.4%}, {member['seconds']:.0f} s")
    print(f"best preset, seed {seed}: MNIST-test {result['test_accuracy']:.4%} in {result['process_s'] / 60:.1f} min")
    assert result["test_accuracy"] >= 0.997 and result["process_s"] <= 3600


def test_best_preset_on_kaggle(tmp_path):
    data = datagen.shared_data("kaggle", "digit-recognizer.zip")
    start = time.perf_counter()
    run = _digits(tmp_path / "home", "run", "train-kaggle", "--data", str(data), "--preset", "best")
    wall = time.perf_counter() - start
    record = json.loads((run / "run.json").read_text())
    members = record["stages"]["train"]["outputs"]["members"]
    print(json.dumps({"val_accuracy": record["metrics"]["val_accuracy"], "wall_s": round(wall),
                      "train_s": record["stages"]["train"]["seconds"],
                      "members": [(m["val_accuracy"], m["seconds"]) for m in members]}))
    assert wall <= 3600 and record["metrics"]["val_accuracy"] >= 0.995
