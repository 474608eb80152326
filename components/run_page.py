"""A run's entry page, `<run>/index.html`: static HTML (no scripts, no CDN), so it opens anywhere —
offline, on a company network, from a file share. What `digits reports RUN` prints first.

It lists the stages (status, seconds, links to each stage's reports as the stage graph declares them),
every validation suite's result (passed/failed, counts, each failed expectation with its observed
value, links into the Data Docs pages) and the evaluation's gate with a link to its report. Written
again whenever the run's record changes (flows.runner).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from schemas.artifacts import Reviewed
from schemas.runs import RunFolder

PAGE = "index.html"
_STYLE = """body { font-family: sans-serif; margin: 1.5em 2em; color: #222; }
table { border-collapse: collapse; margin: 0.4em 0 1.2em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
.passed, .completed { color: #1e7e34; } .failed { color: #c82333; } .stale, .running { color: #946200; }
code { font-size: 0.95em; }"""


def write(folder: RunFolder, graph) -> Path:
    """(Re)write the run's entry page from run.json and the stage folders; returns its path."""
    record = folder.load()
    parts = [f"<h1>Run <code>{_e(record.run_id)}</code></h1>",
             f"<p>Pipeline <b>{_e(record.pipeline)}</b>, status <b class=\"{_e(record.status)}\">{_e(record.status)}"
             f"</b>, created {_e(record.created_at)}, code {_e(record.code_version)}.</p>",
             _stages(folder, record, graph), _validation(folder), _evaluation(folder, record)]
    if record.warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{_e(w)}</li>" for w in record.warnings) + "</ul>")
    from components.pages import mlflow_run_url

    for name, stage in record.stages.items():  # with a tracking server: the training's run in the MLflow UI
        url = mlflow_run_url(stage.outputs.get("mlflow_run_id"))
        if url:
            parts.append(f'<p>The {_e(name)} stage\'s <a href="{_e(url)}">MLflow run</a>.</p>')
    parts.append('<p><a href="run.json">run.json</a>: the full record.</p>')
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>digits run {_e(record.run_id)}"
            f"</title><style>{_STYLE}</style></head><body>\n" + "\n".join(p for p in parts if p) + "\n</body></html>\n")
    path = folder.root / PAGE
    partial = folder.root / f".{PAGE}.partial"
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, path)
    return path


def _stages(folder: RunFolder, record, graph) -> str:
    rows = []
    for name, stage_record in record.stages.items():
        links = []
        if name in graph.names() and stage_record.status in ("completed", "stale", "failed"):
            for report in graph.stage(name).reports:
                target = folder.stage_dir(name) / report.path
                if target.exists():
                    links.append(f'<a href="{_e(f"{name}/{report.path}")}">{_e(report.label)}</a>')
        seconds = f"{stage_record.seconds:.1f}" if stage_record.seconds is not None else ""
        note = stage_record.error or ("reused from " + str(stage_record.outputs["cached_from"])
                                      if "cached_from" in stage_record.outputs else "")
        rows.append(f"<tr><td>{_e(name)}</td><td class=\"{_e(stage_record.status)}\">{_e(stage_record.status)}</td>"
                    f"<td>{seconds}</td><td>{' · '.join(links)}</td><td>{_e(note)}</td></tr>")
    return ("<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>seconds</th><th>reports</th><th>note</th></tr>"
            + "".join(rows) + "</table>")


def _validation(folder: RunFolder) -> str:
    results_file = folder.stage_dir("validate") / "results.json"
    if not results_file.is_file():
        return ""
    results = json.loads(results_file.read_text())["results"]
    suites: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        suites.setdefault(result["suite"], []).append(result)
    site = folder.stage_dir("validate")
    rows, failures = [], []
    for suite, found in suites.items():
        failed = [r for r in found if not r["success"]]
        pages = sorted(site.glob(f"validations/{suite}/**/*.html"))
        docs = [f'<a href="{_e(p.relative_to(folder.root).as_posix())}">results</a>' for p in pages[-1:]]
        expectations = site / "expectations" / f"{suite}.html"
        if expectations.is_file():
            docs.append(f'<a href="{_e(expectations.relative_to(folder.root).as_posix())}">expectations</a>')
        state = "failed" if failed else "passed"
        rows.append(f"<tr><td>{_e(suite)}</td><td>{_e(found[0]['batch'])}</td><td class=\"{state}\">{state}</td>"
                    f"<td>{len(found) - len(failed)} of {len(found)} passed</td><td>{' · '.join(docs)}</td></tr>")
        failures += [f"<tr><td>{_e(suite)}</td><td>{_e(r['expectation'])}</td><td>{_e(r['column'])}</td>"
                     f"<td>{_e(r['observed'])}</td><td>{_e(r['intent'])}</td></tr>" for r in failed]
    text = ('<h2>Validation</h2><p>Great Expectations suites: every result in the <a href="validate/report.html">'
            'validation report</a>; GX\'s own <a href="validate/index.html">Data Docs</a> need their CDN scripts for '
            "their tables, the pages linked below do not.</p>"
            "<table><tr><th>suite</th><th>batch</th><th>result</th><th>expectations</th><th>Data Docs</th></tr>"
            + "".join(rows) + "</table>")
    if failures:
        text += ("<h3>Failed expectations</h3><table><tr><th>suite</th><th>expectation</th><th>column</th>"
                 "<th>observed</th><th>intent</th></tr>" + "".join(failures) + "</table>")
    return text


def _evaluation(folder: RunFolder, record) -> str:
    metrics_file = folder.stage_dir("evaluate") / "metrics.json"
    if not metrics_file.is_file():
        return ""
    metrics = json.loads(metrics_file.read_text())
    gate = metrics.get("gate", {})
    promoted = ""
    if record.promotion_reason is not None:
        promoted = (f"<p>Registry: version {record.registry_version}, "
                    f"{'champion' if record.promoted else 'not champion'}.</p>" if record.registry_version
                    else "<p>Registry: not registered.</p>")
    return (f"<h2>Evaluation</h2><p>Validation accuracy <b>{100 * metrics['val_accuracy']:.2f}%</b> on "
            f"{metrics.get('val_rows', 0):,} images; gate <b class=\"{'passed' if gate.get('passed') else 'failed'}\">"
            f"{'passed' if gate.get('passed') else 'refused'}</b>: {_e(gate.get('reason', ''))}.</p>{promoted}"
            '<p><a href="evaluate/report.html">Evaluation report</a> (confusion matrix, errors, robustness).</p>')


def _e(value: Any) -> str:
    return html.escape(str(value))


def summary(folder: RunFolder) -> list[str]:
    """What happened, in a few lines, for the end of `digits run` and the flow run's summary artifact: the pipeline
    and status; val accuracy (and test accuracy where the test split has labels); the gate's decision; the registry
    version and alias; warnings; the run page. A failed run: its stage, the one-line reason and the resume command."""
    record = folder.load()
    status = record.effective_status()
    lines = [f"{record.pipeline} run {record.run_id}: {status.replace('_', ' ')}"]
    failed = [(name, s) for name, s in record.stages.items() if s.status == "failed"]
    if status in ("failed", "interrupted"):
        if failed:
            name, stage = failed[-1]
            lines.append(f"failed at stage {name}: {stage.error or 'no reason recorded'}")
        else:
            outside = [w.removeprefix("failed outside its stages: ") for w in record.warnings
                       if w.startswith("failed outside its stages: ")]
            lines.append(f"failed: {outside[-1] if outside else 'interrupted before its stages could record why'}")
        lines.append(f"fix the cause, then continue it: digits resume {record.run_id}")
    evaluated = record.stages.get("evaluate")
    if evaluated is not None and evaluated.status == "completed":
        out = evaluated.outputs
        accuracy = f"val accuracy {out.get('val_accuracy', 0):.2%}"
        exported = record.stages.get("export")
        test = exported.outputs.get("test_accuracy") if exported is not None and exported.status == "completed" else None
        if test is not None:
            accuracy += f"; test accuracy {test:.2%} on {exported.outputs.get('test_rows', 0):,} images it never saw"
        lines.append(accuracy)
        lines.append(f"gate {'passed' if out.get('passed') else 'refused'}: {out.get('reason', '')}")
    reviewed = record.stages.get("review")
    if reviewed is not None and reviewed.status == "completed":
        out = reviewed.outputs
        share = out.get("estimated_wrong_share")
        lines.append(f"label review: {out.get('suspects', 0):,} suspect labels of {out.get('images', 0):,}"
                     + (f" (estimated wrong: {share:.2%})" if share is not None else "")
                     + f": {folder.stage_dir('review') / Reviewed.REPORT}")
    registered = record.stages.get("register")
    if registered is not None and registered.status == "completed":
        out = registered.outputs
        if out.get("version"):
            name, version = out.get("model_name"), out.get("version")
            lines.append(f"registry: {name} version {version}" + (f", now champion (models:/{name}@champion)"
                                                                  if out.get("promoted") else ", not champion"))
        else:
            lines.append("registry: not registered")
    lines += [f"warning: {w}" for w in record.warnings if not w.startswith("failed outside its stages: ")]
    page = folder.root / PAGE
    if page.is_file():
        lines.append(f"run page: {page.as_uri()}")
    return lines
