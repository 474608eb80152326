"""digits' own Keras layers, registered with Keras' serialization (package `digits`) so that a model
holding them loads in safe mode — nothing in a model file runs as code — and `load_keras_model`, the
one way digits loads a .keras file.

- `Temperature`: softmax(log(p) / T) of class probabilities (components.calibrate).
- Robustness augmentation (components.train.models.augmentation), active only while training, on
  images scaled to [0, 1] (light ink on a dark background):
  `BackgroundNoise` (background pixels replaced by uniform noise of a random level per image, as the noisy
  MNIST variant's random backgrounds), `PixelNoise` (additive Gaussian noise of a random sigma per image),
  `Occlusion` (a random rectangle erased to background) and `ContrastBrightness` (jitter). Each draws
  its randomness per image and leaves inference unchanged.
- Test-time augmentation (components.train.ensemble, train.test_time_shifts): `ShiftCopies` stacks each image
  with copies of it shifted by a pixel, `CopiesMean` averages the probabilities of the copies again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_EPSILON = 1e-12
TEMPERATURE_LAYER = "temperature"  # the Temperature layer's name in a calibrated model (components.calibrate)
_CLASSES: dict[str, Any] = {}


def classes(keras) -> dict[str, type]:
    """The layer classes by name, defined and registered on first use (keras is imported lazily)."""
    if _CLASSES:
        return _CLASSES
    import numpy as np

    ops = keras.ops
    register = keras.saving.register_keras_serializable(package="digits")

    @register
    class Temperature(keras.layers.Layer):
        """softmax(log(p) / temperature) of class probabilities p."""

        def __init__(self, temperature: float = 1.0, **kwargs):
            super().__init__(**kwargs)
            self.temperature = float(temperature)

        def call(self, probabilities):
            return ops.softmax(ops.log(ops.maximum(probabilities, _EPSILON)) / self.temperature, axis=-1)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "temperature": self.temperature}

    class _Random(keras.layers.Layer):
        """A training-only image augmentation with its own seed generator."""

        def __init__(self, seed: int | None = None, **kwargs):
            super().__init__(**kwargs)
            self.seed = seed
            self.generator = keras.random.SeedGenerator(seed)

        def call(self, images, training=None):
            return self.augment(images) if training else images

        def per_image(self, images, low: float, high: float):
            """One uniform draw per image, shaped to broadcast over (batch, height, width, channels)."""
            return keras.random.uniform((ops.shape(images)[0], 1, 1, 1), low, high, seed=self.generator)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "seed": self.seed}

    @register
    class BackgroundNoise(_Random):
        """Background pixels (below `ink`) become uniform noise in [0, level], level ~ U(0, max_level) per image."""

        def __init__(self, max_level: float = 1.0, ink: float = 0.1, **kwargs):
            super().__init__(**kwargs)
            self.max_level, self.ink = float(max_level), float(ink)

        def augment(self, images):
            level = self.per_image(images, 0.0, self.max_level)
            noise = keras.random.uniform(ops.shape(images), 0.0, 1.0, seed=self.generator) * level
            return ops.where(images < self.ink, ops.maximum(images, noise), images)

        def get_config(self):
            return {**super().get_config(), "max_level": self.max_level, "ink": self.ink}

    @register
    class PixelNoise(_Random):
        """images + N(0, sigma^2), sigma ~ U(0, max_sigma) per image, clipped to [0, 1]."""

        def __init__(self, max_sigma: float = 0.3, **kwargs):
            super().__init__(**kwargs)
            self.max_sigma = float(max_sigma)

        def augment(self, images):
            sigma = self.per_image(images, 0.0, self.max_sigma)
            noise = keras.random.normal(ops.shape(images), seed=self.generator) * sigma
            return ops.clip(images + noise, 0.0, 1.0)

        def get_config(self):
            return {**super().get_config(), "max_sigma": self.max_sigma}

    @register
    class Occlusion(_Random):
        """With probability `rate`, a rectangle of sides up to `max_side` of the image's is erased to background."""

        def __init__(self, rate: float = 0.5, max_side: float = 0.4, **kwargs):
            super().__init__(**kwargs)
            self.rate, self.max_side = float(rate), float(max_side)

        def augment(self, images):
            shape = ops.shape(images)
            height, width = shape[1], shape[2]
            side_h = self.per_image(images, 0.0, self.max_side) * ops.cast(height, "float32")
            side_w = self.per_image(images, 0.0, self.max_side) * ops.cast(width, "float32")
            top = self.per_image(images, 0.0, 1.0) * (ops.cast(height, "float32") - side_h)
            left = self.per_image(images, 0.0, 1.0) * (ops.cast(width, "float32") - side_w)
            rows = ops.reshape(ops.cast(ops.arange(height), "float32"), (1, -1, 1, 1))
            cols = ops.reshape(ops.cast(ops.arange(width), "float32"), (1, 1, -1, 1))
            inside = (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
            chosen = self.per_image(images, 0.0, 1.0) < self.rate
            return ops.where(inside & chosen, ops.zeros_like(images), images)

        def get_config(self):
            return {**super().get_config(), "rate": self.rate, "max_side": self.max_side}

    @register
    class ContrastBrightness(_Random):
        """(x - mean) * c + mean + b per image, c ~ U(1 - contrast, 1 + contrast), b ~ U(-brightness,
        brightness), clipped to [0, 1]."""

        def __init__(self, contrast: float = 0.3, brightness: float = 0.2, **kwargs):
            super().__init__(**kwargs)
            self.contrast, self.brightness = float(contrast), float(brightness)

        def augment(self, images):
            mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
            c = self.per_image(images, 1.0 - self.contrast, 1.0 + self.contrast)
            b = self.per_image(images, -self.brightness, self.brightness)
            return ops.clip((images - mean) * c + mean + b, 0.0, 1.0)

        def get_config(self):
            return {**super().get_config(), "contrast": self.contrast, "brightness": self.brightness}

    @register
    class ElasticDistortion(_Random):
        """Simard et al.'s elastic distortion (2003) composed with a random rotation, shift and zoom: every output
        pixel reads the input at its position rotated by up to `rotation` degrees, scaled by 1 +- `zoom` (each axis
        on its own), moved by up to `shift` of the image side, plus a random displacement field — uniform noise in
        [-1, 1] per pixel and axis, smoothed by a Gaussian of `sigma` pixels, scaled by `alpha`. The image is
        resampled once, bilinearly (black outside it): strokes bend and thicken locally the way handwriting
        varies, and one resampling blurs less than a rotation, a shift and a zoom one after another."""

        def __init__(self, alpha: float = 36.0, sigma: float = 6.0, rotation: float = 0.0, shift: float = 0.0,
                     zoom: float = 0.0, **kwargs):
            super().__init__(**kwargs)
            self.alpha, self.sigma = float(alpha), float(sigma)
            self.rotation, self.shift, self.zoom = float(rotation), float(shift), float(zoom)

        def blur(self, side: int):
            """The Gaussian blur of a side x side field (zero outside it) as a matrix: blurring the rows and then
            the columns of F is B @ F @ B.T — the same numbers as a separable convolution, several times faster
            on a CPU than a depthwise one."""
            radius = np.ceil(3 * self.sigma)
            offsets = np.arange(side)[:, None] - np.arange(side)[None, :]
            matrix = np.exp(-0.5 * (offsets / self.sigma) ** 2) * (np.abs(offsets) <= radius)
            total = np.exp(-0.5 * (np.arange(-radius, radius + 1) / self.sigma) ** 2).sum()
            return ops.convert_to_tensor((matrix / total).astype("float32"))

        def augment(self, images):
            batch, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
            field = keras.random.uniform((batch, height, width, 2), -1.0, 1.0, seed=self.generator)
            field = ops.einsum("ij,bjkc,lk->bilc", self.blur(height), field, self.blur(width)) * self.alpha
            angle = self.per_image(images, -1.0, 1.0)[..., 0] * (self.rotation * np.pi / 180)
            zoom_y = self.per_image(images, 1.0 - self.zoom, 1.0 + self.zoom)[..., 0]
            zoom_x = self.per_image(images, 1.0 - self.zoom, 1.0 + self.zoom)[..., 0]
            shift_y = self.per_image(images, -self.shift, self.shift)[..., 0] * height
            shift_x = self.per_image(images, -self.shift, self.shift)[..., 0] * width
            v = ops.reshape(ops.arange(height, dtype="float32") - (height - 1) / 2, (1, -1, 1))
            u = ops.reshape(ops.arange(width, dtype="float32") - (width - 1) / 2, (1, 1, -1))
            cos, sin = ops.cos(angle), ops.sin(angle)
            y = (height - 1) / 2 + shift_y + cos * zoom_y * v + sin * zoom_x * u + field[..., 0]
            x = (width - 1) / 2 + shift_x - sin * zoom_y * v + cos * zoom_x * u + field[..., 1]
            return _bilinear(images, y, x)

        def get_config(self):
            return {**super().get_config(), "alpha": self.alpha, "sigma": self.sigma, "rotation": self.rotation,
                    "shift": self.shift, "zoom": self.zoom}

    def _bilinear(images, y, x):
        """images (B, H, W, C) sampled at float positions y, x (B, H, W), bilinearly; zero outside the image."""
        shape = ops.shape(images)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        flat = ops.reshape(images, (-1, channels))
        base = ops.reshape(ops.arange(batch) * height * width, (-1, 1, 1))
        y0, x0 = ops.floor(y), ops.floor(x)
        bottom, right = ops.cast(height - 1, "float32"), ops.cast(width - 1, "float32")
        out = 0.0
        for dy in (0, 1):
            for dx in (0, 1):
                yi, xi = y0 + dy, x0 + dx
                weight = (1.0 - ops.abs(y - yi)) * (1.0 - ops.abs(x - xi))
                inside = (yi >= 0) & (yi <= bottom) & (xi >= 0) & (xi <= right)
                index = base + ops.cast(ops.clip(yi, 0, bottom), "int32") * width + ops.cast(ops.clip(xi, 0, right),
                                                                                            "int32")
                pixels = ops.reshape(ops.take(flat, ops.reshape(index, (-1,)), axis=0), (batch, height, width, channels))
                out = out + pixels * ops.expand_dims(ops.where(inside, weight, 0.0), -1)
        return out

    @register
    class ShiftCopies(keras.layers.Layer):
        """Test-time augmentation: the image batch followed by its copies rolled by each (rows, columns) shift,
        stacked along the batch axis (B images -> (1 + len(shifts)) * B). Rolling, not padding: a noise
        background stays noise (the row that leaves one edge comes back at the other)."""

        def __init__(self, shifts=(), **kwargs):
            super().__init__(**kwargs)
            self.shifts = [[int(rows), int(columns)] for rows, columns in shifts]

        def call(self, images):
            return ops.concatenate([images, *(ops.roll(images, shift, axis=[1, 2]) for shift in self.shifts)], axis=0)

        def compute_output_shape(self, input_shape):
            return (None, *input_shape[1:])

        def get_config(self):
            return {**super().get_config(), "shifts": self.shifts}

    @register
    class CopiesMean(keras.layers.Layer):
        """The mean of `copies` consecutive blocks of a batch (undoes ShiftCopies' stacking): (copies * B, C) -> (B, C)."""

        def __init__(self, copies: int = 1, **kwargs):
            super().__init__(**kwargs)
            self.copies = int(copies)

        def call(self, probabilities):
            return ops.mean(ops.reshape(probabilities, (self.copies, -1, probabilities.shape[-1])), axis=0)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "copies": self.copies}

    _CLASSES.update({cls.__name__: cls for cls in (Temperature, BackgroundNoise, PixelNoise, Occlusion,
                                                     ContrastBrightness, ElasticDistortion, ShiftCopies,
                                                     CopiesMean)})
    return _CLASSES


def saved_config(path: Path) -> dict:
    """A .keras file's model config (its config.json's `config`: name, layers), read without building the model;
    OSError, KeyError, ValueError or zipfile.BadZipFile when it is not a readable .keras file."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))["config"]


def model_name(path: Path) -> str:
    """The name a .keras file's model was saved under (a digits model: its architecture)."""
    return saved_config(path).get("name", "model")


def load_keras_model(path: Path, compile: bool = True):
    """A .keras file loaded in safe mode, with digits' own layers known (every digits load goes through here);
    compile=False leaves out its optimizer (a model only predicted with, or nested in another)."""
    from components.tensorflow_runtime import import_tensorflow

    import_tensorflow()
    import keras

    classes(keras)
    return keras.models.load_model(path, safe_mode=True, compile=compile)


def check_classifier(model, name: str) -> None:
    """Refuse, in one line (DigitsInputError naming `name`), a Keras model that is not a digit classifier as digits
    uses one: one input of canonical images (28x28x1, uint8 0..255) and one output of 10 class probabilities.
    The probabilities are checked on three probe images (blank, full ink, seeded noise): each output in [0, 1]
    and each row summing to 1, so a model that ends in logits is refused instead of printing '7 238.8345'."""
    import numpy as np

    from schemas.dataset import IMAGE_SIDE, N_CLASSES
    from schemas.errors import DigitsInputError

    canonical = (IMAGE_SIDE, IMAGE_SIDE, 1)
    inputs = [tuple(tensor.shape[1:]) for tensor in model.inputs]
    if inputs != [canonical]:
        raise DigitsInputError(f"{name}: does not take canonical digit images (one input {canonical}, uint8, 0 "
                               f"background, 255 ink); it takes {', '.join(map(str, inputs)) or 'nothing'}")
    outputs = [tuple(tensor.shape[1:]) for tensor in model.outputs]
    if outputs != [(N_CLASSES,)]:
        raise DigitsInputError(f"{name}: does not end in {N_CLASSES} class probabilities (one output of shape "
                               f"({N_CLASSES},)); it gives {', '.join(map(str, outputs))}")
    probes = np.stack([np.zeros(canonical, np.uint8), np.full(canonical, 255, np.uint8),
                       np.random.default_rng(0).integers(0, 256, canonical, dtype=np.uint8)])
    out = np.asarray(model(probes, training=False), dtype=np.float64)  # eager: no predict function traced for 3
    if not (np.isfinite(out).all() and out.min() >= -1e-6 and out.max() <= 1 + 1e-6
            and np.allclose(out.sum(axis=1), 1.0, atol=1e-3)):
        raise DigitsInputError(f"{name}: does not end in {N_CLASSES} class probabilities (on probe images its outputs "
                               f"range {out.min():.4g} to {out.max():.4g} and rows sum to "
                               f"{out.sum(axis=1).min():.4g} to {out.sum(axis=1).max():.4g}; a softmax output is "
                               "expected, not logits)")


def predict(model, images, batch_size: int = 256):
    """A model's outputs for an in-memory array, batch by batch through its compiled predict step: the same
    numbers as `model.predict`, without the tf.data pipeline `predict` builds around an array each call
    (tests/benchmarks/test_bench_predict.py: 1.25x faster on 28,000 rows, 2 cores). A model of several outputs
    gives a list of arrays. 256 rows a batch: as fast as 1,024 on CPU, and the activations TensorFlow keeps
    for the largest batch it ran are a quarter (evaluate's peak on MNIST: 1,438 -> 1,175 MB with ood.BATCH 128)."""
    import numpy as np

    if not len(images):  # empty outputs of the right shapes without running the model: `model.predict` raises on
        # none, and an empty batch through a convolution fails on some CPUs' oneDNN kernels (seen on an AMD EPYC)
        empty = [np.zeros((0, *output.shape[1:]), dtype=output.dtype) for output in model.outputs]
        return empty if len(empty) > 1 else empty[0]
    chunks = [model.predict_on_batch(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
    if isinstance(chunks[0], (list, tuple)):
        return [np.concatenate([np.asarray(chunk[i]) for chunk in chunks]) for i in range(len(chunks[0]))]
    return np.concatenate([np.asarray(chunk) for chunk in chunks])
