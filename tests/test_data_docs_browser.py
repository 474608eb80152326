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

from components.train import processor_name

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package: chromium)")]
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


def test_the_runs_entry_page_shows_every_suite_and_the_evaluation_offline(cli, home, tmp_path):
    """`<run>/index.html` is static: with every network request refused (as on a closed company network,
    where the Data Docs tables stay empty), Chromium still renders each suite's result, the failed
    expectations with their observed values, and links into the Data Docs and the evaluation report."""
    labels, train = datagen.digits(100, seed=21)
    _, test = datagen.digits(40, seed=22)
    train[::8] = 255 - train[::8]  # inverted images: the border expectation fails; warn lets the run go on
    folder = tmp_path / "kaggle"
    datagen.write_kaggle_arrays(folder, labels, train, test)
    result = cli("run", "train-kaggle", "--data", folder, "--set", "validate.min_rows=10", "--set",
                 "validate.fail_on=warn", "--set", "train.epochs=1", "--set", "train.model=baseline",
                 "--set", "evaluate.threshold=0")
    assert result.code == 0, result.err
    (run,) = (home / "runs").iterdir()
    listed = cli("reports", run.name)
    assert listed.out.splitlines()[0] == f"run page: {run / 'index.html'}"  # what a person opens first

    offline = ["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]
    dom = _chromium(*offline, "--dump-dom", (run / "index.html").as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert "<script" not in (run / "index.html").read_text()
    for suite in ("kaggle-train", "kaggle-test", "kaggle-dataset"):
        assert suite in text
    assert "failed" in text and "passed" in text
    border = next(r for r in json.loads((run / "validate/results.json").read_text())["results"]
                  if not r["success"] and r["column"] == "border_mean")
    assert "border_mean" in text and str(border["observed"]) in text
    assert 'href="evaluate/report.html"' in text and "Validation accuracy" in text
    linked = [a.split('"')[0] for a in text.split('href="')[1:] if a.startswith("validate/validations/")]
    assert len(linked) == 3 and all((run / link).is_file() for link in linked)  # one Data Docs page per suite
    shot = tmp_path / "run.png"
    taken = _chromium(*offline, f"--screenshot={shot}", "--window-size=1100,1400", (run / "index.html").as_uri(),
                      profile=tmp_path / "profile")
    assert taken.returncode == 0 and shot.stat().st_size > 20_000

    # every link on the run page resolves: to a file of the run, or (with a tracking server) the MLflow UI
    import re

    links = re.findall(r'href="([^"]+)"', (run / "index.html").read_text())
    assert len(links) >= 8 and all((run / link).exists() for link in links if "://" not in link), links
    # the validation report: every suite with every result, offline, no placeholders (GX's index is empty offline)
    validation = _chromium(*offline, "--dump-dom", (run / "validate/report.html").as_uri(), profile=tmp_path / "profile")
    results = json.loads((run / "validate/results.json").read_text())["results"]
    for suite in ("kaggle-train", "kaggle-test", "kaggle-dataset"):
        assert f'id="{suite}"' in validation.stdout
    assert validation.stdout.count("<tr>") >= len(results) and "$PARAMETER" not in validation.stdout
    assert f"{sum(r['success'] for r in results)} of {len(results)} expectations passed" in validation.stdout
    # the evaluation report shows the training curves; the EDA page its pictures with their numbers
    evaluation = _chromium(*offline, "--dump-dom", (run / "evaluate/report.html").as_uri(), profile=tmp_path / "profile")
    assert "Training curves" in evaluation.stdout and 'alt="training"' in evaluation.stdout
    assert 'href="../index.html"' in evaluation.stdout and 'href="../validate/report.html"' in evaluation.stdout
    eda = _chromium(*offline, "--dump-dom", (run / "ingest/eda/index.html").as_uri(), profile=tmp_path / "profile")
    assert "Label counts" in eda.stdout and 'src="label_counts.png"' in eda.stdout and "smallest / largest" in eda.stdout
    # the run's copy of the model card links back to the run and its pages (the registry's copy is the card alone)
    card = (run / "register/model_card.html").read_text()
    assert 'href="../index.html"' in card and 'href="../evaluate/report.html"' in card
    for page in ("validate/report.html", "evaluate/report.html", "ingest/eda/index.html", "register/model_card.html"):
        for link in re.findall(r'(?:href|src)="([^"]+)"', (run / page).read_text()):
            if link.startswith("#"):  # an anchor of the page itself
                assert f'id="{link[1:]}"' in (run / page).read_text(), (page, link)
                continue
            assert "://" in link or link.startswith("data:") or (run / page).parent.joinpath(link).exists(), (page, link)


def test_the_model_card_of_a_registered_version_renders_its_sections_offline(cli, home, tmp_path):
    """`digits registry show NAME VERSION` says where the version's model card is; the registry's copy
    opens in Chromium with no network and shows every section, its tables and its pictures."""
    from components.model_card import SECTIONS

    folder = tmp_path / "kaggle"
    datagen.write_kaggle(folder, n_train=200, n_test=20, seed=5)
    result = cli("run", "train-kaggle", "--data", folder, "--set", "validate.min_rows=10", "--set", "train.epochs=1",
                 "--set", "train.model=baseline", "--set", "evaluate.threshold=0")
    assert result.code == 0, result.err
    shown = cli("registry", "show", "digits-kaggle", "1")
    assert shown.code == 0, shown.err
    card_uri = next(line.split(": ", 1)[1] for line in shown.out.splitlines() if line.startswith("model card: "))
    assert card_uri.startswith("file://") and card_uri.endswith("/version-1/model_card.html")

    offline = ["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]
    dom = _chromium(*offline, "--dump-dom", card_uri, profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert "Model card: digits-kaggle version 1" in text and "<nav>" not in text  # no run folder beside it here
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in text, section
    assert text.count('src="data:image/png;base64,') == 4  # training curves, robustness, calibration, confusion
    assert "Wilson" in text and "seen.npz" in text and "train split" in text
    processor = processor_name()
    assert f"1 epoch on CPU{f' ({processor})' if processor else ''}, " in text  # where it trained, for its seconds
    shot = tmp_path / "card.png"
    taken = _chromium(*offline, f"--screenshot={shot}", "--window-size=1100,3000", card_uri,
                      profile=tmp_path / "profile")
    assert taken.returncode == 0 and shot.stat().st_size > 50_000
