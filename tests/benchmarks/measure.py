"""Run one measured job in this (child) process and print {"seconds", "peak_rss_mb", ...} as JSON.

Each job runs in a fresh interpreter so its peak memory is its own; imports are done before the
clock starts, so the numbers are the work, not Python's start-up.
usage: python measure.py JOB ARGS...
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path


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
    from components.ingest import kaggle, noisy

    reader = {"kaggle": kaggle, "noisy": noisy}[source]
    start = time.perf_counter()
    splits, _ = reader.read(Path(data), limit=None, strict=True)
    return {"seconds": time.perf_counter() - start, "rows": {s.value: len(p.ids) for s, p in splits.items()}}


def validate(source: str, data: str) -> dict:
    """The validate stage alone (features, every suite, results.json, Data Docs) on an ingested dataset."""
    from components import ingest, validate as validate_stage
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


if __name__ == "__main__":
    job, *args = sys.argv[1:]
    result = {"ours": ours, "ours_read": ours_read, "validate": validate, "pandas_kaggle": pandas_kaggle, "pandas_noisy": pandas_noisy}[job](*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
