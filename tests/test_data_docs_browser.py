"""Data Docs as a person opens them: headless Chromium renders a failing run's validation page.

Skipped only where Chromium is absent; .ci/run installs Debian's chromium.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import datagen

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package: chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_failing_run_data_docs_render_the_failed_expectations(cli, home, tmp_path):
    labels, train = datagen.digits(60, seed=21)
    _, test = datagen.digits(40, seed=22)
    train[::8] = 255 - train[::8]  # an inverted batch: the border expectation fails
    folder = tmp_path / "kaggle"
    datagen.write_kaggle_arrays(folder, labels, train, test)
    assert cli("ingest", "--source", "kaggle", "--data", folder).code == 0
    assert cli("validate", "--set", "validate.min_rows=10").code == 2
    (run,) = (home / "runs").iterdir()
    docs = run / "validate"
    pages = [p for p in (docs / "validations").rglob("*.html")
             if "border_mean" in p.read_text(errors="replace")]
    assert pages, "no Data Docs validation page mentions the failed expectation's column"

    index = _chromium("--dump-dom", (docs / "index.html").as_uri(), profile=tmp_path / "profile")
    assert index.returncode == 0, index.stderr[-2000:]
    assert "Failed" in index.stdout or "failed" in index.stdout  # the index lists the failing validation

    page = _chromium("--dump-dom", pages[0].as_uri(), profile=tmp_path / "profile")
    assert "border_mean" in page.stdout and "Failed" in page.stdout

    shot = tmp_path / "validation.png"
    taken = _chromium(f"--screenshot={shot}", "--window-size=1280,1600", pages[0].as_uri(),
                      profile=tmp_path / "profile")
    assert taken.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    failed = json.loads((docs / "results.json").read_text())
    assert not failed["passed"]
