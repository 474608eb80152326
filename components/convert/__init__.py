"""The convert stage: canonical Parquet -> stratified train/val split + test -> sharded gzip TFRecords.

`run` plans the split (components.convert.plan), runs the Beam pipeline (components.convert.transforms)
on the configured runner, and folds the shards' sidecars into `manifest.json` (counts per shard and
per class, a sha256 per shard, one content fingerprint). The stage folder is the caller's temp
folder (flows.stages.execute renames it into place when this returns).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shlex
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from components.convert import plan as split_plan
from schemas import examples as ex
from schemas.artifacts import Converted, Examples
from schemas.config import ConvertConfig
from schemas.dataset import ID, LABEL, N_PIXELS, PIXELS, Split, labels_of, pixels_of
from schemas.errors import ConfigError, DigitsInputError
from schemas.runs import write_json_atomic

Progress = Callable[[str], None]
SIDECARS = ".shards"  # one JSON per written shard, folded into manifest.json at the end
SPILL = ".spill"  # the rows between reading and writing (transforms._SpillRowGroup): as large as the data, removed
RUNNERS = {"direct": "DirectRunner", "dask": "apache_beam.runners.dask.dask_runner.DaskRunner"}


def input_fingerprint(examples: Examples) -> str:
    """sha256 of the canonical data itself (ids, labels, pixels of every split), not of its files; read a row group
    at a time (memory does not grow with the data)."""
    digest = hashlib.sha256()
    for split in (Split.train, Split.test):
        if not examples.has(split):
            continue
        path = examples.parquet(split)
        table = pq.read_table(path, columns=[ID, LABEL])  # 9 bytes a row; the pixels follow a row group at a time
        labels = labels_of(table)
        digest.update(split.value.encode())
        digest.update(table.column(ID).to_numpy().astype("<i8").tobytes())
        digest.update(b"-" if labels is None else labels.astype("<i1").tobytes())
        reader = pq.ParquetFile(path)
        for group in range(reader.num_row_groups):
            digest.update(np.ascontiguousarray(pixels_of(reader.read_row_group(group, columns=[PIXELS]))).tobytes())
    return digest.hexdigest()


def run(examples: Examples, config: ConvertConfig, seed: int, out_dir: Path, *, dask_address: str | None = None,
        progress: Progress = lambda _: None) -> Converted:
    """Convert a run's canonical dataset into TFRecord shards in out_dir. The same data, seed, val_fraction
    and rows_per_shard give byte-identical shards on every runner. dask_address: the scheduler that
    runner=dask uses (None: a LocalCluster of config.dask_workers processes on 127.0.0.1)."""
    progress("fingerprinting the canonical data")
    input_fp = input_fingerprint(examples)
    train = examples.parquet(Split.train)
    test = examples.parquet(Split.test) if examples.has(Split.test) else None
    columns = pq.read_table(train, columns=[ID, LABEL])
    labels = labels_of(columns)
    if labels is None:
        raise DigitsInputError(f"{train}: the train split has no labels; cannot make a stratified validation split")
    plan = split_plan.plan(columns.column(ID).to_numpy(), labels, pq.ParquetFile(test).metadata.num_rows if test else None,
                           seed=seed, val_fraction=config.val_fraction, rows_per_shard=config.rows_per_shard)
    if plan.counts["val"] == 0:
        raise DigitsInputError(f"{train}: {plan.counts['train']} labelled rows leave an empty validation split at "
                               f"convert.val_fraction={config.val_fraction}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SIDECARS).mkdir()
    total = sum(plan.shards.values())
    progress(f"{', '.join(f'{s} {n:,}' for s, n in plan.counts.items())} rows -> {total} shards "
             f"on {runner_label(config)}")
    (out_dir / SPILL).mkdir()
    with _watch_shards(out_dir, total, progress):
        _run_beam(config, dask_address, lambda pipeline: _build(pipeline, train, test, plan, out_dir))
    shutil.rmtree(out_dir / SPILL)
    manifest = _write_manifest(out_dir, plan, input_fp, config)
    return Converted(dir=out_dir, counts=manifest["counts"], shards={s: len(v["shards"]) for s, v in manifest["splits"].items()},
                     label_counts={s: v["label_counts"] for s, v in manifest["splits"].items()},
                     fingerprint=manifest["fingerprint"], input_fingerprint=input_fp, split=plan.summary(),
                     runner=runner_label(config))


def _build(pipeline, train: Path, test: Path | None, plan: split_plan.SplitPlan, out_dir: Path) -> None:
    from components.convert import transforms

    transforms.build(pipeline, train=train, test=test, plan=plan, out_dir=out_dir, sidecar_dir=out_dir / SIDECARS,
                     spill_dir=out_dir / SPILL)


def _runner_name(config: ConvertConfig) -> str:
    return RUNNERS.get(config.runner, config.runner)


def runner_label(config: ConvertConfig) -> str:
    """The runner as people name it: DirectRunner, DaskRunner, FlinkRunner, ..."""
    return _runner_name(config).rsplit(".", 1)[-1]


def _run_beam(config: ConvertConfig, dask_address: str | None, build: Callable[[object], None]) -> None:
    from components.convert.transforms import import_beam

    beam = import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    try:
        extra = shlex.split(config.beam_args)
    except ValueError as exc:
        raise ConfigError(f"convert.beam_args: {exc}") from None
    if any(arg == "--runner" or arg.startswith("--runner=") for arg in extra):
        raise ConfigError(f"convert.beam_args sets the runner ({config.beam_args}): name it with convert.runner "
                          "instead (e.g. --set convert.runner=DataflowRunner), so run.json records the runner used")
    # A failing DoFn is raised to us, and we report it; Beam also logs it, traceback and all, on the
    # console (stderr, where errors are one line)
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    with _runner_args(config, dask_address) as runner_args:
        try:
            pipeline = beam.Pipeline(options=PipelineOptions([*runner_args, *extra]))
        except ValueError as exc:
            raise ConfigError(f"convert.runner={config.runner}: {str(exc).splitlines()[0]}") from None
        build(pipeline)
        result = pipeline.run()
        try:
            result.wait_until_finish()
        finally:
            client = getattr(result, "client", None)  # DaskRunner's dask.distributed client
            if client is not None:
                client.close()


@contextlib.contextmanager
def _runner_args(config: ConvertConfig, dask_address: str | None) -> Iterator[list[str]]:
    runner = _runner_name(config)
    if runner != RUNNERS["dask"]:
        yield [f"--runner={runner}"]
        return
    # One Create element (a Parquet row group) per dask partition, so every worker reads and encodes;
    # the DaskRunner's default packs 128 elements into one partition.
    partitions = [] if "--dask_npartitions" in config.beam_args else ["--dask_partition_size=1"]
    if dask_address:
        from components.reach import check_scheduler

        check_scheduler(dask_address)
        yield [f"--runner={runner}", f"--dask_client_address={dask_address}", *partitions]
        return
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=config.dask_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0", silence_logs=logging.ERROR,  # a free port on host: None would
                      # still take 8787 and warn on stderr when another cluster (a second run) holds it
                      preload=["components.convert.dask_worker"]) as cluster:
        yield [f"--runner={runner}", f"--dask_client_address={cluster.scheduler_address}", *partitions]


@contextlib.contextmanager
def _watch_shards(out_dir: Path, total: int, progress: Progress) -> Iterator[None]:
    """Report shards as their sidecars appear (Beam runners report nothing on their own)."""
    done = threading.Event()

    def watch() -> None:
        seen = -1
        while not done.wait(0.5):
            written = sum(1 for p in (out_dir / SIDECARS).glob("*.json"))
            if written != seen:
                progress(f"wrote {written}/{total} shards")
                seen = written

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _write_manifest(out_dir: Path, plan: split_plan.SplitPlan, input_fp: str, config: ConvertConfig) -> dict:
    """Fold the sidecars into manifest.json; write an empty shard file for any shard no row hashed to."""
    sidecar_dir = out_dir / SIDECARS
    written = {(s["split"], s["index"]): s for s in (json.loads(p.read_text()) for p in sidecar_dir.glob("*.json"))}
    splits = {}
    for split, n_shards in plan.shards.items():
        shards = []
        for index in range(n_shards):
            shard = written.get((split, index)) or _empty_shard(out_dir, split, index, n_shards)
            shards.append({k: shard[k] for k in ("file", "count", "sha256", "label_counts")})
        label_counts: dict[str, int] = {}
        for shard in shards:
            for label, n in shard["label_counts"].items():
                label_counts[label] = label_counts.get(label, 0) + n
        splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards,
                         "label_counts": dict(sorted(label_counts.items(), key=lambda kv: int(kv[0])))}
    for split, expected in plan.counts.items():
        if splits[split]["count"] != expected:
            raise RuntimeError(f"convert wrote {splits[split]['count']} {split} rows, planned {expected}")
    fingerprint = hashlib.sha256("\n".join(f"{split}/{s['file']}:{s['sha256']}" for split, v in splits.items()
                                           for s in v["shards"]).encode()).hexdigest()
    manifest = {"format": ex.FORMAT, "compression": ex.COMPRESSION, "features": ex.spec_json(),
                "pixels": {"shape": [28, 28], "dtype": "uint8", "bytes": N_PIXELS},
                "split": plan.summary(), "input_fingerprint": input_fp, "fingerprint": fingerprint,
                "counts": {split: v["count"] for split, v in splits.items()}, "splits": splits}
    shutil.rmtree(sidecar_dir)
    write_json_atomic(out_dir / ex.MANIFEST, manifest)
    return manifest


def _empty_shard(out_dir: Path, split: str, index: int, n_shards: int) -> dict:
    from components.tensorflow_runtime import import_tensorflow

    tf = import_tensorflow()
    name = ex.shard_name(split, index, n_shards)
    with tf.io.TFRecordWriter(str(out_dir / name), options=ex.COMPRESSION):
        pass
    return {"file": name, "count": 0, "sha256": hashlib.sha256().hexdigest(), "label_counts": {}}
