"""The documentation: the docs site builds in strict mode (a broken link, a missing anchor or a page left out of
the navigation fails it), the README stays a guide a person reads (at most 30 kB), and neither speaks of how or
where digits was developed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {"index.html", "stages/index.html", "serving/index.html", "benchmarks/index.html"} <= pages


def test_the_readme_is_a_guide_and_its_links_into_docs_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 30_000
    for target in re.findall(r"\]\((docs/[^)#\s]+)", readme):
        assert (ROOT / target).is_file(), target
    first_screen = "\n".join(readme.splitlines()[:40])
    assert "make run" in first_screen and "make test" in first_screen


def test_the_docs_speak_of_the_product_not_of_how_it_was_built():
    words = re.compile(r"\blent\b|device tool|development machine|can_start_another|\bsession\b", re.I)
    found = [f"{p.name}: {m.group(0)}" for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             for m in words.finditer(p.read_text())]
    assert not found, found
