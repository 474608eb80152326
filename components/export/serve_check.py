"""Infra-validation's process of its own: load an exported model the way a server would and predict.

usage: python -m components.export.serve_check MODEL SAMPLE.npy     one model, then exit
       python -m components.export.serve_check --serve               one request per line on stdin

MODEL is a SavedModel folder (loaded with TensorFlow alone, called through its `serving_default`
signature) or a .joblib pipeline; SAMPLE.npy holds canonical images uint8 [N, 28, 28]. Prints
{"probabilities": [[...], ...]} as one JSON line on stdout.

--serve answers each line {"model": MODEL, "sample": SAMPLE.npy} with one JSON line, {"probabilities": ...}
or {"error": "..."}, until stdin closes: the export stage (components.export) starts it once per process and
keeps it for the exports after, so a process that exports many times (a test suite) pays TensorFlow's import
once. It never imports Keras models or digits' code, and never holds the model the exporting process wrote:
each request loads the files from disk.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

BATCH = 64  # images per call of the signature: one batch's activations held at a time, not the sample's


def probabilities_of(model: str, sample: str) -> np.ndarray:
    images = np.load(sample)
    if Path(model).suffix == ".joblib":
        import joblib

        return np.eye(10)[joblib.load(model).predict(images.reshape(len(images), -1) / 255.0)]
    import tensorflow as tf

    serving = tf.saved_model.load(model).signatures["serving_default"]
    labels, probabilities = [], []
    for start in range(0, len(images), BATCH):
        outputs = serving(images=tf.constant(images[start:start + BATCH], dtype=tf.uint8))
        labels.append(outputs["label"].numpy())
        probabilities.append(outputs["probabilities"].numpy())
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    probabilities = np.concatenate(probabilities) if probabilities else np.zeros((0, 10), np.float32)
    if not np.array_equal(labels, probabilities.argmax(axis=1)):
        raise ValueError("serving_default: label is not the argmax of probabilities")
    return probabilities


def main(model: str, sample: str) -> None:
    try:
        probabilities = probabilities_of(model, sample)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(json.dumps({"probabilities": np.asarray(probabilities, dtype=float).tolist()}))


def serve() -> None:
    import gc

    for line in sys.stdin:
        try:
            request = json.loads(line)
            answer = {"probabilities": np.asarray(probabilities_of(request["model"], request["sample"]),
                                                  dtype=float).tolist()}
        except Exception as exc:  # one request's failure is its answer; the next may load
            text = str(exc).strip().splitlines()
            answer = {"error": f"{type(exc).__name__}: {text[-1] if text else ''}"}
        gc.collect()  # the loaded model goes: nothing of one request is kept for the next
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main(*sys.argv[1:3])
