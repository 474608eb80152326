"""The model zoo: our `digits-net` and the seed notebooks' models, rebuilt for like-for-like comparison.

Every Keras model takes the canonical uint8 images (28, 28, 1), scales them to [0, 1] itself and
ends in a 10-way softmax, so a saved model scores raw pixels. Augmentation layers (rotation, shift,
zoom) sit at the model's input: they run on the device that trains and are inactive at inference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from schemas.config import ModelName, TrainConfig
from schemas.dataset import IMAGE_SIDE, N_CLASSES

if TYPE_CHECKING:
    import keras


def build(config: TrainConfig, keras) -> "keras.Model":
    """A fresh, uncompiled Keras model for config.model (not pca-svm)."""
    body = _BODIES[config.model]
    inputs = keras.Input((IMAGE_SIDE, IMAGE_SIDE, 1), name="image")
    x = keras.layers.Rescaling(1 / 255, name="scale")(inputs)
    if augments(config):
        x = augmentation(config, keras)(x)
    outputs = body(x, keras, width=config.width) if config.model is ModelName.digits_net else body(x, keras)
    return keras.Model(inputs, outputs, name=config.model.value)


def without_augmentation(model) -> "keras.Model":
    """A model of the same layers (the same weights) without the `augment` block, so training sees the images as
    they are; `model` itself when it has none. For the chain models of the zoo (and those transfer builds)."""
    import keras

    layers = chain_layers(model)
    if not any(layer.name == "augment" for layer in layers):
        return model
    kept = [layer for layer in layers if layer.name != "augment"]
    if not computes_as(model, kept):
        raise ValueError(f"model '{model.name}' is not a chain of layers: its augment block cannot be taken out")
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), name="image")
    x = inputs
    for layer in kept:
        x = layer(x)
    return keras.Model(inputs, x, name=model.name)


def chain_layers(model) -> list:
    """`model`'s layers in order, but its input."""
    import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def computes_as(model, layers: list) -> bool:
    """Whether `layers` applied one after another compute what `model` does, in inference mode, on a probe of
    random images: the check that a model rebuilt from them (without some) is that model's chain."""
    x = probe = np.random.default_rng(0).integers(0, 256, (8, *model.inputs[0].shape[1:])).astype("float32")
    try:
        for layer in layers:
            x = layer(x, training=False)
    except Exception:  # a layer that cannot take the one before's output (a merge, say): not a chain
        return False
    return bool(np.allclose(np.asarray(x), np.asarray(model(probe, training=False)), atol=1e-5))


def augments(config: TrainConfig) -> bool:
    """Whether a model built for this config has an `augment` block."""
    return config.augment or any((config.background_noise, config.pixel_noise, config.occlusion, config.contrast,
                                  config.brightness))


def augmentation(config: TrainConfig, keras) -> "keras.Sequential":
    """The `augment` block, active only while training, on images scaled to [0, 1]: random rotation, shift
    and zoom (train.augment; out-of-image pixels are black, or the image mirrored with train.fill=reflect;
    resampled by train.interpolation) — or, with train.elastic, the three and an elastic distortion in one
    resampling — then the robustness augmentations
    (components.keras_layers) — occlusion, contrast/brightness jitter, random backgrounds, pixel noise. The
    geometric ones come first: their black fill must not cut holes in a noise background."""
    from components.keras_layers import classes

    fill = {"fill_mode": config.fill.value, "fill_value": 0.0, "interpolation": config.interpolation.value}
    robust = classes(keras)
    layers = []
    if config.augment and config.elastic:  # rotation, shift, zoom and the elastic field in one resampling
        layers.append(robust["ElasticDistortion"](alpha=config.elastic, sigma=config.elastic_sigma,
                                                  rotation=config.rotation_degrees, shift=config.shift,
                                                  zoom=config.zoom, name="elastic"))
    elif config.augment:
        if config.rotation_degrees:
            layers.append(keras.layers.RandomRotation(config.rotation_degrees / 360, **fill))
        if config.shift:
            layers.append(keras.layers.RandomTranslation(config.shift, config.shift, **fill))
        if config.zoom:
            layers.append(keras.layers.RandomZoom(config.zoom, config.zoom, **fill))
    if config.occlusion:
        layers.append(robust["Occlusion"](rate=config.occlusion, name="occlusion"))
    if config.contrast or config.brightness:
        layers.append(robust["ContrastBrightness"](contrast=config.contrast, brightness=config.brightness,
                                                   name="contrast_brightness"))
    if config.background_noise:
        layers.append(robust["BackgroundNoise"](max_level=config.background_noise, name="background_noise"))
    if config.pixel_noise:
        layers.append(robust["PixelNoise"](max_sigma=config.pixel_noise, name="pixel_noise"))
    return keras.Sequential(layers, name="augment")


def _conv_bn(x, keras, filters: int, kernel: int, strides: int = 1, padding: str = "same"):
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)  # moving statistics that keep up in short trainings
    return keras.layers.Activation("relu")(x)


def _digits_net(x, keras, width: float = 1.0):
    """Ours: two BN conv pairs, each shrinking the image by 'valid' padding and then max-pooling
    (28 -> 24 -> 12 -> 8 -> 4), a BN conv at 4x4 and a global-average head. Compute sits where the
    image is small: ~11 M multiply-adds per image, against ~22 M for the same widths at 'same'
    padding, so twice the epochs fit in a CPU minute. `width` scales every channel count."""
    def channels(n: int) -> int:
        return max(8, int(round(n * width)))

    for filters in (32, 64):
        x = _conv_bn(x, keras, channels(filters), 3, padding="valid")
        x = _conv_bn(x, keras, channels(filters), 3, padding="valid")
        x = keras.layers.MaxPooling2D()(x)
    x = _conv_bn(x, keras, channels(128), 3)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.25)(x)
    return keras.layers.Dense(N_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)


def _baseline(x, keras):
    """The Kaggle notebook's plain CNN (as the Keras MNIST example): two conv layers, max-pooling, dense."""
    x = keras.layers.Conv2D(32, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.5)(x)
    return keras.layers.Dense(N_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)


def _robinson(x, keras):
    """32/32/64/64 conv in two pooled blocks, two 1024-unit dense layers with dropout."""
    for filters in (32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Dropout(0.25)(x)
    x = keras.layers.Flatten()(x)
    for _ in range(2):
        x = keras.layers.Dense(1024, activation="relu")(x)
        x = keras.layers.Dropout(0.5)(x)
    return keras.layers.Dense(N_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)


def _bn_cnn(x, keras):
    """The batch-normalised net with strided convolutions in place of pooling (32-32-32s2, 64-64-64s2, 128)."""
    for filters in (32, 64):
        x = _conv_bn(x, keras, filters, 3, padding="valid")
        x = _conv_bn(x, keras, filters, 3, padding="valid")
        x = _conv_bn(x, keras, filters, 5, strides=2)
        x = keras.layers.Dropout(0.4)(x)
    x = _conv_bn(x, keras, 128, 4, padding="valid")
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.4)(x)
    return keras.layers.Dense(N_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)


_BODIES: dict[ModelName, Callable] = {
    ModelName.digits_net: _digits_net,
    ModelName.baseline: _baseline,
    ModelName.robinson: _robinson,
    ModelName.bn_cnn: _bn_cnn,
}
