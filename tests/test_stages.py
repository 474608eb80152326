"""The stage runner: a stage's folder appears complete or not at all, run.json says what happened, and
a stage run again makes what was built on it stale."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows import runner, stages
from schemas.artifacts import Artifact
from schemas.config import default_config


@dataclass(frozen=True)
class Note(Artifact):
    text: str = ""


def _write_note(text: str, fail_after_write: bool = False):
    def body(out: Path) -> Note:
        out.mkdir(parents=True)
        (out / "note.txt").write_text(text)
        if fail_after_write:
            raise KeyboardInterrupt  # as if the process were interrupted mid-stage
        return Note(dir=out, text=text)
    return body


def test_completed_stage_is_renamed_into_place_and_recorded(home):
    folder = stages.start_run(default_config("train-kaggle"))
    note = runner.execute(folder, "ingest", _write_note("first"))
    assert note.dir == folder.stage_dir("ingest") and (note.dir / "note.txt").read_text() == "first"
    record = json.loads(folder.path.read_text())
    assert record["stages"]["ingest"]["status"] == "completed"
    assert record["stages"]["ingest"]["outputs"] == {"text": "first"}
    assert not list(folder.root.glob(".ingest.*"))


def test_interrupted_stage_leaves_no_output_and_keeps_the_previous_one(home):
    folder = stages.start_run(default_config("train-kaggle"))
    runner.execute(folder, "ingest", _write_note("good"))
    with pytest.raises(KeyboardInterrupt):
        runner.execute(folder, "ingest", _write_note("half", fail_after_write=True))
    assert (folder.stage_dir("ingest") / "note.txt").read_text() == "good"  # the old output is untouched
    assert not list(folder.root.glob(".ingest.*"))
    record = json.loads(folder.path.read_text())
    assert record["status"] == "failed"  # the command failed; the stage keeps its good, earlier output
    assert record["stages"]["ingest"]["status"] == "completed"
    assert record["stages"]["ingest"]["error"] == "a later attempt failed: KeyboardInterrupt"
    assert runner.output_of(folder, "ingest").hashes == {"note.txt": record["stages"]["ingest"]["hashes"]["note.txt"]}


def test_a_first_attempt_that_fails_leaves_the_stage_failed(home):
    folder = stages.start_run(default_config("train-kaggle"))
    with pytest.raises(KeyboardInterrupt):
        runner.execute(folder, "ingest", _write_note("half", fail_after_write=True))
    record = json.loads(folder.path.read_text())
    assert record["status"] == "failed" and record["stages"]["ingest"]["status"] == "failed"


def test_rerun_replaces_the_output_whole_and_stale_temp_folders_go(home):
    folder = stages.start_run(default_config("train-kaggle"))
    stale = folder.root / ".ingest.tmp-deadbeef"  # what a kill -9 leaves behind
    stale.mkdir()
    (stale / "train.parquet").write_text("partial")
    runner.execute(folder, "ingest", _write_note("one"))
    runner.execute(folder, "ingest", _write_note("two"))
    assert sorted(p.name for p in folder.stage_dir("ingest").iterdir()) == ["note.txt"]
    assert (folder.stage_dir("ingest") / "note.txt").read_text() == "two"
    assert not stale.exists()


def test_a_stage_run_again_makes_the_completed_stages_after_it_stale(home):
    """`digits convert --run X` after X trained: the model was made from the old split, so every stage
    downstream of convert in the graph goes stale (kept, but not read; `digits resume` runs them again)
    and the registration's run-level facts no longer stand. Stages convert does not feed stay."""
    from schemas.errors import DigitsInputError

    folder = stages.start_run(default_config("train-kaggle"))
    for stage in ("ingest", "validate", "convert", "train", "evaluate", "register"):
        runner.execute(folder, stage, _write_note(stage))
    folder.update(lambda r: setattr(r, "promotion_reason", "passed") or setattr(r, "registry_version", 1))
    runner.execute(folder, "convert", _write_note("convert, other split"))
    record = folder.load()
    assert {name: s.status for name, s in record.stages.items()} == {
        "ingest": "completed", "validate": "completed", "convert": "completed", "train": "stale", "evaluate": "stale",
        "register": "stale"}
    assert record.stages["train"].error == "convert was run again after it"
    assert (record.registry_version, record.promotion_reason) == (None, None)
    assert (folder.stage_dir("train") / "note.txt").read_text() == "train"  # nothing is lost
    with pytest.raises(DigitsInputError, match=rf"run {folder.run_id}'s train stage is stale \(convert was run "
                                               rf"again after it\): run `digits train --run {folder.run_id}`"):
        runner.output_of(folder, "train")
    runner.execute(folder, "train", _write_note("train again"))
    assert folder.load().stages["train"].status == "completed" and folder.load().stages["evaluate"].status == "stale"


def test_a_stage_run_again_with_the_same_output_leaves_later_stages_alone(home):
    folder = stages.start_run(default_config("train-kaggle"))
    for stage in ("ingest", "validate", "convert"):
        runner.execute(folder, stage, _write_note(stage))
    runner.execute(folder, "ingest", _write_note("ingest"))  # byte-identical output: same digest
    assert [s.status for s in folder.load().stages.values()] == ["completed"] * 3


def test_ingest_killed_midway_leaves_nothing_a_later_stage_could_read(tmp_path):
    """kill -9 while the stage is writing: no ingest/ folder, later stages refuse the run, a new run works."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import datagen
    from schemas.errors import DigitsInputError
    from schemas.runs import RunFolder

    datagen.write_kaggle(tmp_path / "kaggle", n_train=3000, n_test=500)
    home = tmp_path / "home"
    env = {**os.environ, "DIGITS_HOME": str(home)}
    script = Path(sys.executable).with_name("digits")
    command = [str(script), "ingest", "--source", "kaggle", "--data", str(tmp_path / "kaggle")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(home.glob("runs/*/.ingest.tmp-*/train.parquet")):  # it is writing its outputs
        assert proc.poll() is None and time.monotonic() < deadline, "ingest ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    (run,) = (home / "runs").iterdir()
    assert not (run / "ingest").exists()
    assert json.loads((run / "run.json").read_text())["stages"]["ingest"]["status"] == "running"
    with pytest.raises(DigitsInputError, match="no completed ingest stage"):
        runner.output_of(RunFolder(run), "ingest")

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    finished = [r for r in (home / "runs").iterdir() if r != run]
    assert [p.name for p in sorted((finished[0] / "ingest").glob("*.parquet"))] == ["test.parquet", "train.parquet"]
