"""Knowing when an input is not a digit (issue 37): the evaluate stage fits an out-of-distribution detector
for the model it evaluates, the registry keeps it with the version, and `digits predict --reject-ood` says
'not a digit' for noise, checkerboards and the like. How well it separates is measured on real data in
tests/benchmarks/test_bench_ood.py; here, on a small model, what a user relies on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import datagen
import nondigits
from components import ood


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A 1-epoch digits-net on 400 synthetic Kaggle digits, through the whole pipeline into the registry."""
    from flows.cli import main  # the cli fixture is one test's: a module's run calls the entry point itself

    root = tmp_path_factory.mktemp("ood")
    data = root / "kaggle"
    datagen.write_kaggle(data, n_train=400, n_test=20)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIGITS_HOME", str(root / "home"))
        patch.setattr("sys.argv", ["digits", "run", "train-kaggle", "--data", str(data), "--set", "validate.min_rows=10",
                                   "--set", "train.epochs=1", "--set", "evaluate.threshold=0"])
        try:
            main()
        except SystemExit as exc:
            assert not exc.code
    (run,) = (root / "home" / "runs").iterdir()
    return root / "home", run


def _images(folder: Path, per_category: int = 10) -> Path:
    folder.mkdir()
    for k, (category, image) in enumerate(nondigits.images(per_category, seed=7)):
        image.save(folder / f"{category}-{k:03d}.png")
    return folder


def test_evaluate_fits_a_detector_that_keeps_the_val_digits_and_the_registry_keeps_it(registered):
    home, run = registered
    metrics = json.loads((run / "evaluate/metrics.json").read_text())
    assert metrics["ood"]["file"] == "ood.npz" and metrics["ood"]["keep"] == 0.99
    assert metrics["ood"]["val_kept"] >= 0.99  # the threshold is the val scores' 99th percentile (the next one up)
    detector = ood.Detector.load(run / "evaluate/ood.npz")
    record = json.loads((run / "run.json").read_text())
    assert detector.model_sha256 == record["stages"]["calibrate"]["hashes"]["model.keras"]  # the model evaluated
    assert "ood.npz" in record["stages"]["evaluate"]["hashes"]  # verified like every content file


def test_predict_reject_ood_says_not_a_digit_for_noise_and_checkerboards(cli, registered, tmp_path, monkeypatch):
    home, run = registered
    monkeypatch.setenv("DIGITS_HOME", str(home))
    images = _images(tmp_path / "images")
    for uri in ("models:/digits-kaggle@champion", str(run / "calibrate/model.keras"), str(run / "export/model.keras")):
        result = cli("predict", uri, images, "--reject-ood")
        assert result.code in (0, 1), result.err  # blank-ish scans may have no digit to find: one line each
        rows = [line.split("\t") for line in result.out.splitlines() if line.startswith(str(images))]
        verdicts = {Path(row[0]).name: row for row in rows}
        obvious = [row for name, row in verdicts.items() if name.startswith(("noise", "checkerboard"))]
        assert len(obvious) == 20
        rejected = [row for row in obvious if row[1] == "-" and row[3].startswith("no (out-of-distribution score ")]
        assert len(rejected) >= 16, rows  # a 1-epoch model on 360 images: most; the benchmark measures the rate
    plain = cli("predict", "models:/digits-kaggle@champion", images)
    labels = [line.split("\t")[1] for line in plain.out.splitlines() if line.startswith(str(images))]
    assert len(labels) >= 50 and all(label.isdigit() for label in labels), plain  # off unless asked


def test_reject_ood_without_a_detector_for_that_model_is_one_line(cli, registered, tmp_path):
    home, run = registered
    alone = tmp_path / "model.keras"
    shutil.copyfile(run / "train/model.keras", alone)
    digit = tmp_path / "seven.png"
    from strokes import draw_digit

    draw_digit(7, digit)
    result = cli("predict", alone, digit, "--reject-ood")
    assert result.code == 2 and result.err.strip() == (
        f"digits: error: {alone}: no out-of-distribution detector fitted for this model (the evaluate stage writes "
        "one, ood.npz, for the model it evaluates); use a models:/ URI or a run's model")
    other = ood.Detector.load(run / "evaluate/ood.npz")  # a detector fitted for another model is not used
    ood.Detector(**{**other.__dict__, "model_sha256": "0" * 64}).save(tmp_path / "ood.npz")
    result = cli("predict", alone, digit, "--reject-ood")
    assert result.code == 2 and "no out-of-distribution detector fitted for this model" in result.err
    (tmp_path / "ood.npz").write_bytes(b"not numpy")
    result = cli("predict", alone, digit, "--reject-ood")
    assert result.code == 2 and "ood.npz: not an out-of-distribution detector" in result.err
