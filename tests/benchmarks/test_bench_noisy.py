"""Noisy digits (issue 18): the robust clean base, train-noisy fine-tuned from it, and how the final model
degrades when the background noise is weaker or stronger than the benchmark's.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_noisy.py   (about 20 minutes on 2 cores)
1. `digits run train-mnist --preset robust` on the shared MNIST files (the champion, 12 epochs);
2. `digits run train-noisy` on the noisy set made by ../shared/data/noisy/make_noisy.py (defaults: the
   champion fine-tuned, every weight, 8 epochs, on the noisy train split and the champion's own 54,000
   training images drawn on noise backgrounds (transfer.rehearse=1), background noise re-drawn, pixel noise
   and contrast jitter while training); noisy test = its 50,000 rows built from MNIST-test,
   used for no choice, scored from the submission against the file's labels;
3. the exported model on MNIST-test with the make_noisy recipe at background noise scaled 0.5x, 1x and
   1.5x (background pixels -> uniform noise in [0, scale], clipped to full ink), 5 backgrounds per digit.
Targets: default train-noisy >= 98.8 % on noisy test; the robust base >= 95 % at Gaussian sigma 0.2.

test_best_noisy_model_three_seeds (about 95 minutes): the best noisy model, `digits run train-mnist --preset
robust-best` (the robust preset's training, an ensemble of 3 members: digits-net, bn-cnn, digits-net) then the
default train-noisy, which fine-tunes each member (with rehearsal) into an ensemble of 3; seeds 42, 1 and 2 of the
noisy run, one base. Target: median noisy test >= 99.2 %. Measured 2026-12-04: 99.208 / 99.198 / 99.244 %, median
99.208 % (with three digits-net members the base gave 99.18 / 99.15 % for seeds 42 and 1).
"""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import datagen

pytestmark = pytest.mark.benchmark
SCALES = (0.5, 1.0, 1.5)


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=offset)


def noisy_copies(images: np.ndarray, scale: float, copies: int = 5, seed: int = 0) -> np.ndarray:
    """make_noisy.py's recipe, upright and canonical (uint8): every background pixel (0) becomes uniform
    noise in [0, scale] of full ink (clipped at full ink), `copies` independent backgrounds per image."""
    rng = np.random.default_rng(seed)
    tiled = np.tile(images, (copies, 1, 1))
    noise = np.minimum(rng.random(tiled.shape, dtype=np.float32) * scale, 1.0)
    return np.where(tiled == 0, np.round(noise * 255), tiled).astype(np.uint8)


def degradation(model_file: Path, mnist: Path) -> dict[str, float]:
    """Accuracy of a .keras model on MNIST-test drawn with each background-noise scale."""
    from components.keras_layers import load_keras_model

    images = _idx(mnist / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _idx(mnist / "t10k-labels-idx1-ubyte.gz", 8)
    model = load_keras_model(model_file)
    found = {}
    for scale in SCALES:
        batch = noisy_copies(images, scale)
        predicted = model.predict(batch[..., None], batch_size=1024, verbose=0).argmax(axis=1)
        found[f"{scale}x"] = float((predicted == np.tile(labels, 5)).mean())
    return found


def submission_accuracy(submission: Path, amat: Path) -> float:
    labels = np.loadtxt(amat, usecols=[784], dtype=np.float32).astype(int)
    with submission.open(newline="") as handle:
        predicted = np.array([int(row["Label"]) for row in csv.DictReader(handle)])
    return float((predicted == labels).mean())


def _digits(home: Path, *args: str) -> Path:
    import os

    env = {**os.environ, "DIGITS_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    subprocess.run([str(Path(sys.executable).with_name("digits")), *args], check=True, env=env,
                   capture_output=True, text=True)
    return sorted((home / "runs").iterdir())[-1]


def _noisy_set(tmp_path: Path) -> Path:
    noisy = tmp_path / "noisy"
    subprocess.run([sys.executable, str(datagen.shared_data("noisy", "make_noisy.py")), str(noisy)], check=True,
                   capture_output=True)
    return noisy


def test_robust_base_then_train_noisy_and_its_degradation(tmp_path):
    mnist = datagen.shared_data("mnist")
    noisy = _noisy_set(tmp_path)
    home = tmp_path / "home"
    base = _digits(home, "run", "train-mnist", "--data", str(mnist), "--preset", "robust")
    run = _digits(home, "run", "train-noisy", "--data", str(noisy))
    record = json.loads((run / "run.json").read_text())
    row = {"base_val": json.loads((base / "run.json").read_text())["metrics"]["val_accuracy"],
           "base_sigma_0.2": json.loads((base / "evaluate/robustness.json").read_text())["noise_sigma"]["0.2"],
           "noisy_val": record["metrics"]["val_accuracy"],
           "noisy_test": submission_accuracy(run / "export/submission.csv",
                                             noisy / "mnist_background_random_test.amat"),
           "transfer_s": record["stages"]["transfer"]["seconds"],
           **{f"mnist_test_background_{k}": v for k, v in degradation(run / "export/model.keras", mnist).items()}}
    print(json.dumps(row))
    assert row["base_sigma_0.2"] >= 0.95 and row["noisy_test"] >= 0.988


def test_best_noisy_model_three_seeds(tmp_path):
    mnist = datagen.shared_data("mnist")
    noisy = _noisy_set(tmp_path)
    home = tmp_path / "home"
    base = _digits(home, "run", "train-mnist", "--data", str(mnist), "--preset", "robust-best")
    base_record = json.loads((base / "run.json").read_text())
    base_members = base_record["stages"]["train"]["outputs"]["members"]
    print(json.dumps({"base_val": base_record["metrics"]["val_accuracy"],
                      "base_members": [m["val_accuracy"] for m in base_members],
                      "base_train_s": base_record["stages"]["train"]["seconds"]}))
    found = []
    for seed in (42, 1, 2):
        run = _digits(home, "run", "train-noisy", "--data", str(noisy), "--set", f"seed={seed}")
        record = json.loads((run / "run.json").read_text())
        found.append(submission_accuracy(run / "export/submission.csv", noisy / "mnist_background_random_test.amat"))
        members = record["stages"]["transfer"]["outputs"]["members"]
        print(json.dumps({"seed": seed, "noisy_val": record["metrics"]["val_accuracy"], "noisy_test": found[-1],
                          "members_val": [m["val_accuracy"] for m in members],
                          "transfer_s": record["stages"]["transfer"]["seconds"]}), flush=True)
    assert float(np.median(found)) >= 0.992
