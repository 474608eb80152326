"""Ensembles: `train.members=N` trains N members and averages their class probabilities in ONE Keras model.

Member i is train.model (or train.member_models[i % len]) trained from random weights with seed
`seed + i`, or — in the transfer stage — the base model fine-tuned with that seed. Each member trains
in its own folder `members/member-NN/` through the same code, checkpoints and resume as a single
model (components.train), and writes `member.json` (its record, with the sha256 of its model file)
when it is done: an attempt that was killed part-way trains only the members without one, each
resuming at its last checkpoint.

Where the members train is the caller's choice (`execute`): one after another in this process, or as
Prefect tasks on a Dask cluster (flows.ensemble). A job is plain data and `MemberJob.run` the whole
of a member's work, so it can be pickled to a worker process on another machine that sees the run's
folder at the same path.

The ensemble model is the members (each a nested model named `member-NN-ARCH`) applied to the same input
and averaged by a `probabilities` layer: evaluate, the registry, export, `digits predict` and calibrate
take it like any model, and evaluate scores each member beside it (`members_of`). With test-time
augmentation (train.test_time_shifts=4 or 8; then even one member makes an ensemble model) every member
also sees each image shifted by one pixel in 4 or 8 directions, and the probabilities are averaged over
members and copies alike; a member scored alone, or fine-tuned from the ensemble, is the member without them.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable


from components.keras_layers import model_name, predict, saved_config
from components.tracking import Tracking
from components.train.feed import Feed
from schemas.artifacts import Converted, Trained, sha256_file
from schemas.config import ModelName, TrainConfig, TransferConfig
from schemas.errors import TrainingDiverged
from schemas.runs import write_json_atomic

if TYPE_CHECKING:
    from components.train.rehearsal import Rehearsal

Progress = Callable[[str], None]
MEMBERS = "members"
RECORD = "member.json"
STATE = "ensemble.json"
MODEL = "model.keras"
PREFIX = "member-"
# train.test_time_shifts: (rows, columns) rolls of the image; the first 4 straight, all 8 with the diagonals
SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


@dataclass(frozen=True)
class MemberJob:
    """Everything one member's training needs, picklable: where it reads, where it writes, how it trains."""

    index: int
    seed: int
    config: TrainConfig  # the member's own config: one model of its architecture
    converted: Converted
    work_dir: Path
    tracking: Tracking | None = None
    base_file: Path | None = None  # transfer: the base model, copied into the stage folder (workers read it)
    base_ref: str | None = None
    transfer: TransferConfig | None = None
    rehearsal: Rehearsal | None = None  # transfer: the base's own images, fine-tuned on too
    signature: dict = field(default_factory=dict)
    of: int = 1  # members in the ensemble
    at_once: int = 1  # members trained at once (train.workers): with `of`, what a member's time says of the whole

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.index:02d}"

    def describe(self) -> str:
        return f"{self.name} ({self.config.model.value}, seed {self.seed})"

    def done(self) -> dict | None:
        """The member's record, when an earlier attempt finished it with these settings and its model file
        is still the one it recorded."""
        try:
            record = json.loads((self.work_dir / RECORD).read_text())
            if record.get("signature") == self.signature and \
                    sha256_file(self.work_dir / record["file"]) == record["sha256"]:
                return record
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def run(self, progress: Progress = lambda _: None, worker: str | None = None) -> dict:
        """Train the member (or return its record when already trained); returns its record."""
        record = self.done()
        if record is not None:
            progress(f"{self.describe()}: trained by an earlier attempt, val_accuracy {record['val_accuracy']:.2%}")
            return record
        said = lambda message: progress(f"{self.name}: {message}")  # noqa: E731
        try:
            if self.transfer is None:
                from components import train

                trained = train.run(self.converted, self.config, self.seed, self.work_dir, tracking=self.tracking,
                                    progress=said)
            else:
                from components import transfer

                trained = transfer.run(self.converted, self.config, self.transfer, self.base_file, self.base_ref,
                                       self.seed, self.work_dir, tracking=self.tracking, rehearsal=self.rehearsal,
                                       progress=said)
        except TrainingDiverged as exc:
            raise TrainingDiverged(f"ensemble {self.describe()}: {exc}") from None
        record = {"name": self.name, "index": self.index, "model": self.config.model.value, "seed": self.seed,
                  "val_accuracy": trained.val_accuracy, "epochs": trained.epochs, "seconds": trained.seconds,
                  "resumed_at_epoch": trained.resumed_at_epoch, "parameters": trained.parameters,
                  "mlflow_run_id": trained.mlflow_run_id, "worker": worker, "processor": trained.processor,
                  "file": trained.file,
                  "sha256": sha256_file(self.work_dir / trained.file), "signature": self.signature}
        write_json_atomic(self.work_dir / RECORD, record)
        if self.of > 1:  # the first estimate of the whole ensemble's time comes with the first member's
            whole = math.ceil(self.of / self.at_once) * trained.seconds
            progress(f"{self.describe()}: trained in {trained.seconds:.0f} s; at that pace the {self.of} members take "
                     f"about {duration(whole)}" + (f" on {self.at_once} workers" if self.at_once > 1 else ""))
        return record


Execute = Callable[[list[MemberJob]], list[dict]]


def run(converted: Converted, config: TrainConfig, seed: int, work_dir: Path, *, execute: Execute,
        tracking: Tracking | None = None, progress: Progress = lambda _: None,
        transfer: TransferConfig | None = None, base_file: Path | None = None, base_ref: str | None = None,
        rehearsal: Rehearsal | None = None) -> Trained:
    """Train config.members members through `execute` and combine them into work_dir/model.keras.

    work_dir may hold an earlier attempt at the same ensemble (same data, seed and config): its finished
    members are kept and its unfinished ones resume; otherwise it is cleared."""
    signature = {"data": converted.fingerprint, "seed": seed,  # where members train, or TTA: not the members
                 "config": config.model_dump(mode="json", exclude={"workers", "test_time_shifts"}), "base": base_ref,
                 "transfer": transfer.model_dump(mode="json") if transfer else None,
                 "rehearsal": rehearsal.describe() if rehearsal else None}
    state = _state(work_dir, signature)
    (work_dir / MEMBERS).mkdir(parents=True, exist_ok=True)
    bases: list[Path] = []
    if base_file is not None:  # where every worker can read it, whatever machine it is on
        kept = work_dir / "base.keras"
        if not kept.is_file() or sha256_file(kept) != sha256_file(base_file):
            partial = work_dir / ".base.keras.partial"
            shutil.copyfile(base_file, partial)
            partial.replace(kept)
        bases = split(kept, work_dir) or [kept]
        if len(bases) > 1:
            progress(f"the base {base_ref} is an ensemble of {len(bases)} members: member i is fine-tuned from "
                     f"its member i (mod {len(bases)})")
    count = config.members if config.members > 1 or len(bases) < 2 else len(bases)
    parent = tracking.start(state.get("mlflow_run_id"), {
        **{f"train.{k}": v for k, v in config.model_dump(mode="json").items()}, "seed": seed,
        "members": count}) if tracking else None
    write_json_atomic(work_dir / STATE, {"signature": signature, "mlflow_run_id": parent})
    jobs = [_job(i, converted, config, seed, work_dir, tracking, parent, transfer,
                 bases[i % len(bases)] if bases else None, base_ref, rehearsal, count) for i in range(count)]
    shown = ", ".join(job.describe() for job in jobs[:SHOWN])
    progress(f"ensemble of {len(jobs)} members: {shown}" + (f" and {len(jobs) - SHOWN} more" if len(jobs) > SHOWN
                                                             else ""))
    started = time.perf_counter()
    members = sorted(execute(jobs), key=lambda record: record["index"])
    progress("combining the members into one model")
    val = Feed.of(converted.files("val"), converted.counts["val"], config.in_memory_rows)
    model = combine([work_dir / MEMBERS / m["name"] / m["file"] for m in members], work_dir / MODEL,
                    shifts=config.test_time_shifts)
    _, labels, (probabilities,) = val.scored(lambda images: predict(model, images[..., None]))
    val_accuracy = float((probabilities.argmax(axis=1) == labels).mean()) if val.rows else 0.0
    seconds = time.perf_counter() - started
    if tracking:
        tracking.log_metrics({f"{m['name']}.val_accuracy": m["val_accuracy"] for m in members}, step=0)
        tracking.finish({"final_val_accuracy": val_accuracy}, step=0)
    best = max(m["val_accuracy"] for m in members)
    scores = ", ".join(f"{m['val_accuracy']:.2%}" for m in members)
    tta = f" with {config.test_time_shifts} test-time shifts" if config.test_time_shifts else ""
    progress(f"ensemble{tta} val_accuracy {val_accuracy:.2%} (members alone {scores}; best member {best:.2%})")
    return Trained(dir=work_dir, model=f"ensemble of {len(members)} ({_architectures(members)}){tta}", file=MODEL,
                   epochs=max(m["epochs"] for m in members), resumed_at_epoch=None, val_accuracy=val_accuracy,
                   train_rows=converted.counts.get("train", 0), val_rows=val.rows,
                   parameters=int(model.count_params()), seconds=round(seconds, 2), seconds_per_epoch=None,
                   device=_device_name(), mlflow_run_id=parent,
                   processor=", ".join(dict.fromkeys(m["processor"] for m in members if m.get("processor"))),
                   base=base_ref, transfer_mode=transfer.mode.value if transfer else None,
                   rehearsal=rehearsal.describe() if rehearsal else None,
                   members=[{**{k: m[k] for k in ("name", "model", "seed", "val_accuracy", "epochs", "seconds", "worker",
                                                  "resumed_at_epoch", "mlflow_run_id")},
                             "processor": m.get("processor", "")} for m in members])  # "": an older attempt's


SHOWN = 5  # members named in the ensemble's first progress line


def duration(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h' or '2.1 days': a time estimate as people say it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _job(index: int, converted: Converted, config: TrainConfig, seed: int, work_dir: Path, tracking: Tracking | None,
         parent: str | None, transfer: TransferConfig | None, base_file: Path | None, base_ref: str | None,
         rehearsal: Rehearsal | None = None, count: int = 1) -> MemberJob:
    member = config.member(index)
    if base_file is not None:  # fine-tuning: the member is the base member's architecture, whatever train.model says
        architecture = model_name(base_file)
        if architecture in set(ModelName):
            member = member.model_copy(update={"model": ModelName(architecture)})
    job = MemberJob(index=index, seed=seed + index, config=member, converted=converted, of=count,
                    at_once=config.workers,
                    work_dir=work_dir / MEMBERS / f"{PREFIX}{index:02d}", base_file=base_file, base_ref=base_ref,
                    transfer=transfer, rehearsal=rehearsal,
                    signature={"data": converted.fingerprint, "seed": seed + index,
                               "config": member.model_dump(mode="json"), "base": base_ref,
                               "transfer": transfer.model_dump(mode="json") if transfer else None,
                               "rehearsal": rehearsal.describe() if rehearsal else None})
    if tracking is None:
        return job
    child = Tracking(tracking.uri, tracking.experiment, f"{tracking.run_name}-{job.name}",
                     {**tracking.tags, "digits.member": job.name, **({"mlflow.parentRunId": parent} if parent else {})},
                     artifact_root=tracking.artifact_root)
    return MemberJob(**{**job.__dict__, "tracking": child})


def _state(work_dir: Path, signature: dict) -> dict:
    """The earlier attempt's state when it made this ensemble; otherwise work_dir is cleared."""
    try:
        state = json.loads((work_dir / STATE).read_text())
        if state.get("signature") == signature:
            return state
    except (OSError, ValueError):
        pass
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    return {}


def combine(member_files: list[Path], out: Path, shifts: int = 0):
    """One model: the members (nested, named member-NN-ARCH) on the same input, probabilities averaged — over
    the image and its `shifts` (4 or 8) one-pixel shifts too, when given. Saved atomically to `out`; returned."""
    import keras

    from components.keras_layers import classes, load_keras_model
    from components.train.callbacks import save_atomic

    members = [load_keras_model(path, compile=False) for path in member_files]
    image = keras.Input(members[0].inputs[0].shape[1:], name="image")
    copies = classes(keras)["ShiftCopies"](SHIFTS[:shifts], name="test_time_shifts")(image) if shifts else image
    outputs = [keras.Model(m.inputs[0], m.outputs[0], name=_nested_name(i, m.name))(copies)
               for i, m in enumerate(members)]
    averaged = keras.layers.Average(name="members_average" if shifts else "probabilities")(outputs) \
        if len(outputs) > 1 else outputs[0]
    probabilities = classes(keras)["CopiesMean"](1 + shifts, name="probabilities")(averaged) if shifts else averaged
    model = keras.Model(image, probabilities, name=f"ensemble-{len(members)}")
    save_atomic(model, out)
    return model


def split(model_file: Path, out_dir: Path) -> list[Path]:
    """The members of an ensemble model file, each saved as a model of its own (out_dir/base-member-NN.keras,
    kept when already there: the caller clears out_dir when the file changes), named by its architecture again
    where the ensemble recorded it; [] for a single model. Transfer fine-tunes each member of an ensemble base
    this way."""
    import keras

    from components.keras_layers import load_keras_model
    from components.train.callbacks import save_atomic

    members = members_of(load_keras_model(model_file, compile=False))
    files = [out_dir / f"base-{PREFIX}{i:02d}.keras" for i in range(len(members))]
    for member, path in zip(members, files):
        if not path.is_file():
            architecture = _architecture(member.name)
            save_atomic(keras.Model(member.inputs[0], member.outputs[0], name=architecture) if architecture
                        else member, path)
    return files


def _nested_name(index: int, name: str) -> str:
    """A member's name inside the ensemble: member-NN, then its architecture (digits-net, ...) where known."""
    architecture = _architecture(name) if name.startswith(PREFIX) else name
    return f"{PREFIX}{index:02d}" + (f"-{architecture}" if architecture else "")


def _architecture(nested_name: str) -> str | None:
    """The architecture in a nested member's name (member-NN-ARCH); None for an ensemble saved before digits
    recorded it there (member-NN)."""
    rest = nested_name[len(PREFIX):].partition("-")[2]
    return rest or None


def is_ensemble(model_file: Path) -> bool:
    """Whether a .keras file holds an ensemble, read from its config.json (the model is not built: a single
    base is then loaded once, by the transfer that fine-tunes it)."""
    import zipfile

    try:
        config = saved_config(model_file)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False  # not a readable .keras file: the transfer's own load says so in one line
    return any(str(layer.get("config", {}).get("name", "")).startswith(PREFIX) for layer in config.get("layers", []))


def members_of(model) -> list:
    """The member sub-models of an ensemble model, in order (calibrate's model keeps them at its top level);
    an empty list for a single model."""
    return [layer for layer in model.layers if layer.name.startswith(PREFIX)]


def _architectures(members: list[dict]) -> str:
    names = [m["model"] for m in members]
    return ", ".join(f"{names.count(n)} {n}" for n in dict.fromkeys(names))


def _device_name() -> str:
    from components.tensorflow_runtime import import_tensorflow
    from components.train import device_summary

    return device_summary(import_tensorflow())["device"]
