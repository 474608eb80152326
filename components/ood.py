"""Knowing when an input is not a digit: an out-of-distribution check for `digits predict --reject-ood`.

A classifier's probabilities cannot say it: softmax spreads 1.0 over ten digits whatever it is shown (a grid
of dots was "1" at 0.97). The method is Mahalanobis distance on the model's features with a feature ensemble
(Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks", NeurIPS 2018), without input pre-processing: at each tapped layer (every non-linear convolutional
block, global-average pooled, and the input of the last dense layer) class-conditional Gaussians with one
shared covariance (Ledoit-Wolf shrinkage) are fitted on the train split's features. An image's score at a
layer is the log of its smallest Mahalanobis distance to a class mean, standardised by the val split's scores
at that layer; its out-of-distribution score is the sum over the layers (the paper weights them by a logistic
regression fitted on OOD examples; with none at hand, equal weights). The threshold is the `keep` quantile
of the val split's scores (the next score up), so at least that share of the val digits is kept.

Saved as `ood.npz` (arrays only, loaded without pickle) beside the evaluation, with the sha256 of the model it
was fitted for: it is used with that model only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from schemas.dataset import N_CLASSES
from schemas.errors import DigitsInputError

FILE = "ood.npz"
BATCH = 128  # images a feature extraction takes at once
METHOD = "Mahalanobis distance on features, feature ensemble (Lee et al. 2018)"


@dataclass(frozen=True)
class Detector:
    """What the check needs beside the model: per tapped layer the class means, the shared precision matrix and
    the val split's score location and scale; the threshold and the model it was fitted for."""

    layers: tuple[str, ...]
    means: tuple[np.ndarray, ...]  # per layer (10, d)
    precisions: tuple[np.ndarray, ...]  # per layer (d, d)
    location: np.ndarray  # per layer: mean of the val split's log-distances
    scale: np.ndarray  # per layer: their standard deviation
    threshold: float  # scores above it are not digits
    keep: float  # the share of val digits the threshold keeps, as asked
    model_sha256: str
    val_kept: float = 0.0  # the share of val digits it keeps (>= keep)

    def save(self, path: Path) -> None:
        arrays = {f"mean_{i}": m for i, m in enumerate(self.means)}
        arrays |= {f"precision_{i}": p for i, p in enumerate(self.precisions)}
        partial = path.with_name(f".{path.name}.partial")
        with partial.open("wb") as fh:
            np.savez(fh, layers=np.array(self.layers), location=self.location, scale=self.scale,
                     threshold=np.float64(self.threshold), keep=np.float64(self.keep),
                     val_kept=np.float64(self.val_kept),
                     model_sha256=np.array(self.model_sha256), **arrays)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> Detector:
        """Read a saved detector (no pickle: arrays only). Raises DigitsInputError for a file that is not one."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                layers = tuple(str(name) for name in saved["layers"])
                return cls(layers=layers, means=tuple(saved[f"mean_{i}"] for i in range(len(layers))),
                           precisions=tuple(saved[f"precision_{i}"] for i in range(len(layers))),
                           location=saved["location"], scale=saved["scale"], threshold=float(saved["threshold"]),
                           keep=float(saved["keep"]), model_sha256=str(saved["model_sha256"]),
                           val_kept=float(saved["val_kept"]))
        except (OSError, KeyError, ValueError) as exc:
            raise DigitsInputError(f"{path}: not an out-of-distribution detector ({exc})") from None

    def scores(self, model, images: np.ndarray) -> np.ndarray:
        """The out-of-distribution score of canonical images [N, 28, 28] uint8 through `model` (higher: less
        like the train split's digits)."""
        features = _features(model, self.layers, images)
        return np.sum([(np.log(_distance(f, m, p)) - loc) / sd for f, m, p, loc, sd in
                       zip(features, self.means, self.precisions, self.location, self.scale)], axis=0)

    def is_digit(self, model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kept: score <= threshold, the scores)."""
        scores = self.scores(model, images)
        return scores <= self.threshold, scores


def sample(count: int, rows: int = 10_000, seed: int = 0) -> np.ndarray:
    """The sorted positions of the train rows `fit` fits on, of a split of `count` rows (all when count <= rows)."""
    if count <= rows:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, rows, replace=False))


def fit(model, model_sha256: str, train_images: np.ndarray, train_labels: np.ndarray,
        val_images: np.ndarray | Iterable[np.ndarray], *, keep: float = 0.99, rows: int = 10_000,
        seed: int = 0) -> Detector:
    """Fit the detector of a Keras digits model on (a seeded sample of `rows` of) the train split, and set its
    threshold to keep `keep` of the val split (an array, or its batches when it streams)."""
    from sklearn.covariance import LedoitWolf

    layers = tapped_layers(model)
    if len(train_images) > rows:
        chosen = sample(len(train_images), rows, seed)
        train_images, train_labels = train_images[chosen], train_labels[chosen]
    means, precisions = [], []
    for features in _features(model, layers, train_images):
        features = features.astype(np.float64)
        mean = np.stack([features[train_labels == c].mean(axis=0) if (train_labels == c).any()
                         else features.mean(axis=0) for c in range(N_CLASSES)])
        shrunk = LedoitWolf(assume_centered=True, store_precision=False).fit(features - mean[train_labels]).covariance_
        precisions.append(np.linalg.inv(shrunk))  # positive definite: LU inverse, ~3x faster than sklearn's pinvh
        means.append(mean)
    val_logs = np.concatenate([np.stack([np.log(_distance(f, m, p)) for f, m, p in
                                         zip(_features(model, layers, images), means, precisions)], axis=1)
                               for images in ([val_images] if isinstance(val_images, np.ndarray) else val_images)])
    location, scale = val_logs.mean(axis=0), np.maximum(val_logs.std(axis=0), 1e-6)
    val_scores = ((val_logs - location) / scale).sum(axis=1)
    threshold = float(np.quantile(val_scores, keep, method="higher"))  # the next score up: keeps >= keep
    return Detector(layers=layers, means=tuple(means), precisions=tuple(precisions), location=location, scale=scale,
                    threshold=threshold, keep=keep, model_sha256=model_sha256,
                    val_kept=float((val_scores <= threshold).mean()))


def tapped_layers(model) -> tuple[str, ...]:
    """The names of the layers whose outputs are features: each non-linear convolutional block's output (an
    Activation or ReLU layer, or a convolution with a non-linear activation) and the layer before the last
    dense one. Raises DigitsInputError for a model without a dense head (an ensemble, a pca-svm)."""
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    dense = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Dense)]
    if not dense or dense[-1] == 0:
        raise DigitsInputError(f"model '{model.name}': the out-of-distribution check needs a model of one chain of "
                               "layers ending in a dense layer (an ensemble or a pca-svm has none)")
    taps = []
    for layer in layers[:dense[-1]]:
        shape = getattr(layer, "output", None) is not None and layer.output.shape
        activation = getattr(layer, "activation", None)
        nonlinear = isinstance(layer, (keras.layers.Activation, keras.layers.ReLU)) or (
            isinstance(layer, keras.layers.Conv2D) and activation is not None
            and activation is not keras.activations.linear)
        if shape and len(shape) == 4 and nonlinear:
            taps.append(layer.name)
    return (*taps, layers[dense[-1] - 1].name)


def _features(model, layers: tuple[str, ...], images: np.ndarray) -> list[np.ndarray]:
    """Each tapped layer's output for images, 4-D outputs global-average pooled: [N, d] per layer."""
    import keras

    outputs = []
    for i, name in enumerate(layers):
        output = model.get_layer(name).output
        outputs.append(keras.layers.GlobalAveragePooling2D(name=f"ood_pool_{i}")(output) if len(output.shape) == 4
                       else keras.layers.Flatten(name=f"ood_flat_{i}")(output))
    extractor = keras.Model(model.inputs[0], outputs)  # one input, called with one array
    found: list[list[np.ndarray]] = [[] for _ in layers]
    for start in range(0, len(images), BATCH):  # called eagerly: a new model's predict function would be traced
        batch = extractor(images[start:start + BATCH, ..., None], training=False)  # again (TensorFlow warns)
        for kept, output in zip(found, batch if isinstance(batch, (list, tuple)) else [batch]):
            kept.append(np.asarray(output, np.float64))
    return [np.concatenate(kept) if kept else np.zeros((0, 0)) for kept in found]


def _distance(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """The smallest squared Mahalanobis distance of each row of features to a class mean (never 0, for the log)."""
    nearest = np.full(len(features), np.inf)
    for mean in means:
        centred = features - mean
        nearest = np.minimum(nearest, ((centred @ precision) * centred).sum(axis=1))  # BLAS, not einsum's loops
    return np.maximum(nearest, 1e-12)


def for_model(model_file: Path, sha256: str, candidates: list[Path]) -> Detector:
    """The detector fitted for the model file whose sha256 is given: the first of candidates that exists and
    was fitted for it. Raises DigitsInputError (one line) when there is none."""
    for path in candidates:
        if path.is_file():
            detector = Detector.load(path)
            if detector.model_sha256 == sha256:
                return detector
    raise DigitsInputError(f"{model_file}: no out-of-distribution detector fitted for this model (the evaluate stage "
                           f"writes one, {FILE}, for the model it evaluates); use a models:/ URI or a run's model")
