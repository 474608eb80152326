"""The export stage: the Kaggle submission for the test split, the model as a TF SavedModel with a
serving signature and as `.keras`, and an infra-validation (TFX's InfraValidator in small).

export/
  submission.csv     `ImageId,Label`, one row per test row, ImageId 1..N in test order (plus `File`, the
                     image each row was read from, for a source of one file per image)
  saved_model/       TF SavedModel; signature `serving_default`: images uint8 [N, 28, 28] (canonical:
                     upright, 0 background, 255 ink) -> label int64 [N], probabilities float32 [N, 10]
  model.keras        the Keras model (or model.joblib for pca-svm, which has no SavedModel)
  infra_validation.json   what the checking process predicted against the in-flow predictions
  seen-test-images.csv    only when the model was trained on some test rows (its seen set,
                     components.lineage): `ImageId,Seen` (exact | shifted) — its answers there are memory

Before the stage completes, a Python process of its own (components.export.serve_check) loads the
exported model from disk — the SavedModel through TensorFlow alone, no Keras model or digits code —
predicts a sample of test rows and must agree with the in-flow predictions on every label
(probabilities within 1e-4); otherwise the stage fails and no export/ folder appears. That process is
started at a process's first export and kept for its later ones (a test suite's), loading each model
from disk anew.
"""

from __future__ import annotations

import atexit
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from components.evaluate import load_predict
from components.tensorflow_runtime import release_memory
from schemas.artifacts import Converted, Exported, Trained
from schemas.dataset import IMAGE_SIDE
from schemas.errors import DigitsInputError

Progress = Callable[[str], None]
SUBMISSION = "submission.csv"
SAVED_MODEL = "saved_model"
INFRA = "infra_validation.json"
SEEN_TEST = "seen-test-images.csv"
SIGNATURE = "serving_default"
TOLERANCE = 1e-4


def run(trained: Trained, converted: Converted, out_dir: Path, *, sample: int = 512, seed: int = 0,
        files: dict[int, str] | None = None, seen=None, in_memory_rows: int = 100_000,
        progress: Progress = lambda _: None) -> Exported:
    """Write the submission and the exported model into out_dir and infra-validate the export.

    files: test id -> the file that row was read from (a folder of images), added to the submission.
    seen: the model's seen-image set (components.lineage); test rows in it are listed next to the
    submission (SEEN_TEST), as a warning that its score on them says nothing about new digits.
    A test split of more than in_memory_rows rows is streamed: only its ids, labels and probabilities are held.
    """
    from components.train.feed import Feed

    out_dir.mkdir(parents=True, exist_ok=True)
    predict = load_predict(trained.path, trained.hashes.get(trained.file))
    if "test" in converted.counts:
        progress("loading the test split")
        split = Feed.of(converted.files("test"), converted.counts["test"], in_memory_rows)
        progress(f"predicting {split.rows:,} test rows")
        started = time.perf_counter()
        checks = [predict] + ([lambda images: np.stack(seen.membership(images), axis=1)] if seen is not None else [])
        ids, truth, outputs = split.scored(*checks)
        predict_seconds = time.perf_counter() - started
        order = np.argsort(ids, kind="stable")
        ids, truth, probabilities = ids[order], truth[order], outputs[0][order]
        if files is None and not np.array_equal(ids, np.arange(1, len(ids) + 1)):
            raise DigitsInputError(f"{converted.dir}: test ids are not 1..{len(ids)}; cannot number a submission")
        labels = probabilities.argmax(axis=1)
        write_submission(out_dir / SUBMISSION, ids, labels, files)
        submission = SUBMISSION
        test_accuracy = float((labels == truth).mean()) if len(truth) and (truth >= 0).all() else None  # shown, never
        # used to choose anything (the gate, tuning and calibration see only val)
        if seen is not None:
            membership = outputs[1][order]
            seen_test = write_seen_test(out_dir / SEEN_TEST, ids, membership[:, 0], membership[:, 1])
            if seen_test:
                progress(f"warning: {seen_test:,} of {len(ids):,} test rows were seen in training: listed in {SEEN_TEST}")
    else:  # a source without a test split (a folder of images with no test/): nothing to submit
        progress("no test split: no submission; infra-validating on validation images")
        split = Feed.of(converted.files("val"), converted.counts["val"], in_memory_rows)
        _, _, (probabilities,) = split.scored(predict)
        order = np.arange(len(probabilities))
        ids, predict_seconds, submission, seen_test = np.zeros(0, np.int64), 0.0, "", 0
        test_accuracy = None
        labels = np.zeros(0, np.int64)
    # the rows checked in a process of their own: a seeded sample (in id order), read back from the shards
    chosen = np.random.default_rng(seed).choice(len(order), size=min(sample, len(order)), replace=False)
    at = np.sort(order[chosen])  # their positions in the shards
    images = split.images_at(at).images
    expected = probabilities[np.argsort(order)[at]]

    if trained.path.suffix == ".keras":
        progress("exporting the SavedModel")
        shutil.copyfile(trained.path, out_dir / "model.keras")
        export_saved_model(trained.path, out_dir / SAVED_MODEL)
        served = out_dir / SAVED_MODEL
    else:
        shutil.copyfile(trained.path, out_dir / trained.path.name)
        served = out_dir / trained.path.name
    predict = split = checks = None  # the model and a held split let go: the checking process starts beside less
    release_memory()
    progress(f"infra-validating {served.name} in a process of its own on {len(at)} test rows")
    check = infra_validate(served, images, expected, out_dir)
    (out_dir / INFRA).write_text(json.dumps({"model": served.name, "rows": len(at), **check}, indent=2))
    return Exported(dir=out_dir, submission=submission, test_rows=len(ids), model=served.name,
                    infra_rows=len(at), max_probability_diff=check["max_probability_diff"],
                    predict_seconds=round(predict_seconds, 3), seen_test=seen_test if seen is not None else None,
                    test_accuracy=test_accuracy,
                    label_counts={str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))})


def write_seen_test(path: Path, ids: np.ndarray, exact: np.ndarray, shifted: np.ndarray) -> int:
    """`ImageId,Seen` (exact | shifted) for the test rows the model was trained on, written under a temporary
    name and renamed; no file when there are none. Returns how many."""
    rows = np.flatnonzero(exact | shifted)
    if not len(rows):
        return 0
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "Seen"])
        writer.writerows((int(ids[r]), "exact" if exact[r] else "shifted") for r in rows)
    os.replace(partial, path)
    return len(rows)


def write_submission(path: Path, ids: np.ndarray, labels: np.ndarray, files: dict[int, str] | None = None) -> None:
    """Kaggle's `ImageId,Label` CSV (+ `File` when files are given), written under a temporary name and renamed."""
    import csv

    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["ImageId", "Label", *(["File"] if files is not None else [])])
        for i, label in zip(ids.tolist(), labels.tolist()):
            writer.writerow([i, label, *([files.get(i, "")] if files is not None else [])])
    os.replace(partial, path)


def export_saved_model(model_file: Path, target: Path) -> None:
    """A TF SavedModel whose `serving_default` takes canonical uint8 images and returns label + probabilities."""
    from components.tensorflow_runtime import import_tensorflow

    tf = import_tensorflow()
    import keras

    from components.keras_layers import load_keras_model

    model = load_keras_model(model_file)
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(images):
        probabilities = model(tf.cast(images, tf.float32)[..., None], training=False)
        return {"label": tf.argmax(probabilities, axis=1), "probabilities": probabilities}

    archive.add_endpoint(name=SIGNATURE, fn=serve,
                         input_signature=[tf.TensorSpec([None, IMAGE_SIDE, IMAGE_SIDE], tf.uint8, name="images")])
    archive.write_out(str(target), verbose=False)


def infra_validate(served: Path, images: np.ndarray, expected: np.ndarray, scratch: Path) -> dict:
    """Load `served` in a process of its own (components.export.serve_check), predict `images`, compare."""
    sample = scratch / ".infra-sample.npy"
    np.save(sample, images)
    try:
        answer = _CHECKER.check(served, sample)
    finally:
        sample.unlink(missing_ok=True)
    if "error" in answer:
        raise RuntimeError(f"infra-validation: the exported model did not load and predict in a process of its own: "
                           f"{answer['error']}")
    served_probabilities = np.asarray(answer["probabilities"])
    disagree = int((served_probabilities.argmax(axis=1) != expected.argmax(axis=1)).sum())
    diff = float(np.abs(served_probabilities - expected).max()) if len(expected) else 0.0
    if disagree or diff > TOLERANCE:
        raise RuntimeError(f"infra-validation failed: the exported model disagrees with the in-flow predictions "
                           f"on {disagree} of {len(expected)} labels (largest probability difference {diff:.2e})")
    return {"disagreements": disagree, "max_probability_diff": diff}


class _Checker:
    """serve_check --serve: a Python process of its own (TensorFlow alone, no digits model objects, nothing the
    exporting process holds), started at the first export of this process and kept for the next ones; started
    again when it has died. It ends when this process does (its stdin closes)."""

    TIMEOUT = 600.0  # seconds for one model to load and predict

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        import tempfile

        if self._stderr is not None:
            self._stderr.close()  # the last one's, which died
        self._stderr = tempfile.TemporaryFile()
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.Popen([sys.executable, "-m", "components.export.serve_check", "--serve"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                env=env, cwd=Path(__file__).resolve().parents[2])
        atexit.register(_close, proc)
        return proc

    def check(self, model: Path, sample: Path) -> dict:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                proc.stdin.write(json.dumps({"model": str(model), "sample": str(sample)}) + "\n")
                proc.stdin.flush()
                line = _read_line(proc, self.TIMEOUT)
            except OSError as exc:  # a broken pipe (it died), or TimeoutError (an OSError too)
                line = ""
                proc.kill()
                if isinstance(exc, TimeoutError):
                    return {"error": f"no answer in {self.TIMEOUT:.0f} s"}
            if not line:  # it died: its last words
                proc.wait()
                self._stderr.seek(0)
                last = (self._stderr.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
                return {"error": f"the process ended (exit {proc.returncode}): {last}"}
            return json.loads(line)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError
    return proc.stdout.readline()


def _close(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()


_CHECKER = _Checker()
