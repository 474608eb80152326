"""Great Expectations suites, one JSON file per source and split (and one per source for the
whole dataset), each expectation tagged with its intent. Loaded here, run by components.validate.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.dataset import Source

SUITES_DIR = Path(__file__).resolve().parent
# Rows in the published data sets: the default minimum the row-count expectations ask for.
PUBLISHED_ROWS = {
    (Source.kaggle, "train"): 42000, (Source.kaggle, "test"): 28000,
    (Source.mnist, "train"): 60000, (Source.mnist, "test"): 10000,
    (Source.noisy, "train"): 12000, (Source.noisy, "test"): 50000,
}


def published_rows(source: Source, split: str) -> int:
    return PUBLISHED_ROWS[(Source(source), str(split))]


def suite_json(name: str) -> dict:
    """The reviewable JSON of one suite, e.g. 'kaggle-train'."""
    return json.loads((SUITES_DIR / f"{name}.json").read_text())


def load_suite(name: str):
    """The suite as a Great Expectations ExpectationSuite, built in one go (fast; no store writes)."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    spec = suite_json(name)
    expectations = [ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"], meta=e.get("meta")).to_domain_obj()
                    for e in spec["expectations"]]
    return gx.ExpectationSuite(name=spec["name"], expectations=expectations, meta=spec.get("meta"))
