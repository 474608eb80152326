"""Keras callbacks of the train stage (imported only once TensorFlow is)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from schemas.artifacts import sha256_file
from schemas.errors import TrainingDiverged
from schemas.runs import write_json_atomic

STATE = "state.json"
KEEP_CHECKPOINTS = 2


def save_atomic(model: keras.Model, path: Path) -> None:
    """model.save under a temporary name, then rename: a reader never finds half a .keras file."""
    partial = path.with_name(f".{path.stem}.partial.keras")
    model.save(partial)
    os.replace(partial, path)


class EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_seconds` to the epoch's logs (put it first: later callbacks, CSVLogger too, see it)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._started


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: the whole model (optimizer state and schedule position included) to
    `epoch-NNN.keras`, then `state.json` naming it. Each is written under a temporary name and renamed,
    so a kill at any moment leaves the previous complete checkpoint in force."""

    def __init__(self, directory: Path, state: dict) -> None:
        super().__init__()
        self.directory, self.state = directory, state

    def on_epoch_end(self, epoch, logs=None):
        name = f"epoch-{epoch + 1:03d}.keras"
        save_atomic(self.model, self.directory / name)
        write_json_atomic(self.directory / STATE, {**self.state, "epoch": epoch + 1, "checkpoint": name,
                                                   "sha256": sha256_file(self.directory / name),
                                                   "seed_generators": seed_states(self.model)})
        for old in sorted(self.directory.glob("epoch-*.keras"))[:-KEEP_CHECKPOINTS]:
            old.unlink()


def _seed_generators(model) -> list:
    """The random-number generators of the model's layers (dropout, augmentation), in layer order."""
    return [generator for layer in model._flatten_layers() for generator in getattr(layer, "_seed_generators", [])]


def seed_states(model) -> list[list[int]]:
    """Each generator's state (its seed and how far it has drawn): a .keras file does not keep them — a model
    loaded from it draws new seeds — so a checkpoint's state.json does, for `restore_seed_states`."""
    return [[int(x) for x in np.asarray(generator.state.value)] for generator in _seed_generators(model)]


def restore_seed_states(model, states: list[list[int]] | None) -> bool:
    """Put the generators of a model loaded from a checkpoint where they were when it was saved, so that a resumed
    attempt draws the dropout masks and augmentations an attempt that never stopped would have drawn. False (and
    nothing changed) when the states do not fit the model (a checkpoint from before they were kept)."""
    generators = _seed_generators(model)
    if not states or len(states) != len(generators) or any(len(s) != generator.state.shape[0]
                                                            for s, generator in zip(states, generators)):
        return False
    for state, generator in zip(states, generators):
        generator.state.assign(np.asarray(state, dtype=generator.state.dtype))
    return True


class StopOnNaN(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite, with TrainingDiverged (one line):
    every later weight would be garbage, and Keras would go on and save it."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(f"the training loss became {float(loss)} at epoch {self._epoch + 1}, batch "
                                   f"{batch + 1}: lower train.learning_rate (or transfer.learning_rate)")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


class EpochReport(keras.callbacks.Callback):
    """One progress line per epoch, and the epoch's metrics to the tracking run."""

    def __init__(self, epochs: int, progress: Callable[[str], None], tracking) -> None:
        super().__init__()
        self.epochs, self.progress, self.tracking = epochs, progress, tracking

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.progress(f"epoch {epoch + 1}/{self.epochs}: loss {logs.get('loss', float('nan')):.4f}, "
                      f"accuracy {logs.get('accuracy', 0):.2%}, val_loss {logs.get('val_loss', float('nan')):.4f}, "
                      f"val_accuracy {logs.get('val_accuracy', 0):.2%} ({logs.get('epoch_seconds', 0):.1f} s)")
        if self.tracking:
            self.tracking.log_metrics(logs, step=epoch + 1)
