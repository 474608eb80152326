"""What issue 19 adds to a run: the seen-image fingerprints (train), and in evaluate the calibration table,
the reliability diagram and the look-up of the val and test images in the model's seen set.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_lineage.py
Targets (issue 19): evaluate's added time on 6,000 val images <= +3 s; the fingerprint set's size for
60,000 images. Data: the shared MNIST files at full size (54,000 train, 6,000 val, 10,000 test), a
baseline model trained one epoch; evaluate runs 3 times in this process, the added parts timed inside
each run and set beside the run's own seconds (medians).
"""

from __future__ import annotations

import gzip
import io
import json
import statistics
import time

import numpy as np
import pytest

import datagen

pytestmark = pytest.mark.benchmark


def _idx(path) -> np.ndarray:
    with gzip.open(path) as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)


def test_fingerprints_of_60000_images():
    from components.lineage import SeenSet

    images = _idx(datagen.shared_data("mnist", "train-images-idx3-ubyte.gz"))
    seconds, size = [], 0
    for _ in range(5):
        start = time.perf_counter()
        seen = SeenSet.of(images, {"data": "MNIST train"})
        seconds.append(time.perf_counter() - start)
        buffer = io.BytesIO()
        np.savez(buffer, exact=seen.exact, aligned=seen.aligned, chain=np.array(json.dumps(seen.chain)))
        size = len(buffer.getvalue())
    print(json.dumps({"images": len(images), "fingerprint_s_median": round(statistics.median(seconds), 3),
                      "seen_npz_bytes": size, "bytes_per_image": round(size / len(images), 2)}))
    assert size < 1_000_000


def test_evaluate_adds_under_three_seconds_on_6000_val_images(tmp_path):
    from components import evaluate
    from components.evaluate import report
    from components.lineage import SeenSet
    from flows import stages
    from runs import make
    from schemas.config import apply_overrides, default_config

    spent: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIGITS_HOME", str(tmp_path / "home"))
        config = apply_overrides(default_config("train-mnist"), [
            f"ingest.data={datagen.shared_data('mnist')}", "train.model=baseline", "train.epochs=1",
            "train.augment=false", "evaluate.threshold=0"])
        folder = stages.start_run(config)
        for artifact in ("examples", "validation", "converted"):
            make(folder, config, artifact)
        patch.setattr(stages, "_seen_of_training", timed("train_fingerprints", stages._seen_of_training))
        model = make(folder, config, "model")
        fingerprinting = spent.pop("train_fingerprints")
        record = folder.load()
        converted = make(folder, config, "converted")
        seen = SeenSet.load(model.seen_path)
        patch.setattr(evaluate, "calibration", timed("calibration", evaluate.calibration))
        patch.setattr(report, "reliability_png", timed("reliability_png", report.reliability_png))
        patch.setattr(evaluate, "seen_overlaps", timed("seen_overlaps", evaluate.seen_overlaps))
        rows = []
        for attempt in range(3):
            spent.clear()
            start = time.perf_counter()
            evaluate.run(model, converted, tmp_path / f"evaluate-{attempt}", threshold=0.0, champion=None, seen=seen)
            total = time.perf_counter() - start
            rows.append({"evaluate_s": round(total, 2), **{k: round(v, 3) for k, v in spent.items()},
                         "added_s": round(sum(spent.values()), 3)})
    added = statistics.median(r["added_s"] for r in rows)
    print("\n" + "\n".join(json.dumps(r) for r in rows))
    print(json.dumps({"val_images": converted.counts["val"], "test_images": converted.counts["test"],
                      "evaluate_s_median": statistics.median(r["evaluate_s"] for r in rows), "added_s_median": added,
                      "train_stage_s": record.stages["train"].seconds,
                      "train_fingerprints_s": round(fingerprinting, 2)}))
    assert converted.counts["val"] == 6000 and added <= 3.0
