"""Infra-validation's fresh process: load an exported model the way a server would and predict.

usage: python -m components.export.serve_check MODEL SAMPLE.npy
MODEL is a SavedModel folder (loaded with TensorFlow alone, called through its `serving_default`
signature) or a .joblib pipeline; SAMPLE.npy holds canonical images uint8 [N, 28, 28]. Prints
{"probabilities": [[...], ...]} as one JSON line on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(model: str, sample: str) -> None:
    images = np.load(sample)
    if Path(model).suffix == ".joblib":
        import joblib

        probabilities = np.eye(10)[joblib.load(model).predict(images.reshape(len(images), -1) / 255.0)]
    else:
        import tensorflow as tf

        serving = tf.saved_model.load(model).signatures["serving_default"]
        outputs = serving(images=tf.constant(images, dtype=tf.uint8))
        probabilities = outputs["probabilities"].numpy()
        if not np.array_equal(outputs["label"].numpy(), probabilities.argmax(axis=1)):
            raise SystemExit("serving_default: label is not the argmax of probabilities")
    print(json.dumps({"probabilities": np.asarray(probabilities, dtype=float).tolist()}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
