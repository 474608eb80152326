"""The convert stage: Beam from canonical Parquet to sharded TFRecords, read back through the shared parser."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datagen
import numpy as np
import pyarrow.parquet as pq
import pytest
from runs import make, output, validated_kaggle_run

from components import records
from components.convert import plan as split_plan
from flows import runner
from schemas import examples as ex
from schemas.config import apply_overrides
from schemas.dataset import labels_of, pixels_of
from schemas.errors import DigitsInputError
from schemas.runs import RunFolder


KAGGLE_ROWS = (600, 150)  # the kaggle_data fixture's train and test rows (conftest)


def _by_id(parquet: Path) -> dict[int, tuple[int | None, bytes]]:
    table = pq.read_table(parquet)
    labels = labels_of(table)
    pixels = pixels_of(table)
    return {int(i): (None if labels is None else int(labels[k]), pixels[k].tobytes())
            for k, i in enumerate(table.column("id").to_numpy())}


def test_shards_read_back_through_the_shared_parser_match_manifest_and_parquet(home, kaggle_data):
    folder, config = validated_kaggle_run(kaggle_data, "convert.rows_per_shard=100")
    converted = make(folder, config, "converted")
    manifest = ex.read_manifest(converted.dir)
    assert manifest["counts"] == converted.counts == {"train": 540, "val": 60, "test": 150}
    assert {s: len(v["shards"]) for s, v in manifest["splits"].items()} == {"train": 6, "val": 1, "test": 2}

    seen: dict[str, ex.Arrays] = {}
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            arrays = records.load([converted.dir / shard["file"]])
            assert len(arrays.ids) == shard["count"]
            assert list(arrays.ids) == sorted(arrays.ids)  # sorted within a shard: byte-stable output
            labels, counts = np.unique(arrays.labels, return_counts=True)
            assert {str(k): int(n) for k, n in zip(labels, counts)} == shard["label_counts"]
        seen[split] = records.load(converted.files(split))
        assert len(seen[split].ids) == entry["count"]

    train = _by_id(folder.stage_dir("ingest") / "train.parquet")
    assert not set(seen["train"].ids) & set(seen["val"].ids)
    assert set(seen["train"].ids) | set(seen["val"].ids) == set(train)
    for split in ("train", "val"):
        arrays = seen[split]
        for row_id, label, image in zip(arrays.ids, arrays.labels, arrays.images):
            assert (label, image.tobytes()) == train[int(row_id)]
    test = _by_id(folder.stage_dir("ingest") / "test.parquet")
    assert sorted(seen["test"].ids) == sorted(test)
    assert set(seen["test"].labels) == {ex.NO_LABEL}  # Kaggle's test rows are unlabelled
    # and the manifest says so, without a shard read (evaluate and the label review skip such a split)
    assert (converted.labelled("test"), converted.labelled("train"), converted.labelled("val")) == (False, True, True)
    assert all(image.tobytes() == test[int(i)][1] for i, image in zip(seen["test"].ids, seen["test"].images))

    record = folder.load().stages["convert"]
    assert record.status == "completed"
    assert record.outputs["split"]["seed"] == 42 and record.outputs["split"]["val_fraction"] == 0.1
    assert record.outputs["fingerprint"] == manifest["fingerprint"]
    assert not list(converted.dir.glob(".*"))  # no partial files or sidecars left in the stage folder


def test_row_groups_of_any_size_give_the_same_validation_split_and_shards(home, kaggle_data, tmp_path, monkeypatch):
    """The data stages read the canonical Parquet a row group at a time (validate's features, convert's fingerprint
    and its spill files), so that memory does not grow with the data: the same 600 rows cut into 64-row groups
    give the same validation results and the same split, manifest and shards, byte for byte, as one group."""
    import components.ingest as ingest_stage

    def converted() -> tuple[RunFolder, object, dict]:
        folder, config = validated_kaggle_run(kaggle_data, "convert.rows_per_shard=100")
        made = make(folder, config, "converted")
        results = json.loads((folder.stage_dir("validate") / "results.json").read_text())
        return folder, made, results

    whole_folder, whole, whole_results = converted()
    assert pq.ParquetFile(whole_folder.stage_dir("ingest") / "train.parquet").num_row_groups == 1
    monkeypatch.setattr(ingest_stage, "ROW_GROUP_ROWS", 64)  # validate and convert follow the file's row groups
    monkeypatch.setenv("DIGITS_HOME", str(tmp_path / "another-home"))  # nothing reused from the first run
    cut_folder, cut, cut_results = converted()
    assert pq.ParquetFile(cut_folder.stage_dir("ingest") / "train.parquet").num_row_groups == 10
    assert cut_results["results"] == whole_results["results"] and cut_results["dataset"] == whole_results["dataset"]
    assert ex.read_manifest(cut.dir) == ex.read_manifest(whole.dir) and cut.input_fingerprint == whole.input_fingerprint
    shards = sorted(p.name for p in whole.dir.glob(f"*{ex.SUFFIX}"))
    assert len(shards) == 9 and shards == sorted(p.name for p in cut.dir.glob(f"*{ex.SUFFIX}"))
    for name in shards:
        assert (cut.dir / name).read_bytes() == (whole.dir / name).read_bytes(), name
    assert not list(cut.dir.glob(".*"))  # the spill folder is gone


def test_dask_runner_on_a_local_cluster_writes_the_same_examples_as_the_direct_runner(home, kaggle_data, tmp_path):
    """`digits convert --set convert.runner=dask` (a LocalCluster of 2 worker processes on 127.0.0.1) in its
    own process, on a copy of a validated run; the direct runner converts the original in-process."""
    folder, config = validated_kaggle_run(kaggle_data, "convert.rows_per_shard=150")
    dask_home = tmp_path / "dask-home"
    shutil.copytree(folder.root, dask_home / "runs" / folder.run_id)
    direct = make(folder, config, "converted")
    with contextlib.ExitStack() as held:  # Dask's default dashboard port taken, as by another run's cluster: its
        try:  # LocalCluster must not fall back to it and warn on stderr
            busy = held.enter_context(socket.socket())
            busy.bind(("127.0.0.1", 8787))
            busy.listen()
        except OSError:
            pass  # someone holds it already: the same situation
        done = subprocess.run([str(Path(sys.executable).with_name("digits")), "convert", "--run", folder.run_id,
                               "--set", "convert.runner=dask", "--set", "convert.dask_workers=2"],
                              env={**os.environ, "DIGITS_HOME": str(dask_home)}, capture_output=True, text=True,
                              timeout=600)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    dask = runner.output_of(RunFolder(dask_home / "runs" / folder.run_id), "convert")
    assert (direct.runner, dask.runner) == ("DirectRunner", "DaskRunner")
    assert "cached_from" not in RunFolder(dask_home / "runs" / folder.run_id).load().stages["convert"].outputs
    assert ex.read_manifest(dask.dir) == ex.read_manifest(direct.dir)
    shards = sorted(p.name for p in direct.dir.glob(f"*{ex.SUFFIX}"))
    assert shards == sorted(p.name for p in dask.dir.glob(f"*{ex.SUFFIX}")) and len(shards) == 6
    for name in shards:  # the same examples, in the same order, byte for byte
        assert (dask.dir / name).read_bytes() == (direct.dir / name).read_bytes(), name


def test_ingest_validate_and_convert_on_a_two_worker_dask_cluster_give_the_one_machine_artifacts(
        kaggle_data, tmp_path, monkeypatch):
    """With dask.address set, ingest parses the CSV's text blocks on the cluster's workers, validate computes each
    row group's features there and convert runs Beam's DaskRunner on them: the same Parquet (byte for byte),
    validation results, manifest and shards as one machine gives. The CSV is read in 64 KB blocks and written in
    64-row groups here, so that many of each travel to the 2 workers, and come back in order."""
    from dask.distributed import LocalCluster

    import components.ingest as ingest_stage
    from components.ingest import text

    monkeypatch.setattr(text, "BLOCK_BYTES", 64 << 10)
    monkeypatch.setattr(ingest_stage, "ROW_GROUP_ROWS", 64)

    def converted(home: Path, *settings: str):
        monkeypatch.setenv("DIGITS_HOME", str(home))
        folder, config = validated_kaggle_run(kaggle_data, "convert.rows_per_shard=100", *settings)
        return folder, make(folder, config, "converted")

    one_folder, one = converted(tmp_path / "one-machine")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0",
                      preload=["components.convert.dask_worker"]) as cluster:
        dask_folder, dask = converted(tmp_path / "dask", f"dask.address={cluster.scheduler_address}",
                                      "convert.runner=dask")
        ran = {name: prefix.state_counts["memory"] for name, prefix in cluster.scheduler.task_prefixes.items()}
        workers = len(cluster.scheduler.workers)
        # the noisy reader's blocks too (its first block, which sets the layout, is read here)
        from components import ingest as ingest_component
        from schemas.config import IngestConfig
        from schemas.dataset import Source

        datagen.write_noisy(tmp_path / "noisy", n_train=300, n_test=100)
        noisy = {where: ingest_component.run(Source.noisy, IngestConfig(data=str(tmp_path / "noisy")),
                                             tmp_path / f"noisy-{where}", tfds_dir=tmp_path, dask_address=address)
                 for where, address in (("here", None), ("dask", cluster.scheduler_address))}
        noisy_blocks = cluster.scheduler.task_prefixes["parse_numeric"].state_counts["memory"] - ran["parse_numeric"]
        # a bad value near the end of a file parsed on the workers: the same one line as on one machine
        bad = tmp_path / "bad-kaggle"
        shutil.copytree(kaggle_data, bad)
        lines = (bad / "train.csv").read_text().splitlines()
        lines[-3] = lines[-3].replace(",0,", ",x,", 1)
        (bad / "train.csv").write_text("\n".join(lines) + "\n")
        said = []
        for address in (None, cluster.scheduler_address):
            with pytest.raises(DigitsInputError) as refused:
                ingest_component.run(Source.kaggle, IngestConfig(data=str(bad)), tmp_path / f"bad-{len(said)}",
                                     tfds_dir=tmp_path, dask_address=address)
            said.append(str(refused.value))
    assert said[0] == said[1] and f"line {len(lines) - 2}" in said[0] and "'x'" in said[0], said
    assert noisy_blocks > 10 and noisy["here"].counts == noisy["dask"].counts == {"train": 300, "test": 100}
    for name in ("train.parquet", "test.parquet"):
        assert (tmp_path / "noisy-here" / name).read_bytes() == (tmp_path / "noisy-dask" / name).read_bytes()
    blocks = -(-(kaggle_data / "train.csv").stat().st_size // (64 << 10))
    assert workers == 2 and ran.get("parse_numeric", 0) >= blocks > 10, ran  # both splits' blocks parsed there
    assert ran.get("group_features", 0) == 10 + 3, sorted(ran)  # 600 train and 150 test rows in 64-row groups
    assert dask.runner == "DaskRunner" and one.runner == "DirectRunner"
    for name in ("train.parquet", "test.parquet"):
        assert (dask_folder.stage_dir("ingest") / name).read_bytes() == (one_folder.stage_dir("ingest") / name).read_bytes()
    results = [json.loads((f.stage_dir("validate") / "results.json").read_text()) for f in (one_folder, dask_folder)]
    assert results[0]["results"] == results[1]["results"] and results[0]["dataset"] == results[1]["dataset"]
    assert ex.read_manifest(dask.dir) == ex.read_manifest(one.dir)
    shards = sorted(p.name for p in one.dir.glob(f"*{ex.SUFFIX}"))
    assert len(shards) == 9 and shards == sorted(p.name for p in dask.dir.glob(f"*{ex.SUFFIX}"))
    for name in shards:
        assert (dask.dir / name).read_bytes() == (one.dir / name).read_bytes(), name


def test_the_split_is_stratified_seeded_and_exact():
    rng = np.random.default_rng(3)
    labels = rng.choice(10, size=20_000, p=[.3, .2, .1, .1, .1, .05, .05, .05, .03, .02])
    ids = rng.permutation(np.arange(1, 20_001))
    plan = split_plan.plan(ids, labels, 500, seed=42, val_fraction=0.1, rows_per_shard=5000)
    assert abs(plan.counts["val"] - 2_000) <= 5 and plan.counts["train"] + plan.counts["val"] == 20_000
    assert plan.shards == {"train": 4, "val": 1, "test": 1}
    val = plan.in_val(ids, labels)
    assert list(val) == [plan.split_of(int(i), int(k)) is ex.ExampleSplit.val for i, k in zip(ids, labels)]
    assert val.sum() == plan.counts["val"]
    for label in range(10):  # round(10% of each class), exactly
        assert val[labels == label].sum() == np.floor(0.1 * (labels == label).sum() + 0.5)
    in_train = np.bincount(labels[~val], minlength=10) / (~val).sum()
    in_val = np.bincount(labels[val], minlength=10) / val.sum()
    assert np.abs(in_train - in_val).max() < 0.005  # per-class proportions within 0.5 points
    again = split_plan.plan(ids, labels, 500, seed=42, val_fraction=0.1, rows_per_shard=5000)
    other = split_plan.plan(ids, labels, 500, seed=7, val_fraction=0.1, rows_per_shard=5000)

    def val_ids(p):
        return set(ids[p.in_val(ids, labels)].tolist())

    assert val_ids(again) == val_ids(plan) and len(val_ids(plan) & val_ids(other)) < 400
    assert plan.class_counts == other.class_counts  # another seed: other rows, same proportions


def test_row_keys_agree_between_the_driver_and_the_workers():
    ids = np.array([1, 2, 3, 42, 2**40 + 7, 70_000], dtype=np.int64)
    for seed in (0, 42, 2**63 + 5):
        assert [int(k) for k in split_plan.row_keys(seed, ids)] == [split_plan.row_key(seed, int(i)) for i in ids]


def test_a_converted_input_is_reused_not_recomputed(home, kaggle_data, cli):
    folder, config = validated_kaggle_run(kaggle_data)
    first = make(folder, config, "converted")
    seconds = folder.load().stages["convert"].seconds
    assert make(folder, config, "converted").fingerprint == first.fingerprint
    assert folder.load().stages["convert"].seconds == seconds  # not run again

    second, _ = validated_kaggle_run(kaggle_data)  # a new run on the same data
    result = cli("convert", "--run", second.run_id)
    assert result.code == 0, result.err
    assert "reused from" in result.out
    reused = output(second, "converted")
    assert second.load().stages["convert"].outputs["cached_from"] == str(first.dir)
    assert reused.fingerprint == first.fingerprint
    for shard in first.dir.glob(f"*{ex.SUFFIX}"):
        assert (reused.dir / shard.name).read_bytes() == shard.read_bytes()

    result = cli("convert", "--run", second.run_id, "--set", "seed=7")  # another split: converted again
    assert result.code == 0, result.err
    resplit = output(second, "converted")
    assert "cached_from" not in second.load().stages["convert"].outputs and resplit.fingerprint != first.fingerprint
    assert resplit.counts == first.counts


def test_force_makes_a_completed_stage_again(home, kaggle_data, cli):
    folder, config = validated_kaggle_run(kaggle_data)
    make(folder, config, "converted")
    before = folder.load().stages["convert"]
    assert "(already completed in this run)" in cli("convert", "--run", folder.run_id).out
    result = cli("convert", "--run", folder.run_id, "--force")
    assert result.code == 0, result.err
    assert "already completed" not in result.out
    after = folder.load().stages["convert"]
    assert after.finished_at != before.finished_at and after.hashes == before.hashes  # made again: the same shards

    second, _ = validated_kaggle_run(kaggle_data)  # another run on the same data: not adopted under --force
    result = cli("convert", "--run", second.run_id, "--force")
    assert result.code == 0, result.err
    assert "reused from" not in result.out and "cached_from" not in second.load().stages["convert"].outputs


def test_convert_refuses_a_run_without_passed_validation(cli, home, kaggle_data):
    assert cli("ingest", "--source", "kaggle", "--data", kaggle_data).code == 0
    result = cli("convert")
    assert result.code == 2
    (message,) = result.err.strip().splitlines()
    assert "has no completed validate stage" in message


@pytest.mark.parametrize("setting, words", [
    ("convert.runner=NoSuchRunner", "convert.runner=NoSuchRunner: Unexpected pipeline runner"),
    ("convert.beam_args=--flag='unclosed", "convert.beam_args: No closing quotation"),
    ("convert.val_fraction=1.5", "invalid value for 'convert.val_fraction'"),
])
def test_bad_convert_settings_are_one_line(cli, home, kaggle_data, setting, words):
    folder, _ = validated_kaggle_run(kaggle_data)
    result = cli("convert", "--run", folder.run_id, "--set", setting)
    assert result.code == 2
    (message,) = result.err.strip().splitlines()
    assert words in message
    assert not folder.stage_dir("convert").exists() and not list(folder.root.glob(".convert.tmp-*"))


def test_beam_args_reach_the_runner_untouched(home, kaggle_data):
    folder, config = validated_kaggle_run(kaggle_data)
    threaded = apply_overrides(config, ["convert.beam_args=--direct_num_workers=2 --direct_running_mode=multi_threading"])
    converted = make(folder, threaded, "converted")
    assert converted.counts["train"] + converted.counts["val"] == 600
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    options = PipelineOptions(threaded.convert.beam_args.split()).view_as(DirectOptions)
    assert (options.direct_num_workers, options.direct_running_mode) == (2, "multi_threading")


def test_conversion_killed_midway_leaves_nothing_readable_and_the_next_run_completes(home, tmp_path):
    """kill -9 while shards are being written: no convert/ folder, train cannot read it, a re-run completes."""
    datagen.write_kaggle(tmp_path / "kaggle", n_train=2000, n_test=500)
    folder, _ = validated_kaggle_run(tmp_path / "kaggle", "convert.rows_per_shard=10")
    command = [str(Path(sys.executable).with_name("digits")), "convert", "--run", folder.run_id]
    proc = subprocess.Popen(command, env={**os.environ, "DIGITS_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while not list(folder.root.glob(f".convert.tmp-*/*{ex.SUFFIX}")):  # shards are being written
        assert proc.poll() is None and time.monotonic() < deadline, "convert ended before it could be killed"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    (partial,) = folder.root.glob(".convert.tmp-*")
    assert not (partial / ex.MANIFEST).exists()  # killed before the end
    assert len(list(partial.glob(f"*{ex.SUFFIX}"))) < 250
    assert not folder.stage_dir("convert").exists()
    assert json.loads(folder.path.read_text())["stages"]["convert"]["status"] == "running"
    with pytest.raises(DigitsInputError, match="no completed convert stage"):
        runner.output_of(RunFolder(folder.root), "convert")

    done = subprocess.run(command, env={**os.environ, "DIGITS_HOME": str(home)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    converted = output(folder, "converted")
    assert converted.counts == {"train": 1800, "val": 200, "test": 500}
    assert sum(len(records.load(converted.files(s)).ids) for s in converted.counts) == 2500
    assert not list(folder.root.glob(".convert.*"))
