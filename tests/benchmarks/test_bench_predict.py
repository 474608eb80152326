"""Prediction speed: all 28,000 Kaggle test rows through the default model (digits-net), as the
export stage and `digits predict` do it.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_predict.py
Target (issue 7): <= 10 s on this CPU. The model is trained one epoch (its weights do not change the
cost of a prediction; its architecture does), in a fresh process per measurement.
"""

from __future__ import annotations

import json

import pytest

import datagen
from measure import in_fresh_process as _measure

pytestmark = pytest.mark.benchmark


def test_predicting_the_kaggle_test_set(tmp_path):
    from flows import stages
    from runs import make
    from schemas.config import apply_overrides, default_config

    archive = datagen.shared_data("kaggle", "digit-recognizer.zip")
    with pytest.MonkeyPatch.context() as patch:
        home = str(tmp_path / "home")
        patch.setenv("DIGITS_HOME", home)
        config = apply_overrides(default_config("train-kaggle"), [f"ingest.data={archive}", "train.epochs=1"])
        folder = stages.start_run(config)
        for artifact in ("examples", "validation", "converted", "model"):
            make(folder, config, artifact)
    result = _measure("predict", home, folder.run_id)
    print(f"\nkaggle test prediction: {json.dumps(result)}")
    assert result["rows"] == 28000 and result["same_labels"]
    assert result["seconds"] <= 10
