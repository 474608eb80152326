"""The calibrate stage (evaluate.calibrate=true): temperature scaling fitted on the val split and kept
inside the model, so every later use of it — evaluate, the registry, the exported SavedModel, `digits
predict` — gives calibrated probabilities.

A digits model ends in softmax probabilities p. Temperature scaling (Guo et al., 2017) replaces them by
softmax(log(p) / T), with the one number T that minimises the negative log-likelihood of the val labels:
T > 1 softens an over-confident model, T < 1 sharpens an under-confident one (label smoothing makes
ours under-confident). The predicted class never changes, so accuracy and the gate do not either.

The calibrated model is the same functional graph with one more layer, `Temperature`
(components.keras_layers: registered with Keras, loadable in safe mode: no code in the file runs). Besides the
ECE before and after on the val split the temperature was fitted on (in-sample, optimistic), the stage
reports a 2-fold cross-fitted ECE: T fitted on one half of the val images, measured on the other.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from components.keras_layers import TEMPERATURE_LAYER
from schemas.artifacts import Converted, Trained
from schemas.errors import DigitsInputError

Progress = Callable[[str], None]
LAYER = TEMPERATURE_LAYER  # the layer's name in a calibrated model
REPORT = "calibration.json"
BOUNDS = (0.05, 20.0)
_EPSILON = 1e-12


def scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.log(np.maximum(probabilities.astype(np.float64), _EPSILON)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T in BOUNDS minimising the mean negative log-likelihood of labels under softmax(log(p) / T)."""
    from scipy.optimize import minimize_scalar

    rows = np.arange(len(labels))

    def nll(t: float) -> float:
        return float(-np.log(np.maximum(scaled(probabilities, t)[rows, labels], _EPSILON)).mean())

    return float(minimize_scalar(nll, bounds=BOUNDS, method="bounded", options={"xatol": 1e-4}).x)


def cross_fitted_ece(probabilities: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """ECE of temperature scaling on images it was not fitted on: two halves, each scaled with the T of the other."""
    from components.evaluate import calibration

    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    ece = 0.0
    for fit_on, measure_on in (halves, halves[::-1]):
        t = fit_temperature(probabilities[fit_on], labels[fit_on])
        ece += len(measure_on) / len(labels) * calibration(labels[measure_on], scaled(probabilities[measure_on], t))["ece"]
    return ece


def run(trained: Trained, converted: Converted, out_dir: Path, *, in_memory_rows: int = 100_000,
        progress: Progress = lambda _: None) -> Trained:
    """Fit T on converted's val split (streamed when it has more than in_memory_rows rows: only its
    probabilities are held) and write the model with T inside (model.keras), its seen-image set and
    calibration.json into out_dir."""
    from components.evaluate import calibration, load_predict
    from components.train.feed import Feed
    from schemas.runs import write_json_atomic

    if trained.file != "model.keras":
        raise DigitsInputError(f"evaluate.calibrate=true needs a Keras model; {trained.model} is a {trained.file}")
    out_dir.mkdir(parents=True, exist_ok=True)
    val = Feed.of(converted.files("val"), converted.counts["val"], in_memory_rows)
    progress(f"fitting a temperature on {val.rows:,} validation images")
    _, labels, (probabilities,) = val.scored(load_predict(trained.path, trained.hashes.get(trained.file)))
    temperature = fit_temperature(probabilities, labels)
    before = calibration(labels, probabilities)["ece"]
    after = calibration(labels, scaled(probabilities, temperature))["ece"]
    held_out = cross_fitted_ece(probabilities, labels)
    summary = {"temperature": temperature, "ece_before": before, "ece_after": after, "ece_after_cross_fitted": held_out,
               "val_images": val.rows}

    import keras

    from components.keras_layers import classes, load_keras_model

    model = load_keras_model(trained.path)
    if model.layers[-1].name == LAYER:
        raise DigitsInputError(f"{trained.path}: this model is calibrated already (it ends in a temperature layer)")
    outputs = classes(keras)["Temperature"](temperature, name=LAYER, dtype="float32")(model.outputs[0])
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # as the zoo builds them
    calibrated = keras.Model(inputs, outputs, name=model.name)
    partial = out_dir / "model.partial.keras"
    calibrated.save(partial)
    os.replace(partial, out_dir / "model.keras")
    if trained.seen_path is not None:
        shutil.copyfile(trained.seen_path, out_dir / Trained.SEEN)
    for history in [trained.dir / "history.csv", *sorted(trained.dir.glob("members/*/history.csv"))]:
        if history.is_file():  # the training curves, for evaluate's report and the model card
            target = out_dir / history.relative_to(trained.dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(history, target)
    write_json_atomic(out_dir / REPORT, summary)
    progress(f"temperature {temperature:.3f}: ECE {before:.4f} -> {after:.4f} on val ({held_out:.4f} cross-fitted)")
    return dataclasses.replace(trained, dir=out_dir, hashes={}, temperature=temperature, calibration=summary)
