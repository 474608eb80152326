"""Run one measured job in this (child) process and print {"seconds", "peak_rss_mb", ...} as JSON.

Each job runs in a fresh interpreter so its peak memory is its own; imports are done before the
clock starts, so the numbers are the work, not Python's start-up.
usage: python measure.py JOB ARGS...
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path


def in_fresh_process(*args: str) -> dict:
    """Run one job of this script in a new interpreter; its JSON result (peak_rss_mb included), plus
    process_s: the interpreter's wall time from start to exit (start-up, imports and exit included), and
    tree_cpu_s: the CPU seconds (user + system) of that interpreter and every process it waited for,
    start-up included (a cross-check on wall times that other tenants of the machine can stretch)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    process_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
    result["process_s"] = process_s
    result["tree_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def ours(source: str, data: str) -> dict:
    from components import ingest
    from schemas.config import IngestConfig
    from schemas.dataset import Source

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        examples = ingest.run(Source(source), IngestConfig(data=data), Path(out) / "ingest", tfds_dir=Path(out))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": examples.counts}


def ours_read(source: str, data: str) -> dict:
    """Our reader alone (parse + every check, arrays out): what pandas.read_csv is compared with."""
    from components.ingest import reader_of
    from components.ingest.splits import ReadOptions, pieces

    read = reader_of(source)
    start = time.perf_counter()
    splits, _ = read(Path(data), ReadOptions())
    rows = {s.value: sum(len(p.ids) for p in pieces(part)) for s, part in splits.items()}  # a streaming reader reads here
    return {"seconds": time.perf_counter() - start, "rows": rows}


def validate(source: str, data: str) -> dict:
    """The validate stage alone (features, every suite, results.json, Data Docs) on an ingested dataset."""
    from components import ingest
    from components import validate as validate_stage
    from schemas.config import IngestConfig, ValidateConfig
    from schemas.dataset import Source

    with tempfile.TemporaryDirectory() as out:
        examples = ingest.run(Source(source), IngestConfig(data=data), Path(out) / "ingest", tfds_dir=Path(out))
        import great_expectations  # noqa: F401  (imported before the clock, like every other job)

        start = time.perf_counter()
        validation = validate_stage.run(examples, ValidateConfig(), Path(out) / "validate")
        seconds = time.perf_counter() - start
    assert validation.passed, validation.failures
    return {"seconds": seconds, "rows": examples.counts, "expectations": validation.evaluated}


def pandas_kaggle(data: str) -> dict:
    """The notebook baseline: pd.read_csv on each zip member, then to numpy."""
    import pandas as pd

    start = time.perf_counter()
    rows = {}
    with zipfile.ZipFile(data) as archive:
        for name in ("train.csv", "test.csv"):
            with archive.open(name) as fh:
                frame = pd.read_csv(fh)
            rows[name] = len(frame.to_numpy(dtype="uint8"))
    return {"seconds": time.perf_counter() - start, "rows": rows}


def pandas_noisy(data: str) -> dict:
    """The notebook baseline for .amat: pandas' C parser on whitespace-separated floats."""
    import pandas as pd

    start = time.perf_counter()
    rows = {}
    for split in ("train", "test"):
        frame = pd.read_csv(Path(data) / f"mnist_background_random_{split}.amat", sep=r"\s+", header=None,
                            dtype="float32", engine="c")
        rows[split] = len(frame.to_numpy())
    return {"seconds": time.perf_counter() - start, "rows": rows}


def _ingested(source: str, data: str, out: Path):
    from components import ingest
    from schemas.config import IngestConfig
    from schemas.dataset import Source

    return ingest.run(Source(source), IngestConfig(data=data), out / "ingest", tfds_dir=out)


def convert_cold(source: str, data: str, runner: str = "direct") -> dict:
    """The convert stage as `digits convert` runs it in a fresh process: TensorFlow and Beam imports included."""
    with tempfile.TemporaryDirectory() as out:
        examples = _ingested(source, data, Path(out))
        start = time.perf_counter()
        from components import convert
        from schemas.config import ConvertConfig

        converted = convert.run(examples, ConvertConfig(runner=runner), 42, Path(out) / "convert")
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": converted.counts, "shards": converted.shards,
            "class_proportion_gap_pt": _proportion_gap(converted.label_counts)}


def _proportion_gap(label_counts: dict[str, dict[str, int]]) -> float:
    """The largest difference, in percentage points, between a class's share of train and of val."""
    train, val = label_counts["train"], label_counts["val"]
    n_train, n_val = sum(train.values()), sum(val.values())
    return round(max(abs(train[c] / n_train - val.get(c, 0) / n_val) for c in train) * 100, 3)


def convert_vs_plain(source: str, data: str, repeats: str = "3") -> dict:
    """Beam (DirectRunner) against a plain tf.io.TFRecordWriter loop, interleaved in this one process.

    Both start from the canonical Parquet and write the same gzip examples with the same encoder;
    the plain loop writes one file per input split, with no split and no shards. TensorFlow and Beam
    are imported before either clock starts.
    """
    import statistics

    import pyarrow.parquet as pq

    from components import convert, records
    from components.convert.transforms import import_beam
    from components.tensorflow_runtime import import_tensorflow
    from schemas import examples as ex
    from schemas.config import ConvertConfig
    from schemas.dataset import labels_of, pixels_of

    tf = import_tensorflow()
    import_beam()
    encode = records.encoder()
    beam_s, plain_s = [], []
    with tempfile.TemporaryDirectory() as out:
        examples = _ingested(source, data, Path(out))
        rows = sum(examples.counts.values())
        for attempt in range(int(repeats)):
            start = time.perf_counter()
            convert.run(examples, ConvertConfig(), 42, Path(out) / f"beam-{attempt}")
            beam_s.append(time.perf_counter() - start)

            start = time.perf_counter()
            for split in examples.counts:
                table = pq.read_table(examples.parquet(split))
                ids, labels = table.column("id").to_numpy(), labels_of(table)
                pixels = pixels_of(table).reshape(len(ids), -1)
                with tf.io.TFRecordWriter(f"{out}/plain-{attempt}-{split}{ex.SUFFIX}", options=ex.COMPRESSION) as w:
                    for i in range(len(ids)):
                        label = ex.NO_LABEL if labels is None else int(labels[i])
                        w.write(encode(ex.Row(int(ids[i]), label, pixels[i].tobytes())))
            plain_s.append(time.perf_counter() - start)
    beam, plain = statistics.median(beam_s), statistics.median(plain_s)
    return {"seconds": beam, "rows": examples.counts, "beam_s": [round(s, 2) for s in beam_s],
            "plain_s": [round(s, 2) for s in plain_s], "beam_rows_per_s": round(rows / beam),
            "plain_rows_per_s": round(rows / plain), "beam_vs_plain_throughput": round(plain / beam, 2)}


def train(home: str, run_id: str, *overrides: str) -> dict:
    """The train stage on a converted run (training on its train split only), then accuracy on the
    run's test split, which the model never saw. `seconds` is the training wall time (model.fit)."""
    import os

    os.environ["DIGITS_HOME"] = home
    from components.tensorflow_runtime import import_tensorflow

    import_tensorflow()
    from components import records
    from components.keras_layers import load_keras_model
    from flows import stages
    from runs import make, output
    from schemas.config import apply_overrides
    from schemas.runs import RunFolder

    folder = RunFolder.open(run_id)
    config = apply_overrides(stages.config_of(folder), list(overrides))
    trained = make(folder, config, "model")
    test = records.load(output(folder, "converted").files("test"))
    members = None
    if trained.file.endswith(".keras"):
        model = load_keras_model(trained.path)
        predicted = model.predict(test.images[..., None], batch_size=1024, verbose=0).argmax(axis=1)
        if trained.members:  # every member alone on the same test images
            from components.train.ensemble import members_of

            members = [{"name": m["name"], "model": m["model"], "seed": m["seed"], "val_accuracy": m["val_accuracy"],
                        "seconds": m["seconds"], "test_accuracy": float(
                            (layer.predict(test.images[..., None], batch_size=1024, verbose=0).argmax(axis=1)
                             == test.labels).mean())} for m, layer in zip(trained.members, members_of(model))]
    else:
        import joblib

        predicted = joblib.load(trained.path).predict(test.images.reshape(len(test.ids), -1) / 255.0)
    return {"seconds": trained.seconds, "rows": {"train": trained.train_rows, "val": trained.val_rows,
                                                 "test": len(test.ids)},
            "model": trained.model, "epochs": trained.epochs, "seconds_per_epoch": trained.seconds_per_epoch,
            "parameters": trained.parameters, "val_accuracy": trained.val_accuracy,
            "test_accuracy": float((predicted == test.labels).mean()), "settings": list(overrides), "members": members}


def predict(home: str, run_id: str) -> dict:
    """Predicting a run's whole test split with its trained model, as the export stage does: read the
    shards, load the model (safe mode), predict; each timed, median of 5 predictions, interleaved with 5 of
    Keras' own `model.predict` on the same model and images (the baseline the batched scoring replaced)."""
    import os
    import statistics

    os.environ["DIGITS_HOME"] = home
    from components.tensorflow_runtime import import_tensorflow

    import_tensorflow()
    import keras  # noqa: F401  (imported before the clock, like every other job)

    from components import records
    from components.evaluate import load_predict
    from runs import output
    from schemas.runs import RunFolder

    folder = RunFolder.open(run_id)
    start = time.perf_counter()
    test = records.load(output(folder, "converted").files("test"))
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model = load_predict(output(folder, "model").path)
    load_seconds = time.perf_counter() - start
    from components.keras_layers import load_keras_model

    keras_model = load_keras_model(output(folder, "model").path)  # the baseline: Keras' own model.predict
    keras_model.predict(test.images[:1024, ..., None], batch_size=1024, verbose=0)  # its predict step traced
    times, keras_times = [], []
    for _ in range(5):  # interleaved, so that the machine's swings fall on both
        start = time.perf_counter()
        labels = model(test.images).argmax(axis=1)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        keras_labels = keras_model.predict(test.images[..., None], batch_size=1024, verbose=0).argmax(axis=1)
        keras_times.append(time.perf_counter() - start)
    return {"rows": len(test.ids), "read_shards_s": round(read_seconds, 2), "load_model_s": round(load_seconds, 2),
            "predict_median_s": round(statistics.median(times), 2), "predict_runs_s": [round(t, 2) for t in times],
            "keras_predict_median_s": round(statistics.median(keras_times), 2),
            "keras_predict_runs_s": [round(t, 2) for t in keras_times],
            "same_labels": bool((labels == keras_labels).all()),
            "seconds": read_seconds + load_seconds + statistics.median(times), "labels": int(len(set(labels.tolist())))}


def pipeline(mode: str, home: str, data: str, *overrides: str) -> dict:
    """The default train-mnist pipeline as `digits run train-mnist` runs it (the Prefect flow `digits`
    with its local API, in-process), or the same stages called directly in the same order. The clock
    starts before any import of ours, TensorFlow's included: Prefect's cost is its imports, its API
    server and the flow's bookkeeping, whatever of it the command overlaps with other work. The parent
    also times the whole process (process_s: start-up and exit too)."""
    import os

    start = time.perf_counter()
    os.environ["DIGITS_HOME"] = home
    if mode == "flow":
        from flows.cli import main

        sys.argv = ["digits", "run", "train-mnist", "--data", data, *(a for o in overrides for a in ("--set", o))]
        main()
    else:
        from components.tensorflow_runtime import import_tensorflow
        from flows import runner, stages
        from runs import make
        from schemas.config import apply_overrides, default_config

        import_tensorflow()
        config = apply_overrides(default_config("train-mnist"), [f"ingest.data={data}", *overrides])
        folder = stages.start_run(config)
        for artifact in ("examples", "validation", "converted", "model", "evaluation", "registration", "exported"):
            make(folder, config, artifact)
        runner.finish_run(folder)
    seconds = time.perf_counter() - start
    from schemas.runs import list_runs

    record = list_runs()[-1].load()
    return {"seconds": seconds, "mode": mode, "status": record.status,
            "stages_s": {name: stage.seconds for name, stage in record.stages.items()}}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the run helpers (runs.py)
    job, *args = sys.argv[1:]
    jobs = {"ours": ours, "ours_read": ours_read, "validate": validate, "pandas_kaggle": pandas_kaggle,
            "pandas_noisy": pandas_noisy, "convert_cold": convert_cold, "convert_vs_plain": convert_vs_plain,
            "train": train, "predict": predict, "pipeline": pipeline}
    result = jobs[job](*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
