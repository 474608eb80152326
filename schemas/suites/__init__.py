"""Great Expectations suites: one template per split (train.json, test.json, dataset.json), resolved per
source with the overrides of its row in schemas.sources. Every expectation carries an `id` and its
`intent` in meta. The resolved suites are what runs (components.validate writes them into the run's
`validate/suites/`) and what `digits suites show SOURCE` prints.

Template expectations may carry `meta.when`: `labelled` / `unlabelled` (a test split with or without
labels), `test` (only when the source has a test split).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable

from schemas.sources import Source

SUITES_DIR = Path(__file__).resolve().parent
TEMPLATES = ("train", "test", "dataset")


def template(batch: str) -> dict[str, Any]:
    """The reviewable JSON of one template: 'train', 'test' or 'dataset'."""
    return json.loads((SUITES_DIR / f"{batch}.json").read_text())


def resolve(source: Source | str, batch: str, conditions: Iterable[str] = ()) -> dict[str, Any]:
    """The suite source runs on batch ('train', 'test' or 'dataset') as JSON: the template with the
    expectations whose `when` holds (conditions: 'labelled', 'unlabelled', 'test') and the source's
    overrides applied (None drops an expectation; a mapping replaces `type`, updates `kwargs` and
    `meta`, a None value removing that key)."""
    spec = Source(source).spec
    held = set(conditions)
    resolved = []
    for expectation in template(batch)["expectations"]:
        meta = expectation["meta"]
        if meta.get("when") and meta["when"] not in held:
            continue
        if meta["id"] in spec.suite_overrides:
            override = spec.suite_overrides[meta["id"]]
            if override is None:
                continue
            expectation = _override(expectation, override)
        resolved.append({**expectation, "meta": {k: v for k, v in expectation["meta"].items() if k != "when"}})
    return {"name": f"{spec.name}-{batch}", "expectations": resolved,
            "meta": {"about": f"{batch} checks of the {spec.name} source ({spec.title}): schemas/suites/{batch}.json "
                              "with the overrides of schemas/sources.py",
                     "template": f"{batch}.json", "overrides": sorted(set(spec.suite_overrides) & {
                         e["meta"]["id"] for e in template(batch)["expectations"]})}}


def _override(expectation: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(expectation)
    if "type" in override:
        changed["type"] = override["type"]
    for part in ("kwargs", "meta"):
        for key, value in (override.get(part) or {}).items():
            if value is None:
                changed[part].pop(key, None)
            else:
                changed[part][key] = value
    return changed


def columns_checked(suite: dict[str, Any]) -> set[str]:
    """Every feature column an expectation of the suite reads."""
    found: set[str] = set()
    for expectation in suite["expectations"]:
        kwargs = expectation["kwargs"]
        found.update(kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs)
        found.update(kwargs.get("column_list", ()))
    return found


def load_suite(spec: dict[str, Any]):
    """A resolved suite as a Great Expectations ExpectationSuite, built in one go (fast; no store writes)."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    expectations = [ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"], meta=e.get("meta")).to_domain_obj()
                    for e in spec["expectations"]]
    return gx.ExpectationSuite(name=spec["name"], expectations=expectations, meta=spec.get("meta"))
