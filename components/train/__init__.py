"""The train stage: fit a model from the zoo on the train split's TFRecords, checkpoint every epoch,
resume after a crash, log to MLflow and TensorBoard, save `model.keras`.

A split of up to train.in_memory_rows rows is read once through the shared parser (schemas.examples) and held in
memory (uint8, ~50 MB for MNIST); a larger one streams from its shards through tf.data (components.train.feed), so
memory does not grow with the data. Augmentation runs in the model on the training device. The work folder is
resumable: `checkpoints/epoch-NNN.keras` (the whole model, optimizer state and learning-rate
schedule position included) and `checkpoints/state.json` are written atomically after every epoch;
a new attempt on the same data, seed and config loads the newest and continues at the next epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from components.keras_layers import load_keras_model
from components.tensorflow_runtime import import_tensorflow
from components.tracking import Tracking
from components.train.feed import Feed
from schemas.artifacts import Converted, Trained
from schemas.config import ModelName, TrainConfig

Progress = Callable[[str], None]
CHECKPOINTS = "checkpoints"
STATE = "state.json"  # written by callbacks.EpochCheckpoint
MODEL = "model.keras"
SVM_MODEL = "model.joblib"


def run(converted: Converted, config: TrainConfig, seed: int, work_dir: Path, *,
        tracking: Tracking | None = None, progress: Progress = lambda _: None, rows: int | None = None,
        callbacks: list | None = None) -> Trained:
    """Train config.model on `converted`'s train split, validating on its val split, in work_dir.

    work_dir may hold an earlier, interrupted attempt: it is resumed when it was made from the same
    data, seed and config, and cleared otherwise. rows: train on the split's first N rows only (a tune
    trial); callbacks: more Keras callbacks, after digits' own (a tune trial's pruning).
    """
    signature = {"data": converted.fingerprint, "seed": seed, "config": config.model_dump(mode="json"), "rows": rows}
    resume = prepare_work_dir(work_dir, signature)
    if config.model is ModelName.pca_svm:
        progress("loading the train and val splits")
        train = Feed.of(converted.files("train"), converted.counts["train"], config.svm_rows,
                        take=min(config.svm_rows, rows or config.svm_rows))
        return _fit_svm(train, splits(converted, config, "val")[0], config, seed, work_dir, tracking, progress)
    train, val = splits(converted, config, "train", "val", take=rows, progress=progress)
    return _fit_keras(train, val, config, seed, work_dir, signature, resume, tracking, progress, callbacks or [])


def splits(converted: Converted, config: TrainConfig, *names: str, take: int | None = None,
           progress: Progress = lambda _: None) -> list[Feed]:
    """The named splits as Feeds: in memory up to config.in_memory_rows rows, streamed above (said by progress);
    take: the first split's first rows only."""
    feeds = [Feed.of(converted.files(name), converted.counts[name], config.in_memory_rows,
                     take=take if i == 0 else None) for i, name in enumerate(names)]
    held = [f"{name} {feed.rows:,}" for name, feed in zip(names, feeds) if feed.in_memory]
    streamed = [f"{name} {feed.rows:,}" for name, feed in zip(names, feeds) if not feed.in_memory]
    progress("; ".join(([f"held in memory: {', '.join(held)} rows"] if held else [])
                       + ([f"streamed from TFRecords (shuffle buffer {config.shuffle_buffer:,} rows): "
                           f"{', '.join(streamed)} rows"] if streamed else [])))
    return feeds


def prepare_work_dir(work_dir: Path, signature: dict) -> dict | None:
    """The checkpoint state to resume from when work_dir holds an attempt with this signature (same
    data, seed, config); otherwise work_dir is cleared for a fresh start and None returned."""
    resume = _resumable(work_dir, signature)
    if resume is None and work_dir.exists():
        shutil.rmtree(work_dir)
    (work_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    return resume


def _resumable(work_dir: Path, signature: dict) -> dict | None:
    """The checkpoint state to resume from: same signature, and the checkpoint's bytes those recorded
    (a damaged checkpoint or state file is not loaded: training starts over)."""
    from schemas.artifacts import sha256_file

    state_file = work_dir / CHECKPOINTS / STATE
    try:
        state = json.loads(state_file.read_text())
        checkpoint = work_dir / CHECKPOINTS / state["checkpoint"]
        if state.get("signature") == signature and checkpoint.is_file() and sha256_file(checkpoint) == state["sha256"]:
            return state
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def device_summary(tf) -> dict[str, Any]:
    gpus = tf.config.list_physical_devices("GPU")
    return {"gpus": len(gpus), "device": "GPU" if gpus else "CPU", "cpus": os.cpu_count(),
            "processor": processor_name()}


def processor_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name ('AMD EPYC'), from Linux's cpuinfo or else the platform's, '' when unknown. Logged
    with every training run because the same seed and data give different last digits on different CPUs
    (TensorFlow's oneDNN kernels depend on the instruction set; seen here: the default train-mnist run's val 99.47 % on
    one day's machine, 99.43 % on another's, same code)."""
    import platform

    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor()


@dataclass(frozen=True)
class Segment:
    """The epochs from the previous segment's end up to `end` (an epoch count), trained with one compiled set-up.

    enter(model, steps_per_epoch) prepares the model for the segment (e.g. unfreezes layers) and
    compiles it. It runs when training reaches the segment's first epoch; an attempt resumed inside
    a segment loads a checkpoint that already holds that set-up (trainable flags, optimizer state).
    """

    end: int
    enter: Callable[[Any, int], Any]  # returns the model to train: the same one, or one sharing its layers


def phase(start: int, end: int, learning_rate: float, config: TrainConfig,
          prepare: Callable[[Any], Any] | None = None, warmup_epochs: float | None = None) -> Segment:
    """Epochs start..end with a fresh Adam whose warm-up + cosine schedule spans exactly those epochs;
    prepare(model), e.g. unfreezing layers, runs before the model is compiled for them and may return a model
    that shares the layers (and so the weights) to train from then on. warmup_epochs: config's unless given."""
    warmup = config.warmup_epochs if warmup_epochs is None else warmup_epochs

    def enter(model, steps_per_epoch: int):
        import keras

        if prepare is not None:
            model = prepare(model) or model
        model.compile(optimizer=_optimizer(learning_rate, end - start, steps_per_epoch, warmup),
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
                      metrics=["accuracy"])
        return model
    return Segment(end, enter)


def clean_phase(config: TrainConfig) -> list[Segment]:
    """train.clean_epochs after the model's other epochs (config.epochs of them): the same layers without the
    `augment` block, so they see the images as they are, at train.clean_learning_rate decaying to 0 without
    warm-up. From then on the model trained, checkpointed and saved is that one, so a resumed attempt inside
    these epochs stays without augmentation. Empty when train.clean_epochs is 0."""
    from components.train.models import without_augmentation

    if not config.clean_epochs:
        return []
    return [phase(config.epochs, config.epochs + config.clean_epochs, config.clean_learning_rate, config,
                  prepare=without_augmentation, warmup_epochs=0)]


def _fit_keras(train: Feed, val: Feed, config: TrainConfig, seed: int, work_dir: Path,
               signature: dict, resume: dict | None, tracking, progress: Progress, callbacks: list) -> Trained:
    from components.train import models

    return fit_keras(train, val, config, seed, work_dir, signature, resume, tracking, progress,
                     build=lambda keras: models.build(config, keras),
                     segments=[phase(0, config.epochs, config.learning_rate, config), *clean_phase(config)],
                     name=config.model.value, callbacks=callbacks)


def fit_keras(train: Feed, val: Feed, config: TrainConfig, seed: int, work_dir: Path,
              signature: dict, resume: dict | None, tracking, progress: Progress, *,
              build: Callable[[Any], Any], segments: list[Segment], name: str,
              extra_params: dict[str, Any] | None = None, callbacks: list | None = None,
              **trained_fields: Any) -> Trained:
    """Fit the model build(keras) makes through its segments, checkpointing every epoch; resume from
    `resume` (a checkpoint state) when given. Shared by training from scratch and transfer learning."""
    tf = import_tensorflow()
    import keras

    from components.train import callbacks as cb

    keras.utils.set_random_seed(seed)
    hardware = device_summary(tf)
    if hardware["gpus"] and config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = tf.distribute.MirroredStrategy() if hardware["gpus"] > 1 else tf.distribute.get_strategy()
    steps_per_epoch = train.steps(config.batch_size)
    epochs = segments[-1].end
    with strategy.scope():
        if resume is not None:
            model = load_keras_model(work_dir / CHECKPOINTS / resume["checkpoint"])
            cb.restore_seed_states(model, resume.get("seed_generators"))  # dropout and augmentation go on as before
            initial_epoch = resume["epoch"]
            progress(f"resuming at epoch {initial_epoch + 1} of {epochs} from {resume['checkpoint']}")
        else:
            model, initial_epoch = build(keras), 0
    params = {**_params(config, seed, train, val, model, hardware), **(extra_params or {})}
    run_id = tracking.start(resume.get("mlflow_run_id") if resume else None, params) if tracking else None
    val_ds = val.evaluation(tf, 1024)
    if resume is not None:  # rows of epochs after the checkpoint (killed before it was written) are redone
        _truncate_history(work_dir / "history.csv", initial_epoch)
    callbacks = [  # in this order: an epoch is logged everywhere, then committed by its checkpoint, then judged
        cb.StopOnNaN(),
        cb.EpochTimer(),
        keras.callbacks.CSVLogger(str(work_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(work_dir / "logs"), write_graph=False, profile_batch=0),
        cb.EpochReport(epochs, progress, tracking),
        cb.EpochCheckpoint(work_dir / CHECKPOINTS, {"signature": signature, "mlflow_run_id": run_id}),
        *(callbacks or []),
    ]
    processor = f" ({hardware['processor']})" if hardware["device"] == "CPU" and hardware["processor"] else ""
    progress(f"training {name} ({model.count_params():,} parameters) on {train.rows:,} images, "
             f"{hardware['device']}{processor}, {epochs} epochs")
    started, start = time.perf_counter(), 0
    for segment in segments:
        if initial_epoch < segment.end:
            if initial_epoch <= start:  # entering the segment at its first epoch
                with strategy.scope():
                    model = segment.enter(model, steps_per_epoch)
            first = max(initial_epoch, start)  # each epoch's order a function of (seed, epoch): a resumed attempt
            data = train.training(tf, config.batch_size, seed, first, segment.end,  # reads what one that never
                                  config.shuffle_buffer)  # stopped would have
            model.fit(data, validation_data=val_ds, epochs=segment.end, initial_epoch=first, callbacks=callbacks,
                      steps_per_epoch=steps_per_epoch, shuffle=False, verbose=0)
        start = segment.end
    seconds = time.perf_counter() - started
    val_accuracy = float(model.evaluate(val_ds, verbose=0, return_dict=True)["accuracy"])
    cb.save_atomic(model, work_dir / MODEL)
    history = _history(work_dir / "history.csv")
    if tracking:
        tracking.finish({"final_val_accuracy": val_accuracy}, step=epochs)
    return Trained(dir=work_dir, model=name, file=MODEL, epochs=epochs,
                   resumed_at_epoch=initial_epoch + 1 if initial_epoch else None, val_accuracy=val_accuracy,
                   train_rows=train.rows, val_rows=val.rows, parameters=int(model.count_params()),
                   seconds=round(seconds, 2), seconds_per_epoch=_seconds_per_epoch(history),
                   device=hardware["device"], processor=hardware["processor"], mlflow_run_id=run_id, **trained_fields)


def _optimizer(learning_rate: float, epochs: int, steps_per_epoch: int, warmup_epochs: float):
    """Adam with a linear warm-up from learning_rate / 20 to learning_rate, then cosine decay to 0 at the last
    step (without warm-up: cosine decay from learning_rate)."""
    import keras

    total = epochs * steps_per_epoch
    warmup = min(int(warmup_epochs * steps_per_epoch), total - 1)
    first = learning_rate / 20 if warmup else learning_rate
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=first, decay_steps=max(1, total - warmup), alpha=0.0,
        warmup_target=learning_rate if warmup else None, warmup_steps=warmup)
    return keras.optimizers.Adam(schedule)


def _truncate_history(csv_path: Path, epochs: int) -> None:
    if not csv_path.is_file():
        return
    lines = csv_path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < epochs]
    partial = csv_path.with_name(f".{csv_path.name}.partial")
    partial.write_text("".join(kept))
    os.replace(partial, csv_path)


def _history(csv_path: Path) -> list[dict[str, float]]:
    import csv

    with csv_path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _seconds_per_epoch(history: list[dict[str, float]]) -> float | None:
    """Median seconds of the epochs run in this attempt and any earlier one (history.csv)."""
    seconds = [row["epoch_seconds"] for row in history if "epoch_seconds" in row]
    return round(float(np.median(seconds)), 2) if seconds else None


def _params(config: TrainConfig, seed: int, train: Feed, val: Feed, model, hardware: dict) -> dict:
    return {**{f"train.{k}": v for k, v in config.model_dump(mode="json").items()}, "seed": seed,
            "train_rows": train.rows, "val_rows": val.rows, "parameters": int(model.count_params()),
            **hardware}


def _fit_svm(train: Feed, val: Feed, config: TrainConfig, seed: int, work_dir: Path, tracking,
             progress: Progress) -> Trained:
    """PCA (50 whitened components) + RBF SVC on the first config.svm_rows train rows, the notebooks' reference."""
    import joblib
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    rows = train.rows  # the first config.svm_rows rows, held in memory
    x = train.arrays.images.reshape(rows, -1) / 255.0
    model = make_pipeline(PCA(n_components=50, whiten=True, random_state=seed), SVC(C=10, gamma="scale"))
    progress(f"fitting pca-svm on {rows:,} images")
    run_id = tracking.start(None, {"train.model": config.model.value, "seed": seed, "train_rows": rows,
                                   "val_rows": val.rows}) if tracking else None
    started = time.perf_counter()
    model.fit(x, train.arrays.labels)
    seconds = time.perf_counter() - started
    _, labels, (predicted,) = val.scored(lambda images: model.predict(images.reshape(len(images), -1) / 255.0))
    val_accuracy = float((predicted == labels).mean()) if val.rows else 0.0
    partial = work_dir / f".{SVM_MODEL}.partial"
    joblib.dump(model, partial)
    os.replace(partial, work_dir / SVM_MODEL)
    if tracking:
        tracking.finish({"val_accuracy": val_accuracy, "final_val_accuracy": val_accuracy}, step=1)
    progress(f"pca-svm: val_accuracy {val_accuracy:.2%} ({seconds:.1f} s)")
    return Trained(dir=work_dir, model=config.model.value, file=SVM_MODEL, epochs=1, resumed_at_epoch=None,
                   val_accuracy=val_accuracy, train_rows=rows, val_rows=val.rows, parameters=None,
                   seconds=round(seconds, 2), seconds_per_epoch=round(seconds, 2), device="CPU", processor=processor_name(),
                   mlflow_run_id=run_id)
