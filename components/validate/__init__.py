"""The validate stage: Great Expectations suites (schemas/suites, resolved per source) run on derived
features.

Writes `results.json` (every expectation, its observed value, pass/fail), the resolved suites it ran
(`suites/<source>-<batch>.json`) and a Data Docs site (`index.html`) into the stage folder, and returns a
Validation artifact saying whether it passed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow.parquet as pq

from components.validate.features import drift, row_features
from schemas.artifacts import Examples, Validation
from schemas.config import ValidateConfig
from schemas.dataset import Split
from schemas.suites import load_suite, resolve

RESULTS_JSON = "results.json"
SUITES = "suites"  # the resolved suites this run checked, as JSON
MAX_KS = 0.1  # train/test drift threshold on the real data sets (observed: < 0.02)
KS_C_ALPHA_001 = 1.949  # c(alpha) of the two-sample KS test: sqrt(-ln(alpha / 2) / 2)


def run(examples: Examples, config: ValidateConfig, out_dir: Path, *, limit: int | None = None,
        progress: Callable[[str], None] = lambda _: None, dask_address: str | None = None) -> Validation:
    """Validate every split of examples and the dataset as a whole; write results and Data Docs.

    limit: the ingest limit the rows were cut to, if any (lowers the expected row counts). dask_address: the
    per-row features are computed on that scheduler's workers, a row group each (the same results).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    pd.options.mode.copy_on_write = True  # GX ran 6x slower without it on pandas 2.x
    gx_loggers = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "great_expectations"]
    for name in ["great_expectations", *gx_loggers]:  # some GX modules set INFO on their own logger
        logging.getLogger(name).setLevel(logging.ERROR)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress("computing features")
    noisy = examples.source.spec.background_noise
    features = {split: features_of(examples.parquet(split), noisy=noisy, dask_address=dask_address)
                for split in examples.counts}
    has_test = Split.test.value in features
    dataset = pd.DataFrame([{"train_test_shared_rows": examples.duplicates.get("train_test_shared_rows", 0),
                             **(drift(features["train"], features["test"]) if has_test else {})}])
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)  # stderr is for errors
    context.add_data_docs_site("digits", {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(out_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    source = context.data_sources.add_pandas(examples.source.value)
    batches = [(split, frame, resolve(examples.source, split, _conditions(examples, split)))
               for split, frame in features.items()]
    batches.append(("dataset", dataset, resolve(examples.source, "dataset", ["test"] if has_test else [])))
    (out_dir / SUITES).mkdir()
    validations = []
    for name, frame, spec in batches:
        progress(f"validating {name}")
        (out_dir / SUITES / f"{spec['name']}.json").write_text(json.dumps(spec, indent=1) + "\n")
        suite_name = spec["name"]
        batch_definition = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(load_suite(spec))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch_definition,
                                                                                suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(  # Data Docs built once, after the last (below)
            name=name, validation_definitions=[definition], actions=[], result_format={"result_format": "SUMMARY"}))
        parameters = {"min_rows": _min_rows(examples, name, config, limit),
                      "max_ks": _max_ks(len(features["train"]), len(features["test"])) if has_test else MAX_KS}
        result = checkpoint.run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters)
        validations.append((name, suite_name, next(iter(result.run_results.values())), parameters))
    context.build_data_docs(site_names=["digits"])  # every suite and result: once, not after each checkpoint
    _offline_styles(out_dir)
    report = _report(validations)
    report["dataset"] = statistics = {k: _plain(v) for k, v in dataset.iloc[0].items()}
    if examples.review:  # labels a person fixed (ingest.review): said beside the results they shaped
        report["label_review"] = statistics["label_review"] = {
            k: examples.review[k] for k in ("file", "sha256", "relabelled", "unchanged", "dropped")}
    (out_dir / RESULTS_JSON).write_text(json.dumps(report, indent=1, default=str) + "\n")
    _page(out_dir, report, examples)
    failures = [f"{r['batch']}: {r['expectation']}({r['column']}) observed {r['observed']}"
                for r in report["results"] if not r["success"]]
    return Validation(dir=out_dir, passed=not failures, failures=failures,
                      evaluated=len(report["results"]), statistics=statistics)


def features_of(parquet: Path, *, noisy: bool, dask_address: str | None = None) -> pd.DataFrame:
    """The per-row features of a canonical Parquet file, computed row group by row group: memory holds one group's
    pixels and the features (~40 bytes a row), never the whole split's pixels (784 bytes a row). With
    dask_address, each row group's features are computed by a worker of that scheduler, which reads the group
    from the file itself (the run folder is on a path every worker sees, as for convert.runner=dask)."""
    from components.parallel import ordered_map

    reader = pq.ParquetFile(parquet)
    groups = reader.metadata.num_row_groups
    if not groups:
        return row_features(reader.schema_arrow.empty_table(), noisy=noisy)
    frames = list(ordered_map(functools.partial(_group_features, parquet, noisy=noisy), range(groups), dask_address))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _group_features(parquet: Path, group: int, *, noisy: bool) -> pd.DataFrame:
    return row_features(pq.ParquetFile(parquet).read_row_group(group), noisy=noisy)


# GX's Data Docs take bootstrap and the Font Awesome status icons from CDNs: without network the
# status cells are empty. These rules draw the marks and table lines from the page itself (and are
# more specific than Font Awesome's, so the page looks the same online).
_OFFLINE_STYLE = """<style id="digits-offline">
i.fas.fa-check-circle::before { content: "\\2714"; color: #1e7e34; font: bold 1.1em sans-serif; }
i.fas.fa-times::before { content: "\\2718"; color: #c82333; font: bold 1.1em sans-serif; }
table { border-collapse: collapse; margin: 0.4em 0 1em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; vertical-align: top; }
body { font-family: sans-serif; margin: 1em 2em; }
</style>
"""


def _offline_styles(site: Path) -> None:
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        if 'id="digits-offline"' not in html:
            page.write_text(html.replace("</head>", _OFFLINE_STYLE + "</head>", 1), encoding="utf-8")


def _plain(value: Any) -> float | int:
    return value.item() if hasattr(value, "item") else value


def _conditions(examples: Examples, split: str) -> list[str]:
    """Which `when` conditions of the templates hold for a split (schemas.suites)."""
    return ["labelled" if examples.labelled.get(split) else "unlabelled"]


def _max_ks(n: int, m: int, floor: float = MAX_KS) -> float:
    """Drift threshold: MAX_KS, or the two-sample KS critical value at alpha=0.001 when that is larger
    (small splits differ by chance alone)."""
    return max(floor, KS_C_ALPHA_001 * math.sqrt((n + m) / (n * m)))


def _min_rows(examples: Examples, batch: str, config: ValidateConfig, limit: int | None) -> int:
    if batch == "dataset":
        return 1
    if config.min_rows is not None:
        return config.min_rows
    published = examples.source.spec.published_rows.get(batch)
    if published is None:  # a collection of one's own has no published size
        return 1
    return min(published, limit) if limit else published


def _resolved(value: Any, parameters: dict[str, Any]) -> Any:
    """An expectation's argument with its {"$PARAMETER": name} placeholders replaced by the value it ran with."""
    if isinstance(value, dict):
        if set(value) == {"$PARAMETER"}:
            return parameters.get(value["$PARAMETER"], value)
        return {k: _resolved(v, parameters) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolved(v, parameters) for v in value]
    return value


def _report(validations: list[tuple[str, str, Any, dict[str, Any]]]) -> dict[str, Any]:
    results = []
    for batch, suite_name, outcome, parameters in validations:
        for r in outcome.results:
            config = r.expectation_config
            observed = r.result.get("observed_value")
            if observed is None and "unexpected_percent" in r.result:
                examples = r.result.get("partial_unexpected_list") or []
                observed = f"{r.result['unexpected_percent']:.3g}% unexpected" + (
                    f", e.g. {', '.join(_short(v) for v in examples[:3])}" if examples else "")
            results.append({"batch": batch, "suite": suite_name, "expectation": config.type,
                            "column": config.kwargs.get("column") or config.kwargs.get("column_A") or "",
                            "intent": (config.meta or {}).get("intent", ""), "success": bool(r.success),
                            "observed": observed,
                            "expected": {k: _resolved(v, parameters) for k, v in config.kwargs.items()
                                         if k not in ("column", "batch_id", "result_format")}})
    return {"passed": all(r["success"] for r in results), "results": results}


PAGE = "report.html"


def _page(out_dir: Path, report: dict[str, Any], examples: Examples) -> None:
    """report.html: every suite with every expectation — what it checks, the value it expected (placeholders
    resolved), what was observed, passed or failed. No scripts, no CDN: it opens offline, unlike GX's Data Docs
    index (index.html), whose table is drawn by scripts from CDNs."""
    import html

    from components import pages

    e = html.escape
    suites: dict[str, list[dict[str, Any]]] = {}
    for result in report["results"]:
        suites.setdefault(result["suite"], []).append(result)
    failed = sum(not r["success"] for r in report["results"])
    summary = "".join(
        f'<tr><td><a href="#{e(suite)}">{e(suite)}</a></td><td>{e(found[0]["batch"])}</td>'
        f'<td class="{"failed" if any(not r["success"] for r in found) else "passed"}">'
        f'{"failed" if any(not r["success"] for r in found) else "passed"}</td>'
        f'<td>{sum(r["success"] for r in found)} of {len(found)}</td></tr>' for suite, found in suites.items())
    sections = []
    for suite, found in suites.items():
        rows = "".join(
            f'<tr><td class="{"passed" if r["success"] else "failed"}">{"&#10004;" if r["success"] else "&#10008;"}</td>'
            f'<td>{e(r["expectation"])}</td><td>{e(r["column"])}</td>'
            f'<td>{e(", ".join(f"{k}={_short(v)}" for k, v in r.get("expected", {}).items()))}</td>'
            f'<td>{e(_short(r["observed"]))}</td><td>{e(r["intent"])}</td></tr>' for r in found)
        sections.append(f'<h2 id="{e(suite)}">{e(suite)}</h2><table><tr><th></th><th>expectation</th><th>column</th>'
                        f'<th>expected</th><th>observed</th><th>what it checks</th></tr>{rows}</table>')
    body = (f"<h1>Validation of {e(examples.source.value)}</h1>"
            f'<p class="{"failed" if failed else "passed"}"><b>{len(report["results"]) - failed} of '
            f'{len(report["results"])} expectations passed</b> in {len(suites)} suites (Great Expectations, on per-row '
            f"features of the canonical dataset). The suites as run: <code>suites/</code>; every result as JSON: "
            f'<a href="{RESULTS_JSON}">{RESULTS_JSON}</a>; GX\'s own Data Docs: <a href="index.html">index.html</a> '
            "(its tables need their CDN scripts).</p>"
            f"<table><tr><th>suite</th><th>batch</th><th>result</th><th>passed</th></tr>{summary}</table>"
            + _review(examples) + "".join(sections))
    pages.write(out_dir / PAGE, f"digits: validation of {examples.source.value}", body,
                pages.nav(out_dir.parent, "validate"))


def _review(examples: Examples) -> str:
    """What a label-review file changed on ingest (ingest.review), before the data was validated."""
    import html

    review = examples.review
    if not review:
        return ""
    return (f'<h2 id="label-review">Label review applied</h2><p>{html.escape(review["file"])} (sha256 '
            f'<code>{review["sha256"][:16]}</code>): <b>{review["relabelled"]} relabelled, {review["dropped"]} '
            f'dropped</b> ({review["unchanged"]} decisions kept the label they had) in the train split before '
            f'validation; which: <a href="../ingest/{examples.REVIEW_APPLIED}">{examples.REVIEW_APPLIED}</a>.</p>')


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
