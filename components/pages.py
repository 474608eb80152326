"""What the pages of a run share: a line of links to the run page and the other stages' pages (those written by
then: a page links back to the stages before it; the run page, rewritten as the run goes, links to all), and to
the MLflow run when a tracking server is configured. Relative links only, so a run folder opens anywhere offline.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

# (label, path under the run folder), in pipeline order
PAGES = (("run", "index.html"), ("EDA", "ingest/eda/index.html"), ("validation", "validate/report.html"),
         ("label review", "review/report.html"), ("tune", "tune/report.html"), ("evaluation", "evaluate/report.html"), ("model card", "register/model_card.html"))
STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.2em} td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top} .passed{color:#1a7f37} .failed,.refused{color:#cf222e} img{max-width:100%;display:block;margin:.8em 0}
nav{margin-bottom:1em;padding-bottom:.5em;border-bottom:1px solid #ddd} nav a{margin-right:1.2em}"""


def nav(run_dir: Path, here: str, mlflow_run: str | None = None) -> str:
    """The links bar of a page in the stage folder `here` (a page at run_dir/<here>/...)."""
    depth = len(Path(here).parts)
    up = "../" * depth
    links = []
    for label, path in PAGES:
        target = run_dir / path
        if path.startswith(f"{here}/") or (label != "run" and not target.is_file()):
            continue
        links.append(f'<a href="{html.escape(up + path)}">{html.escape(label)}</a>')
    url = mlflow_run_url(mlflow_run)
    if url:
        links.append(f'<a href="{html.escape(url)}">MLflow run</a>')
    return "<nav>" + "".join(links) + "</nav>"


def mlflow_run_url(run_id: str | None) -> str | None:
    """The MLflow UI's page of a run when MLFLOW_TRACKING_URI names a tracking server (components.tracking)."""
    from components.tracking import ui_run_link

    return ui_run_link(os.environ.get("MLFLOW_TRACKING_URI", ""), run_id)


def write(path: Path, title: str, body: str, nav_html: str = "") -> Path:
    """A self-contained page (no scripts, no CDN) written under a temporary name and renamed."""
    from schemas.runs import write_text_atomic

    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{nav_html}\n{body}\n</body></html>\n")
    write_text_atomic(path, page)
    return path
