"""One row per source (schemas.sources) and the contracts made from it: the enums, the config defaults,
the suites resolved from their templates, the features they check, and the layering of schemas/."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest

from components.ingest import reader_of
from components.validate.features import drift, row_features
from schemas.config import Pipeline, default_config
from schemas.dataset import Source, to_table
from schemas.features import DATASET_COLUMNS, ROW_COLUMNS, ROW_FEATURES
from schemas.sources import SOURCES
from schemas.suites import TEMPLATES, columns_checked, resolve

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {"train": [["labelled"]], "test": [["labelled"], ["unlabelled"]], "dataset": [["test"], []]}


def test_every_source_is_a_pipeline_with_a_reader_and_valid_defaults():
    assert [s.value for s in Source] == [spec.name for spec in SOURCES]
    assert [p.value for p in Pipeline] == [spec.pipeline for spec in SOURCES]
    for spec in SOURCES:
        config = default_config(spec.pipeline)
        assert config.source.value == spec.name and config.threshold == spec.threshold
        assert list(inspect.signature(reader_of(spec.name)).parameters) == ["data", "options"]


@pytest.mark.parametrize("source", [spec.name for spec in SOURCES])
def test_every_column_a_suite_checks_is_a_computed_feature(source):
    import numpy as np

    labels = np.arange(20) % 10
    pixels = np.zeros((20, 784), np.uint8)
    table = to_table(np.arange(1, 21), labels, pixels, Source(source))
    features = row_features(table, noisy=Source(source).spec.background_noise)
    assert tuple(features.columns) == ROW_COLUMNS
    assert [str(features[c].dtype) for c in ROW_COLUMNS] == [f.dtype for f in ROW_FEATURES]
    computed_dataset = {"train_test_shared_rows", *drift(features, features)}
    assert computed_dataset == set(DATASET_COLUMNS)
    for batch in TEMPLATES:
        available = set(DATASET_COLUMNS) if batch == "dataset" else set(ROW_COLUMNS)
        for held in CONDITIONS[batch]:
            suite = resolve(source, batch, held)
            assert suite["expectations"] or (batch, held) == ("dataset", []), held  # no test split: nothing to compare
            assert columns_checked(suite) <= available, (batch, held)
            assert all(e["meta"]["intent"] and e["meta"]["id"] for e in suite["expectations"])


def test_sources_override_the_templates_by_id():
    noisy = {e["meta"]["id"]: e for e in resolve("noisy", "train")["expectations"]}
    kaggle = {e["meta"]["id"]: e for e in resolve("kaggle", "train")["expectations"]}
    assert set(kaggle) - set(noisy) == {"border", "size"}  # dropped under a noise background
    assert noisy["ink"]["type"] == "expect_column_median_to_be_between" and "mostly" not in noisy["ink"]["kwargs"]
    assert noisy["orientation"]["kwargs"]["mostly"] == 0.65 and kaggle["orientation"]["kwargs"]["mostly"] == 0.7
    test = {e["meta"]["id"] for e in resolve("kaggle", "test", ["unlabelled"])["expectations"]}
    assert "labels-absent" in test and "labels-present" not in test
    assert {e["meta"]["id"] for e in resolve("folder", "dataset", [])["expectations"]} == set()  # no test split


def test_suites_show_prints_the_resolved_suites(cli, home):
    result = cli("suites", "show", "noisy")
    assert result.code == 0, result.err
    decoder, text, suites = json.JSONDecoder(), result.out.strip(), []
    while text:
        suite, end = decoder.raw_decode(text)
        suites.append(suite)
        text = text[end:].strip()
    assert [s["name"] for s in suites] == ["noisy-train", "noisy-test", "noisy-dataset"]
    assert "expect_column_median_to_be_between" in {e["type"] for e in suites[0]["expectations"]}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_schemas_import_nothing_from_components_or_flows():
    """The contracts are the bottom layer: components and flows import them, never the other way."""
    for path in sorted((ROOT / "schemas").rglob("*.py")):
        upward = {m for m in _imports(path) if m.split(".")[0] in ("components", "flows")}
        assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}"


def test_components_never_import_prefect():
    for path in sorted((ROOT / "components").rglob("*.py")):
        assert not {m for m in _imports(path) if m.split(".")[0] in ("prefect", "flows")}, path
