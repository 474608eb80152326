"""The transfer stage: fine-tune a trained digits model (by default the clean-MNIST champion) on a
run's train split, e.g. the noisy set, checkpointed and resumable like the train stage.

Modes (TransferConfig.mode):
- `full`: every weight of the base model trains, at transfer.learning_rate.
- `frozen`: the base's feature extractor is frozen (BatchNorm in inference mode) and a new 10-way head
  trains on top, at train.learning_rate.
- `gradual` (the keras-io fine-tuning recipe): the `frozen` set-up for transfer.head_epochs, then
  every layer but BatchNorm is unfrozen and trained at transfer.fine_tune_learning_rate for the rest of
  train.epochs (BatchNorm stays in inference mode, so its clean-data statistics are not wrecked by
  the first large updates).

Preprocessing: a digits model takes the canonical images (28x28x1 uint8, upright, 0 background,
255 ink) and scales them itself (its `scale` layer, x / 255). Every source's ingest produces that
canonical form (the noisy set is transposed back and its [0, 1] floats mapped to 0..255), so the new
data reaches the base layers exactly as its training data did; a base model that does not take
canonical images is refused. The base's own augmentation layers are replaced by this run's (train.augment
and the robustness augmentations, components.train.models.augmentation).

Rehearsal (transfer.rehearse, components.train.rehearsal): a share of the base's own training images — its run's train
split, verified against what that run recorded — joins the run's train split, each drawn the way the
source looks (the noisy set: every background pixel uniform noise, as make_noisy draws it). The base has
learnt those digits; as noisy images they are thousands more examples of the source's look than its own
train split holds (10,799 on the noisy set), and they keep the clean task from being forgotten.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from components.keras_layers import TEMPERATURE_LAYER as CALIBRATION_LAYER
from components.keras_layers import check_classifier, load_keras_model, model_name
from components.tracking import Tracking
from components.train import Segment, clean_phase, fit_keras, phase, prepare_work_dir, splits
from components.train.models import augmentation, augments, chain_layers, computes_as
from components.train.rehearsal import Rehearsal
from schemas.artifacts import Converted, Trained, sha256_file
from schemas.config import TrainConfig, TransferConfig, TransferMode
from schemas.dataset import IMAGE_SIDE, N_CLASSES
from schemas.errors import ConfigError, DigitsInputError

Progress = Callable[[str], None]
BASE = "base.keras"  # the base model, kept in the stage folder for lineage


def run(converted: Converted, config: TrainConfig, transfer: TransferConfig, base_model: Path, base_ref: str,
        seed: int, work_dir: Path, *, tracking: Tracking | None = None, rehearsal: Rehearsal | None = None,
        progress: Progress = lambda _: None) -> Trained:
    """Fine-tune base_model (a .keras file; base_ref says where it came from, e.g. models:/digits-mnist/3)
    on converted's train split (and the rehearsal's images) for config.epochs epochs in transfer.mode,
    validating on its val split."""
    if transfer.mode is TransferMode.gradual and transfer.head_epochs >= config.epochs:
        raise ConfigError(f"transfer.head_epochs ({transfer.head_epochs}) must be less than train.epochs "
                          f"({config.epochs}) in gradual mode: the unfrozen phase needs at least one epoch")
    base_sha = sha256_file(base_model)
    signature = {"data": converted.fingerprint, "seed": seed, "config": config.model_dump(mode="json"),
                 "transfer": transfer.model_dump(mode="json"), "base_sha256": base_sha,
                 "rehearsal": rehearsal.describe() if rehearsal else None}
    resume = prepare_work_dir(work_dir, signature)
    if not (work_dir / BASE).is_file():
        shutil.copyfile(base_model, work_dir / BASE)
    train, val = splits(converted, config, "train", "val", progress=progress)
    if rehearsal is not None:
        extra = rehearsal.arrays(seed)
        progress(f"rehearsing {len(extra.ids):,} of the base's training images (run {rehearsal.run_id})"
                 + (" on noise backgrounds" if rehearsal.noise_background else "")
                 + f" beside the {train.rows:,} of this run")
        train = train.joined(extra)
    base_name = model_name(work_dir / BASE)
    progress(f"fine-tuning {base_ref} ({base_name}), mode {transfer.mode.value}")
    return fit_keras(
        train, val, config, seed, work_dir, signature, resume, tracking, progress,
        build=lambda keras: transferred(load_keras_model(work_dir / BASE), config,
                                        transfer.mode, keras),
        segments=segments(config, transfer), name=base_name,
        extra_params={"transfer.base": base_ref, "transfer.base_sha256": base_sha,
                      "transfer.rehearsal_rows": rehearsal.rows if rehearsal else 0,
                      **{f"transfer.{k}": v for k, v in transfer.model_dump(mode="json").items() if k != "base"}},
        base=base_ref, transfer_mode=transfer.mode.value, rehearsal=rehearsal.describe() if rehearsal else None)


def segments(config: TrainConfig, transfer: TransferConfig) -> list[Segment]:
    """The training phases of a mode, within config.epochs epochs in all, then train.clean_epochs without the
    augment block (components.train.clean_phase)."""
    epochs = config.epochs
    if transfer.mode is TransferMode.full:
        return [phase(0, epochs, transfer.learning_rate, config), *clean_phase(config)]
    if transfer.mode is TransferMode.frozen:
        return [phase(0, epochs, config.learning_rate, config), *clean_phase(config)]
    head = transfer.head_epochs
    return [phase(0, head, config.learning_rate, config),
            phase(head, epochs, transfer.fine_tune_learning_rate, config, prepare=_unfreeze_all_but_batchnorm),
            *clean_phase(config)]


def _unfreeze_all_but_batchnorm(model) -> None:
    import keras

    for layer in model.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)


def transferred(base, config: TrainConfig, mode: TransferMode, keras) -> Any:
    """The model to fine-tune, built from the base's layers (they carry its weights).

    `full` keeps the base's head; `frozen` and `gradual` put a new head on the frozen extractor.
    """
    scale, features, head = _chain(base, keras)
    inputs = keras.Input((IMAGE_SIDE, IMAGE_SIDE, 1), name="image")
    x = scale(inputs)
    if augments(config):
        x = augmentation(config, keras)(x)
    for layer in features:
        x = layer(x)
    if mode is TransferMode.full:
        return keras.Model(inputs, head(x), name=base.name)
    for layer in features:
        layer.trainable = False  # BatchNormalization then runs in inference mode (Keras 3)
    outputs = keras.layers.Dense(N_CLASSES, activation="softmax", dtype="float32", name="new_probabilities")(x)
    return keras.Model(inputs, outputs, name=base.name)


def _chain(base, keras) -> tuple[Any, list[Any], Any]:
    """(scale layer, feature layers, head) of a digits model whose layers form one chain; refuses others."""
    check_classifier(base, f"base model '{base.name}'")
    shape = tuple(base.inputs[0].shape[1:]) if base.inputs else None
    layers = chain_layers(base)
    scale = layers[0] if layers else None
    takes_canonical = (shape == (IMAGE_SIDE, IMAGE_SIDE, 1) and isinstance(scale, keras.layers.Rescaling)
                       and np.isclose(float(scale.scale), 1 / 255) and float(scale.offset) == 0.0)
    if not takes_canonical or len(layers) < 3:
        raise DigitsInputError(f"base model '{base.name}' does not take canonical digit images (input "
                               f"{IMAGE_SIDE}x{IMAGE_SIDE}x1 uint8, first layer Rescaling(1/255)); got input {shape}")
    chain = [layer for layer in layers[1:] if layer.name != "augment"]
    body = chain[:-1] if chain[-1].name == CALIBRATION_LAYER else chain  # fine-tuning starts uncalibrated
    head = body[-1]
    output_units = tuple(head.output.shape[1:]) if hasattr(head, "output") else None
    if output_units != (N_CLASSES,):
        raise DigitsInputError(f"base model '{base.name}' does not end in {N_CLASSES} class probabilities "
                               f"(last layer output {output_units})")
    if not computes_as(base, [scale, *chain]):  # otherwise its graph is not a chain
        raise DigitsInputError(f"base model '{base.name}' is not a single chain of layers; transfer supports "
                               "the digits model zoo's layout (scale, [augment], layers..., head)")
    return scale, body[:-1], head

