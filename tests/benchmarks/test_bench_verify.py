"""What verifying what a stage reads costs: every file a stage reads (the Parquet splits, the manifest and
the shards of a split, the model file) is re-hashed first and compared with the sha256 its producer
recorded in run.json.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_verify.py
Target (issue 16): verification adds <= 5 % to a stage. The Kaggle set (70,000 rows) through every
stage of train-kaggle, one epoch of the fast config (the shortest training: the least favourable ratio
for train), the gate at 0 so register registers; the time spent inside the checks is summed per stage
and set beside the stage's own seconds.
"""

from __future__ import annotations

import json
import time

import pytest

import datagen

pytestmark = pytest.mark.benchmark


def test_verification_costs_under_five_percent_of_each_stage(tmp_path):
    import schemas.stages
    from flows import stages
    from runs import make
    from schemas.artifacts import Artifact
    from schemas.config import apply_overrides, default_config

    archive = datagen.shared_data("kaggle", "digit-recognizer.zip")
    spent: dict[str, float] = {}
    current = {"stage": None}
    verify = Artifact.verify

    def timed(self, *names):
        start = time.perf_counter()
        try:
            return verify(self, *names)
        finally:
            spent[current["stage"]] = spent.get(current["stage"], 0.0) + time.perf_counter() - start

    rows = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIGITS_HOME", str(tmp_path / "home"))
        patch.setattr(Artifact, "verify", timed)
        config = apply_overrides(default_config("train-kaggle"), [
            f"ingest.data={archive}", "train.epochs=1", "train.width=0.5", "train.augment=false",
            "evaluate.threshold=0"])
        folder = stages.start_run(config)
        for stage in schemas.stages.GRAPH.plan(config):
            current["stage"] = stage.name
            make(folder, config, stage.produces)
        record = folder.load()
    for stage in schemas.stages.GRAPH.plan(config):
        seconds = record.stages[stage.name].seconds
        checked = spent.get(stage.name, 0.0)
        rows.append({"stage": stage.name, "stage_s": seconds, "verify_s": round(checked, 4),
                     "overhead_pct": round(100 * checked / (seconds - checked), 2)})
    print("\n" + "\n".join(json.dumps(row) for row in rows))
    assert all(row["overhead_pct"] <= 5 for row in rows), rows
